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

    [Params("float32", "bfloat16")]
    public string DType { get; set; } = "float32";

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
