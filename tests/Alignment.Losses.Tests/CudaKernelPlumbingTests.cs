using Alignment.Losses;
using Alignment.Losses.Internal.Cuda;

namespace Alignment.Losses.Tests;

/// <summary>Runs when an NVRTC library can be loaded (compiling needs no GPU); otherwise skipped with the reason.</summary>
public sealed class NvrtcFactAttribute : FactAttribute
{
    public NvrtcFactAttribute()
    {
        if (Loaded.Value.Nvrtc is null) Skip = "No NVRTC library here (" + Loaded.Value.Failure + ")";
    }

    internal static readonly Lazy<(Nvrtc? Nvrtc, string Failure)> Loaded = new(() =>
    {
        var n = Nvrtc.TryLoad(NvrtcLocator.Candidates(), out var failure);
        return (n, failure);
    });
}

/// <summary>The CUDA kernel plumbing that can be tested without a GPU, plus the kernels themselves where one is present.</summary>
public class CudaKernelPlumbingTests
{
    static IEnumerable<string> Dir(Dictionary<string, string[]> tree, string dir) => tree.TryGetValue(dir, out var files) ? files : Array.Empty<string>();

    [Fact]
    public void Locator_looks_beside_libtorch_in_pip_wheels_cuda_home_and_ld_library_path_in_that_order()
    {
        const string maps = """
            7f00-7f01 r-xp 00000000 08:01 123 /opt/venv/lib/python3.12/site-packages/torch/lib/libtorch_cuda.so
            7f02-7f03 r-xp 00000000 08:01 124 /usr/lib/x86_64-linux-gnu/libc.so.6
            7f04-7f05 r--p 00000000 08:01 123 /opt/venv/lib/python3.12/site-packages/torch/lib/libtorch_cuda.so
            """;
        var tree = new Dictionary<string, string[]>
        {
            ["/opt/venv/lib/python3.12/site-packages/torch/lib"] = new[] { "libtorch_cuda.so", "libnvrtc-5c3c4d2e.so.12", "libnvrtc-builtins-1a2b.so.12.8" },
            ["/opt/venv/lib/python3.12/site-packages/nvidia/cuda_nvrtc/lib"] = new[] { "libnvrtc.so.12", "libnvrtc-builtins.so.12.8" },
            ["/usr/local/cuda/lib64"] = new[] { "libnvrtc.so", "libnvrtc.so.12", "libcudart.so.12" },
            ["/extra"] = new[] { "libnvrtc.so.13" },
        };
        var env = new Dictionary<string, string?> { ["CUDA_HOME"] = "/usr/local/cuda", ["LD_LIBRARY_PATH"] = "/extra:/missing" };
        var found = NvrtcLocator.Candidates(maps, k => env.GetValueOrDefault(k), d => Dir(tree, d));
        Assert.Equal(new[]
        {
            "/opt/venv/lib/python3.12/site-packages/torch/lib/libnvrtc-5c3c4d2e.so.12",
            "/opt/venv/lib/python3.12/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
            "/usr/local/cuda/lib64/libnvrtc.so.12",
            "/usr/local/cuda/lib64/libnvrtc.so",
            "/extra/libnvrtc.so.13",
            "libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2",
        }, found);
        Assert.DoesNotContain(found, f => f.Contains("builtins", StringComparison.Ordinal));

        env[NvrtcLocator.OverrideVariable] = "/my/libnvrtc.so.12";
        Assert.Equal("/my/libnvrtc.so.12", NvrtcLocator.Candidates(maps, k => env.GetValueOrDefault(k), d => Dir(tree, d))[0]);
    }

    [Fact]
    public void A_missing_nvrtc_is_a_readable_reason_not_a_crash()
    {
        var n = Nvrtc.TryLoad(new[] { "/nonexistent/libnvrtc.so.12", "libnvrtc-does-not-exist.so" }, out var failure);
        Assert.Null(n);
        Assert.Contains("libnvrtc was not found", failure);
        Assert.Contains(NvrtcLocator.OverrideVariable, failure);
    }

