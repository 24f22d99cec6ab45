using System.Diagnostics;
using Alignment.Losses;
using Alignment.Losses.Internal.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Benchmarks;

/// <summary>
/// GPU peak memory without a memory-statistics API (TorchSharp 0.107 has none): each case runs in a fresh child process,
/// and the drop in the device's free memory (cuMemGetInfo) across the call is reported. libtorch's caching allocator
/// keeps every block it reserved, so that drop is the call's peak reserved growth: an upper bound on the peak of extra
/// live memory (block rounding included). Also finds the largest RPO batch whose forward + backward fits.
/// </summary>
internal static class CudaMemory
{
    private const int LogitsN = 8, LogitsT = 1024, Vocab = 128_256;

    /// <summary>The report's sections, in order; <c>--cuda-memory --sections logprobs,linear</c> runs some of them.</summary>
    public static readonly string[] Sections = { "logprobs", "linear", "rpo" };

    /// <summary>
    /// Parent side: runs every case of the chosen sections in a child and prints INFO lines; returns the number of failed
    /// children. <paramref name="linearT"/> are the sequence lengths of the fused-linear cases (default 256, 512, 1024).
    /// </summary>
    public static int Report(IReadOnlyCollection<string>? sections = null, IReadOnlyList<int>? linearT = null)
    {
        sections ??= Sections;
        var unknown = sections.Except(Sections).ToList();
        if (unknown.Count > 0)
        {
            Console.WriteLine($"cuda-memory: unknown section(s) {string.Join(", ", unknown)}; known: {string.Join(", ", Sections)}");
            return 2;
        }
        if (!cuda.is_available())
        {
            Console.WriteLine("cuda-memory: no CUDA device (torch.cuda.is_available() is false)");
            return 2;
        }
        int failures = 0;
        string Mib(long bytes) => $"{bytes / 1048576.0:F0} MiB";

        // extra memory of sequence log-probs from bf16 logits 8 x 1024 x 128256 (target: <= 64 MiB for the forward)
        foreach (var path in sections.Contains("logprobs") ? new[] { "kernel", "chunked", "naive" } : Array.Empty<string>())
            foreach (var phase in new[] { "forward", "backward" })
            {
                var (ok, bytes, text) = Spawn("logprobs", path, phase);
                if (!ok) { failures++; Console.WriteLine($"FAIL memory logprobs {path} {phase}: {text}"); continue; }
                Console.WriteLine($"INFO memory sequence log-probs bf16 {LogitsN}x{LogitsT}x{Vocab}, {path}, {phase}: +{Mib(bytes)} peak reserved" +
                                  (phase == "backward" ? " beyond the logits' gradient" : ""));
            }

        // fused linear log-probs against the materialised logits, N = 16, H = 4096, V = 128256, over T
        foreach (var t in sections.Contains("linear") ? linearT ?? new[] { 256, 512, 1024 } : Array.Empty<int>())
            foreach (var path in new[] { "fused", "materialised" })
            {
                var (ok, bytes, text) = Spawn("linear", path, t.ToString());
                Console.WriteLine(ok
                    ? $"INFO memory linear log-probs N=16 T={t} H=4096 V={Vocab} bf16, {path}, forward+backward: +{Mib(bytes)} peak reserved beyond inputs and their gradients"
                    : $"INFO memory linear log-probs T={t} {path}: {text}");
            }

        if (!sections.Contains("rpo")) return failures;
        // the largest RPO batch (D = 768, float32) whose forward + backward fits: doubling, then bisection to 1024
        int good = 0, bad = 0;
        for (int b = 4096; b <= 1 << 20; b *= 2)
        {
            var (ok, bytes, text) = Spawn("rpo", b.ToString());
            Console.WriteLine($"INFO memory rpo B={b}: {(ok ? "+" + Mib(bytes) : text)}");
            if (ok) good = b; else { bad = b; break; }
        }
        while (bad - good > 1024 && good > 0)
        {
            int mid = (good + bad) / 2 / 1024 * 1024;
            var (ok, bytes, text) = Spawn("rpo", mid.ToString());
            Console.WriteLine($"INFO memory rpo B={mid}: {(ok ? "+" + Mib(bytes) : text)}");
            if (ok) good = mid; else bad = mid;
        }
        Console.WriteLine(bad == 0
            ? $"INFO largest RPO batch (D=768, fp32, forward+backward): at least {good}"
            : $"INFO largest RPO batch (D=768, fp32, forward+backward): {good} (fails at {bad})");
        return failures;
    }

