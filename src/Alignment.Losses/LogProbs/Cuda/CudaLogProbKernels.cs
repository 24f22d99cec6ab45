using System.Diagnostics;
using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal.Cuda;

/// <summary>
/// Compiles, caches (per device and dtype), self-tests and launches the fused log-prob kernels. Whenever they cannot be
/// used (no NVRTC, no driver, a compile error, a failed self-test, or ALIGNMENT_LOSSES_CUDA_KERNELS=0) the caller falls
/// back to the chunked path; the reason is traced once and kept in <see cref="Status"/>.
/// </summary>
internal static unsafe class CudaLogProbKernels
{
    internal sealed record Kernels(IntPtr Forward, IntPtr Backward, IntPtr StatsForward);

    private static readonly object Gate = new();
    private static readonly Dictionary<(int Device, ScalarType DType), Kernels?> Cache = new();
    private static readonly HashSet<string> Reported = new();
    private static CudaDriver? _driver;
    private static Nvrtc? _nvrtc;
    private static string? _loadFailure;
    private static delegate* unmanaged<IntPtr, IntPtr> _storageDataPtr;

    /// <summary>What the last CUDA call of <see cref="SequenceLogProbs"/> used, or why it fell back.</summary>
    internal static string Status { get; private set; } = "not used yet (no CUDA logits seen)";

    internal static bool DisabledByEnvironment => Environment.GetEnvironmentVariable("ALIGNMENT_LOSSES_CUDA_KERNELS") == "0";

    /// <summary>The kernels for this device and dtype, or null (then <see cref="Status"/> says why).</summary>
    internal static Kernels? TryGet(Device device, ScalarType dtype)
    {
        lock (Gate)
        {
            var key = (device.index < 0 ? 0 : (int)device.index, dtype);
            if (Cache.TryGetValue(key, out var cached))
            {
                if (cached is not null) Status = $"fused CUDA kernels active on cuda:{key.Item1} for {dtype} (NVRTC {_nvrtc!.Path})";
                return cached;
            }
            Kernels? kernels = null;
            try
            {
                kernels = Build(key.Item1, dtype);
                // provisional entry: the self-test goes through SequenceLogProbs.Compute, which comes back here (same
                // thread, re-entrant lock) and must find these kernels rather than build and self-test again
                Cache[key] = kernels;
                SelfTest(device, dtype);
                Status = $"fused CUDA kernels active on cuda:{key.Item1} for {dtype} (NVRTC {_nvrtc!.Path})";
            }
            catch (Exception e) when (e is InvalidOperationException or DllNotFoundException or EntryPointNotFoundException or ExternalException)
            {
                kernels = null;
                Fallback($"fused CUDA kernels unavailable on cuda:{key.Item1} for {dtype}; using the chunked path: {e.Message}");
            }
            Cache[key] = kernels;
            return kernels;
        }
    }

    private static void Fallback(string reason)
    {
        Status = reason;
        if (Reported.Add(reason)) Trace.TraceWarning("Alignment.Losses: " + reason);
    }

    private static Kernels Build(int ordinal, ScalarType dtype)
    {
        if (DisabledByEnvironment) throw new InvalidOperationException("disabled by ALIGNMENT_LOSSES_CUDA_KERNELS=0");
        if (_loadFailure is not null) throw new InvalidOperationException(_loadFailure);
        if (_driver is null)
        {
            _driver = CudaDriver.TryLoad(out var driverFailure);
            if (_driver is null) throw new InvalidOperationException(_loadFailure = driverFailure);
            _nvrtc = Nvrtc.TryLoad(NvrtcLocator.Candidates(), out var nvrtcFailure);
            if (_nvrtc is null) { _driver = null; throw new InvalidOperationException(_loadFailure = nvrtcFailure); }
            var lib = NativeLibrary.Load("LibTorchSharp", typeof(torch).Assembly, null);
            _storageDataPtr = (delegate* unmanaged<IntPtr, IntPtr>)NativeLibrary.GetExport(lib, "THSStorage_data_ptr");
        }
        var (major, minor) = _driver.UseDevice(ordinal);
        var ptx = _nvrtc!.CompileToPtx(LogProbKernelSource.Source, "alignment_logprobs.cu",
            new[] { $"--gpu-architecture=compute_{major}{minor}", "--std=c++17" });
        var module = _driver.LoadModule(ptx);
        return new Kernels(_driver.GetFunction(module, LogProbKernelSource.ForwardName(dtype)),
                           _driver.GetFunction(module, LogProbKernelSource.BackwardName(dtype)),
                           _driver.GetFunction(module, LogProbKernelSource.StatsForwardName(dtype)));
    }

    /// <summary>Device address of the tensor's first element.</summary>
    internal static IntPtr DataPtr(Tensor t) => _storageDataPtr(t.Handle) + (nint)(t.storage_offset() * t.ElementSize);

    /// <summary>Forward: lse [rows] and token log-probs [rows] (fp32) of a [N, T, V] view with unit stride along V.</summary>
    internal static (Tensor Lse, Tensor TokenLogp) LaunchForward(Kernels k, Tensor logits, Tensor targets)
    {
        long n = logits.shape[0], t = logits.shape[1], v = logits.shape[2], rows = n * t;
        var lse = empty(rows, dtype: ScalarType.Float32, device: logits.device);
        var logp = empty(rows, dtype: ScalarType.Float32, device: logits.device);
        _driver!.UseDevice(logits.device.index < 0 ? 0 : logits.device.index);
        _driver.Launch(k.Forward, rows, LogProbKernelSource.BlockSize,
            DataPtr(logits), DataPtr(targets), DataPtr(lse), DataPtr(logp), rows, t, v, logits.stride(0), logits.stride(1));
        return (lse, logp.view(n, t));
    }