    [Fact]
    public void Cpu_logits_use_the_chunked_path_and_never_touch_cuda()
    {
        using var scope = NewDisposeScope();
        string before = SequenceLogProbs.CudaKernelStatus;
        using var r = SequenceLogProbs.Compute(randn(2, 3, 5), randint(0, 5, new long[] { 2, 3 }), null, LabelAlignment.Aligned);
        Assert.Equal(before, SequenceLogProbs.CudaKernelStatus);
    }

    [NvrtcFact]
    public void Kernel_source_compiles_to_ptx_with_every_entry_point()
    {
        var nvrtc = NvrtcFactAttribute.Loaded.Value.Nvrtc!;
        var ptx = nvrtc.CompileToPtx(LogProbKernelSource.Source, "alignment_logprobs.cu", new[] { "--gpu-architecture=compute_80", "--std=c++14" });
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16 })
        {
            Assert.Contains(".entry " + LogProbKernelSource.ForwardName(dtype), ptx);
            Assert.Contains(".entry " + LogProbKernelSource.BackwardName(dtype), ptx);
            Assert.Contains(".entry " + LogProbKernelSource.StatsForwardName(dtype), ptx);
        }
    }

    [NvrtcFact]
    public void A_compile_error_reports_nvrtcs_log()
    {
        var nvrtc = NvrtcFactAttribute.Loaded.Value.Nvrtc!;
        var e = Assert.Throws<InvalidOperationException>(() => nvrtc.CompileToPtx("extern \"C\" __global__ void k() { undefined_symbol(); }", "bad.cu", new[] { "--gpu-architecture=compute_80" }));
        Assert.Contains("undefined_symbol", e.Message);
    }

    public static IEnumerable<object[]> KernelDTypes => new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16 }.Select(d => new object[] { d });

    [CudaTheory, MemberData(nameof(KernelDTypes))]
    public void On_cuda_the_fused_kernels_are_active_and_match_the_chunked_path(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var logits = (randn(4, 33, 50_257, device: CUDA) * 3).to_type(dtype);
        var labels = randint(0, 50_257, new long[] { 4, 33 }, device: CUDA);
        var mask = ones(4, 33, device: CUDA);
        mask[2] = zeros(33, device: CUDA);
        var a = logits.clone().requires_grad_(true);
        var b = logits.clone().requires_grad_(true);
        using var fused = SequenceLogProbs.Compute(a, labels, mask, LabelAlignment.ShiftByOne);
        Assert.StartsWith("fused CUDA kernels active", SequenceLogProbs.CudaKernelStatus);
        using var chunked = SequenceLogProbs.ComputeChunked(b, labels, mask, LabelAlignment.ShiftByOne);
        fused.Sum.sum().backward();
        chunked.Sum.sum().backward();
        double tol = dtype == ScalarType.Float32 ? 1e-5 : 1e-3;
        Assert.True((fused.Sum - chunked.Sum).abs().max().ToDouble() <= tol * chunked.Sum.abs().max().ToDouble());
        Assert.True((a.grad!.to_type(ScalarType.Float32) - b.grad!.to_type(ScalarType.Float32)).abs().max().ToDouble() <= (dtype == ScalarType.Float32 ? 1e-6 : 1e-2));
    }

    [CudaTheory, MemberData(nameof(KernelDTypes))]
    public void On_cuda_the_statistics_kernel_matches_the_chunked_path(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var logits = (randn(4, 17, 32_000, device: CUDA) * 3).to_type(dtype);
        var labels = randint(0, 32_000, new long[] { 4, 17 }, device: CUDA);
        var options = new SequenceLogProbsOptions { StepStatistics = true, WpoTerms = true };
        using var fused = SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.ShiftByOne, options);
        Assert.StartsWith("fused CUDA kernels active", SequenceLogProbs.CudaKernelStatus);
        using var chunked = SequenceLogProbs.ComputeChunked(logits, labels, null, LabelAlignment.ShiftByOne, options);
        double tol = dtype == ScalarType.Float32 ? 1e-4 : 1e-2;
        foreach (var (a, b) in new[] { (fused.EntropySum!, chunked.EntropySum!), (fused.LogitMeanSum!, chunked.LogitMeanSum!), (fused.CorrectTokens!, chunked.CorrectTokens!), (fused.WpoTerm!, chunked.WpoTerm!) })
            Assert.True((a - b).abs().max().ToDouble() <= tol * Math.Max(1, b.abs().max().ToDouble()));
    }
}
