using Alignment.Losses;
using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Benchmarks;

/// <summary>How do the losses compare at batch size B? Forward, and forward + backward, per device and input dtype.</summary>
[MemoryDiagnoser]
public class LossBenchmarks
{
    [ParamsSource(nameof(Losses))]
    public string Loss { get; set; } = "dpo";

    /// <summary>Every loss (<see cref="BenchInputs.LossNames"/>); BENCH_LOSSES=a,b,... keeps some, to split a long run.</summary>
    public static IEnumerable<string> Losses() =>
        Environment.GetEnvironmentVariable("BENCH_LOSSES") is { Length: > 0 } only ? only.Split(',') : BenchInputs.LossNames;

    [ParamsSource(nameof(Sizes))]
    public int B { get; set; }

    /// <summary>B = 8, 64, 1024, 4096; BENCH_SIZES=64 (or 64,1024) keeps some, for a quick run of one case.</summary>
    public static IEnumerable<int> Sizes() =>
        Environment.GetEnvironmentVariable("BENCH_SIZES") is { Length: > 0 } only ? only.Split(',').Select(int.Parse) : new[] { 8, 64, 1024, 4096 };

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
    private PreferenceBatch _batch = null!;

    [GlobalSetup]
    public void Setup()
    {
        _inputs = new BenchInputs(B, DType == "bfloat16" ? ScalarType.BFloat16 : ScalarType.Float32, new Device(Device));
        _loss = BenchInputs.Create(Loss);
        _batch = _inputs.BatchFor(Loss);
    }

    [GlobalCleanup]
    public void Cleanup() => _inputs.Dispose();

    /// <summary>Forward only, synchronised by reading the loss (so GPU time is counted).</summary>
    [Benchmark]
    public double Forward()
    {
        using var scope = NewDisposeScope();
        using var r = _loss.Compute(_batch);
        return r.Loss.ToDouble();
    }

    /// <summary>Forward + backward, synchronised by reading a gradient element.</summary>
    [Benchmark]
    public double ForwardBackward() => _inputs.ForwardBackward(_loss, _batch);
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

/// <summary>Random logits (with grad) and labels for the log-prob benchmarks; the gradient is dropped after each call.</summary>
public abstract class LogProbsBenchmarkBase
{
    protected Tensor Logits = null!, Labels = null!;

    protected void Create(int n, int t, int v, Device device)
    {
        manual_seed(0);
        Logits = randn(n, t, v, device: device).requires_grad_(true);
        Labels = randint(0, v, new long[] { n, t }, device: device);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        Logits.Dispose();
        Labels.Dispose();
    }

    /// <summary>Forward + backward of the chunked path or of the naive fp32 log_softmax + gather, synchronised by reading the gradient.</summary>
    protected double ForwardBackward(bool chunked, LabelAlignment alignment)
    {
        using var scope = NewDisposeScope();
        bool shift = alignment == LabelAlignment.ShiftByOne;
        long t = Logits.shape[1] - (shift ? 1 : 0);
        Tensor sum = chunked
            ? SequenceLogProbs.Compute(Logits, Labels, null, alignment).Sum
            : nn.functional.log_softmax(Logits.narrow(1, 0, t), 2).gather(2, Labels.narrow(1, shift ? 1 : 0, t).unsqueeze(2)).squeeze(2).sum(1);
        sum.sum().backward();
        double v = Logits.grad![0, 0, 0].ToDouble();
        Logits.grad = null;
        return v;
    }
}

/// <summary>Sequence log-probs from logits: the chunked path against the naive fp32 log_softmax + gather (forward + backward).</summary>
[MemoryDiagnoser]
public class SequenceLogProbsBenchmarks : LogProbsBenchmarkBase
{
    [Params(1024, 8192, 32768)]
    public int V { get; set; }

    [Params("chunked", "naive")]
    public string Path { get; set; } = "chunked";

    [ParamsSource(nameof(Devices))]
    public string Device { get; set; } = "cpu";

    public static IEnumerable<string> Devices() => BenchInputs.Devices();

    [GlobalSetup]
    public void Setup() => Create(4, 512, V, new Device(Device));

    [Benchmark]
    public double ForwardBackward() => ForwardBackward(Path == "chunked", LabelAlignment.Aligned);
}

/// <summary>
/// Many short sequences (20,000 of 4 tokens): the chunked path processes whole sequences per block, so it launches a
/// few large kernels instead of a few per sequence (the per-sequence loop it replaced took about 2.3 s here).
/// </summary>
[MemoryDiagnoser]
public class ShortSequenceLogProbsBenchmarks : LogProbsBenchmarkBase
{
    [Params("chunked", "naive")]
    public string Path { get; set; } = "chunked";

    [GlobalSetup]
    public void Setup() => Create(20_000, 4, 64, CPU);

    [Benchmark]
    public double ForwardBackward() => ForwardBackward(Path == "chunked", LabelAlignment.ShiftByOne);
}
