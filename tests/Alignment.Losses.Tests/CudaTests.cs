using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>Runs only where a CUDA device and a CUDA libtorch are present; otherwise skipped with the reason shown.</summary>
public sealed class CudaTheoryAttribute : TheoryAttribute
{
    public CudaTheoryAttribute()
    {
        if (!CudaAvailable.Value)
            Skip = "No CUDA device (torch.cuda.is_available() is false with the referenced libtorch backend); CUDA value tests run on GPU machines.";
    }

    static readonly Lazy<bool> CudaAvailable = new(() => { try { return cuda.is_available(); } catch (Exception) { return false; } });
}

public class CudaTests
{
    public static IEnumerable<object[]> Names => LossCatalog.Names;

    [CudaTheory, MemberData(nameof(Names))]
    public void Values_and_gradients_match_the_oracle_on_cuda_and_stay_on_the_device(string name)
    {
        var c = LossCatalog.Get(name);
        var x = Generators.One(3, 12);
        OracleTests.AssertMatchesOracle(c, x, ScalarType.Float64, 1e-10, 1e-10, CUDA);
        OracleTests.AssertMatchesOracle(c, x, ScalarType.Float32, 1e-5, 1e-5, CUDA);
        OracleTests.AssertMatchesOracle(c, x, ScalarType.BFloat16, 1e-5, 8e-3, CUDA);
        using var scope = NewDisposeScope();
        using var r = c.Make(x).Compute(c.Batch(new BatchTensors(x, ScalarType.Float32, CUDA)));
        Assert.Equal(DeviceType.CUDA, r.Loss.device_type);
        Assert.Equal(DeviceType.CUDA, r.PerExample.device_type);
    }
}
