using Alignment.Losses;
using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Benchmarks;

/// <summary>How do the losses compare at batch size B? Forward, and forward + backward, per device and input dtype.</summary>
[MemoryDiagnoser]
public class LossBenchmarks
{
    [Params("dpo", "cdpo", "robust_dpo", "ipo", "hinge", "dpo_nll", "rpo", "spo", "odpo", "sppo")]
    public string Loss { get; set; } = "dpo";

    [Params(8, 64, 1024, 4096)]
    public int B { get; set; }

    [ParamsSource(nameof(DTypes))]
    public string DType { get; set; } = "float32";

    /// <summary>float32 and bfloat16; BENCH_DTYPES=float32 (or bfloat16) keeps one, to split a long run in two.</summary>
    public static IEnumerable<string> DTypes() =>
        Environment.GetEnvironmentVariable("BENCH_DTYPES") is { Length: > 0 } only ? only.Split(',') : new[] { "float32", "bfloat16" };

    [ParamsSource(nameof(Devices))]
    public string Device { get; set; } = "cpu";

    public static IEnumerable<string> Devices() => BenchInputs.Devices();

    private BenchInputs _inputs = null!;
    private IPreferenceLoss _loss = null!;

    [GlobalSetup]
    public void Setup()
    {
        _inputs = new BenchInputs(B, DType == "bfloat16" ? ScalarType.BFloat16 : ScalarType.Float32, new Device(Device));
        _loss = BenchInputs.Create(Loss);
    }

    [GlobalCleanup]
    public void Cleanup() => _inputs.Dispose();

    /// <summary>Forward only, synchronised by reading the loss (so GPU time is counted).</summary>
    [Benchmark]
    public double Forward()
    {
        using var scope = NewDisposeScope();
        using var r = _loss.Compute(_inputs.Batch);
        return r.Loss.ToDouble();
    }

    /// <summary>Forward + backward, synchronised by reading a gradient element.</summary>
    [Benchmark]
    public double ForwardBackward() => _inputs.ForwardBackward(_loss);
}

/// <summary>What does RPO cost as B and D grow? (quadratic in B by design)</summary>
[MemoryDiagnoser]
public class RpoScalingBenchmarks
{
    [Params(8, 64, 256, 1024, 4096, 8192)]
    public int B { get; set; }

    [Params(384, 768)]
    public int D { get; set; }

    [ParamsSource(nameof(Devices))]
    public string Device { get; set; } = "cpu";

    public static IEnumerable<string> Devices() => BenchInputs.Devices();

    private BenchInputs _inputs = null!;
    private readonly RpoLoss _loss = new();

    [GlobalSetup]
    public void Setup() => _inputs = new BenchInputs(B, ScalarType.Float32, new Device(Device), D);

    [GlobalCleanup]
    public void Cleanup() => _inputs.Dispose();

    [Benchmark]
    public double ForwardBackward() => _inputs.ForwardBackward(_loss);
}

/// <summary>Sequence log-probs from logits: the chunked path against the naive fp32 log_softmax + gather (forward + backward).</summary>
[MemoryDiagnoser]
public class SequenceLogProbsBenchmarks
{
    [Params(1024, 8192, 32768)]
    public int V { get; set; }

    [Params("chunked", "naive")]
    public string Path { get; set; } = "chunked";

    [ParamsSource(nameof(Devices))]
    public string Device { get; set; } = "cpu";

    public static IEnumerable<string> Devices() => BenchInputs.Devices();

    private const int N = 4, T = 512;
    private Tensor _logits = null!, _labels = null!;

    [GlobalSetup]
    public void Setup()
    {
        manual_seed(0);
        _logits = randn(N, T, V, device: new Device(Device)).requires_grad_(true);
        _labels = randint(0, V, new long[] { N, T }, device: new Device(Device));
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _logits.Dispose();
        _labels.Dispose();
    }

    [Benchmark]
    public double ForwardBackward()
    {
        using var scope = NewDisposeScope();
        Tensor sum;
        if (Path == "chunked")
            sum = SequenceLogProbs.Compute(_logits, _labels, null, LabelAlignment.Aligned).Sum;
        else
            sum = nn.functional.log_softmax(_logits, 2).gather(2, _labels.unsqueeze(2)).squeeze(2).sum(1);
        sum.sum().backward();
        var g = _logits.grad!;
        double v = g[0, 0, 0].ToDouble();
        g.zero_();
        return v;
    }
}

/// <summary>
/// Many short sequences (20,000 of 4 tokens): the chunked path processes whole sequences per block, so it launches a
/// few large kernels instead of a few per sequence (the per-sequence loop it replaced took about 2.9 s here).
/// </summary>
[MemoryDiagnoser]
public class ShortSequenceLogProbsBenchmarks
{
    [Params("chunked", "naive")]
    public string Path { get; set; } = "chunked";

    private const int N = 20_000, T = 4, V = 64;
    private Tensor _logits = null!, _labels = null!;

    [GlobalSetup]
    public void Setup()
    {
        manual_seed(0);
        _logits = randn(N, T, V).requires_grad_(true);
        _labels = randint(0, V, new long[] { N, T });
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _logits.Dispose();
        _labels.Dispose();
    }

    [Benchmark]
    public double ForwardBackward()
    {
        using var scope = NewDisposeScope();
        Tensor sum = Path == "chunked"
            ? SequenceLogProbs.Compute(_logits, _labels, null, LabelAlignment.ShiftByOne).Sum
            : nn.functional.log_softmax(_logits.narrow(1, 0, T - 1), 2).gather(2, _labels.narrow(1, 1, T - 1).unsqueeze(2)).squeeze(2).sum(1);
        sum.sum().backward();
        double v = _logits.grad![0, 0, 0].ToDouble();
        _logits.grad = null;
        return v;
    }
}