    /// <summary>
    /// Forward with statistics: lse [rows], token log-probs [N, T] and the per-token statistics [4, N, T] (fp32; rows as in
    /// <see cref="LogProbKernelSource.StatsRows"/>) of a [N, T, V] view with unit stride along V.
    /// </summary>
    internal static (Tensor Lse, Tensor TokenLogp, Tensor Stats) LaunchStatsForward(Kernels k, Tensor logits, Tensor targets)
    {
        long n = logits.shape[0], t = logits.shape[1], v = logits.shape[2], rows = n * t;
        var lse = empty(rows, dtype: ScalarType.Float32, device: logits.device);
        var logp = empty(rows, dtype: ScalarType.Float32, device: logits.device);
        var stats = empty(LogProbKernelSource.StatsRows, rows, dtype: ScalarType.Float32, device: logits.device);
        _driver!.UseDevice(logits.device.index < 0 ? 0 : logits.device.index);
        _driver.Launch(k.StatsForward, rows, LogProbKernelSource.BlockSize,
            DataPtr(logits), DataPtr(targets), DataPtr(lse), DataPtr(logp), DataPtr(stats), rows, t, v, logits.stride(0), logits.stride(1));
        return (lse, logp.view(n, t), stats.view(LogProbKernelSource.StatsRows, n, t));
    }

    /// <summary>
    /// Backward: writes grad [N, T, V] (logits' dtype, unit stride along V) into <paramref name="grad"/> from per-token upstream
    /// gradients g [N, T] (fp32, 0 where masked).
    /// </summary>
    internal static void LaunchBackward(Kernels k, Tensor logits, Tensor targets, Tensor lse, Tensor g, Tensor grad)
    {
        long n = logits.shape[0], t = logits.shape[1], v = logits.shape[2], rows = n * t;
        if (grad.stride(2) != 1 || grad.dtype != logits.dtype || !grad.shape.SequenceEqual(logits.shape))
            throw new InvalidOperationException($"the gradient buffer must match the logits with a unit stride along V; got {grad.dtype} {string.Join("x", grad.shape)}.");
        _driver!.UseDevice(logits.device.index < 0 ? 0 : logits.device.index);
        _driver.Launch(k.Backward, rows, LogProbKernelSource.BlockSize,
            DataPtr(logits), DataPtr(targets), DataPtr(lse), DataPtr(g), DataPtr(grad), rows, t, v,
            logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1));
    }

    /// <summary>Compares the kernels with the chunked path on a small random problem (V not a multiple of the block, a masked row).</summary>
    private static void SelfTest(Device device, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var logits = (randn(3, 5, 1000, device: device) * 4).to_type(dtype);
        var labels = randint(0, 1000, new long[] { 3, 5 }, device: device);
        var mask = ones(3, 5, device: device);
        mask[1, 2] = tensor(0f, device: device);
        logits[0, 1, 7] = tensor(float.NegativeInfinity, device: device);   // a -inf logit (a banned token) in a valid row
        logits[2, 3, 11] = logits[2, 3].max();                              // a tie for the argmax
        labels[0, 2] = tensor(8L, device: device);
        labels[2, 4] = tensor(11L, device: device);                         // (shifted: position 3 predicts label 4)
        var fused = logits.clone().requires_grad_(true);
        var chunked = logits.clone().requires_grad_(true);
        var options = new SequenceLogProbsOptions { ChunkTokens = 2, StepStatistics = true, WpoTerms = true };
        using var a = SequenceLogProbs.Compute(fused, labels, mask, LabelAlignment.ShiftByOne, options);
        using var b = SequenceLogProbs.ComputeChunked(chunked, labels, mask, LabelAlignment.ShiftByOne, options);
        double statsError = new[] { (a.WpoTerm!, b.WpoTerm!), (a.EntropySum!, b.EntropySum!), (a.LogitMeanSum!, b.LogitMeanSum!), (a.CorrectTokens!, b.CorrectTokens!) }
            .Max(p => (p.Item1 - p.Item2).abs().max().ToDouble() / Math.Max(1, p.Item2.abs().max().ToDouble()));
        var w = arange(1, 4, dtype: ScalarType.Float32, device: device);
        (a.Sum * w).sum().backward();
        (b.Sum * w).sum().backward();
        double valueError = (a.Sum - b.Sum).abs().max().ToDouble() / Math.Max(1, b.Sum.abs().max().ToDouble());
        double gradError = (fused.grad!.to_type(ScalarType.Float32) - chunked.grad!.to_type(ScalarType.Float32)).abs().max().ToDouble();
        double tolerance = dtype == ScalarType.Float32 ? 1e-5 : 2e-2;
        if (!(valueError <= tolerance && gradError <= tolerance && statsError <= tolerance))
            throw new InvalidOperationException(
                $"self-test against the chunked path failed (value error {valueError:G3}, gradient error {gradError:G3}, statistics error {statsError:G3})");
    }
}