    private static (bool Ok, long Bytes, string Text) Spawn(params string[] args)
    {
        var psi = new ProcessStartInfo(Environment.ProcessPath!) { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(typeof(CudaMemory).Assembly.Location);
        psi.ArgumentList.Add("--cuda-memory");
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        string stdout = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        var line = stdout.Split('\n').LastOrDefault(l => l.StartsWith("MEMORY ", StringComparison.Ordinal) || l.StartsWith("OOM", StringComparison.Ordinal));
        if (line is not null && line.StartsWith("MEMORY ", StringComparison.Ordinal)) return (true, long.Parse(line[7..].Trim()), "");
        if (line is not null) return (false, 0, "does not fit (" + line[3..].Trim() + ")");
        return (false, 0, $"child exited {p.ExitCode}: {stdout.Trim()} {stderr.Result.Trim()}".Trim());
    }

    /// <summary>Child side: `--cuda-memory logprobs kernel|chunked|naive forward|backward`, `linear fused|materialised T`, `rpo B`.</summary>
    public static int Child(string[] args)
    {
        InitializeDeviceType(DeviceType.CUDA);
        var driver = CudaDriver.TryLoad(out var why) ?? throw new InvalidOperationException("CUDA driver: " + why);
        try
        {
            long bytes = args[0] switch
            {
                "logprobs" => LogProbs(driver, args[1], args[2] == "backward"),
                "linear" => Linear(driver, args[1], int.Parse(args[2])),
                "rpo" => Rpo(driver, int.Parse(args[1])),
                _ => throw new ArgumentException("unknown case " + args[0]),
            };
            Console.WriteLine($"MEMORY {bytes}");
            return 0;
        }
        catch (Exception e) when (e.Message.Contains("out of memory", StringComparison.OrdinalIgnoreCase))
        {
            Console.WriteLine("OOM " + e.Message.Split('\n')[0]);
            return 0;
        }
    }

    /// <summary>Runs <paramref name="call"/> once and returns the drop in free device memory across it.</summary>
    private static long Measure(CudaDriver driver, Action call)
    {
        cuda.synchronize(CUDA);
        long before = driver.MemoryInfo(0).Free;
        call();
        cuda.synchronize(CUDA);
        return before - driver.MemoryInfo(0).Free;
    }

    /// <summary>Per-sequence log-prob sums [N] by one of the three paths.</summary>
    private static Tensor LogProbsOf(string path, Tensor logits, Tensor labels)
    {
        if (path == "naive")
            return nn.functional.log_softmax(logits.to_type(ScalarType.Float32), 2).gather(2, labels.unsqueeze(2)).squeeze(2).sum(1);
        // "chunked" runs with ALIGNMENT_LOSSES_CUDA_KERNELS=0 (read on each call); "kernel" lets the fused kernels run
        Environment.SetEnvironmentVariable("ALIGNMENT_LOSSES_CUDA_KERNELS", path == "chunked" ? "0" : null);
        using var r = SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.Aligned);
        return r.Sum.alias();
    }

    private static long LogProbs(CudaDriver driver, string path, bool backward)
    {
        using (var scope = NewDisposeScope())                                   // warm-up: kernels compiled, handles created
        {
            var l = randn(1, 4, 1000, dtype: ScalarType.BFloat16, device: CUDA).requires_grad_(true);
            LogProbsOf(path, l, randint(0, 1000, new long[] { 1, 4 }, device: CUDA)).sum().backward();
        }
        var logits = randn(LogitsN, LogitsT, Vocab, dtype: ScalarType.BFloat16, device: CUDA).requires_grad_(true);
        var labels = randint(0, Vocab, new long[] { LogitsN, LogitsT }, device: CUDA);
        long gradBytes = backward ? logits.numel() * 2 : 0;
        return Measure(driver, () =>
        {
            using var scope = NewDisposeScope();
            var sum = LogProbsOf(path, logits, labels);
            if (backward) sum.sum().backward();
        }) - gradBytes;
    }

    private static long Linear(CudaDriver driver, string path, int t)
    {
        const int n = 16, h = 4096;
        Tensor Run(Tensor hidden, Tensor weight, Tensor labels) => path == "fused"
            ? FusedLinearLogProbs.Compute(hidden, weight, null, labels, null, LabelAlignment.Aligned).Sum
            : SequenceLogProbs.Compute(hidden.matmul(weight.t()), labels, null, LabelAlignment.Aligned).Sum;
        using (var scope = NewDisposeScope())
        {
            var hs = randn(1, 4, 64, dtype: ScalarType.BFloat16, device: CUDA).requires_grad_(true);
            var ws = randn(100, 64, dtype: ScalarType.BFloat16, device: CUDA).requires_grad_(true);
            Run(hs, ws, randint(0, 100, new long[] { 1, 4 }, device: CUDA)).sum().backward();
        }
        var hidden = (randn(n, t, h, device: CUDA) * 0.05).to_type(ScalarType.BFloat16).requires_grad_(true);
        var weight = (randn(Vocab, h, device: CUDA) * 0.02).to_type(ScalarType.BFloat16).requires_grad_(true);
        var lab = randint(0, Vocab, new long[] { n, t }, device: CUDA);
        long gradBytes = (hidden.numel() + weight.numel()) * 2;
        return Measure(driver, () =>
        {
            using var scope = NewDisposeScope();
            Run(hidden, weight, lab).sum().backward();
        }) - gradBytes;
    }

    private static long Rpo(CudaDriver driver, int b)
    {
        using (var warm = new BenchInputs(64, ScalarType.Float32, CUDA)) warm.ForwardBackward(new RpoLoss());
        using var inputs = new BenchInputs(b, ScalarType.Float32, CUDA);
        return Measure(driver, () => inputs.ForwardBackward(new RpoLoss()));
    }
}
