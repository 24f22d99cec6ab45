using System.Diagnostics;
using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Benchmarks;

/// <summary>
/// `--cuda-check`: correctness on a GPU machine that has no .NET SDK (so no `dotnet test`). Compares every loss on CUDA
/// (float32) with the same loss on CPU in float64, checks the fused log-prob kernels against the chunked path, and
/// times sequence log-probs on bf16 logits 8 x 1024 x 128256 against a device-to-device copy of the same bytes (the
/// bandwidth ceiling). `--cuda-check --rehearse` runs the same checks with the CPU standing in for the GPU (float32 CPU
/// against float64 CPU, the default log-prob path against the chunked one, a smaller timing case), so that the GPU
/// script's plumbing is exercised on a machine without one. Exit code 0 when every check passes.
/// </summary>
internal static class DeviceCheck
{
    public static int Run(bool rehearse)
    {
        if (!rehearse && !cuda.is_available())
        {
            Console.WriteLine("cuda-check: no CUDA device (torch.cuda.is_available() is false); --rehearse runs the checks on the CPU");
            return 2;
        }
        var device = rehearse ? CPU : CUDA;
        var deviceType = device.type;
        Console.WriteLine(rehearse ? "cuda-check rehearsal: the CPU stands in for the GPU" : "cuda-check on " + device);
        int failures = 0;
        void Report(string what, bool ok, string detail)
        {
            Console.WriteLine($"{(ok ? "PASS" : "FAIL")} {what}: {detail}");
            if (!ok) failures++;
        }
        void Guarded(string what, Action check)
        {
            try { check(); }
            catch (Exception e) { Report(what, false, $"{e.GetType().Name}: {e.Message.Split('\n')[0]}"); }
        }

        foreach (var name in BenchInputs.LossNames)
            Guarded($"{name} on {deviceType}", () =>
            {
                using var scope = NewDisposeScope();
                using var gpu = new BenchInputs(64, ScalarType.Float32, device);
                using var cpu = new BenchInputs(64, ScalarType.Float64, CPU);
                // one instance per device: BCO's running mean must see each batch once
                using var rg = BenchInputs.Create(name).Compute(gpu.BatchFor(name));
                using var rc = BenchInputs.Create(name).Compute(cpu.BatchFor(name));
                rg.Loss.backward();
                rc.Loss.backward();
                double value = Math.Abs(rg.Loss.ToDouble() - rc.Loss.ToDouble()) / Math.Max(1, Math.Abs(rc.Loss.ToDouble()));
                double grad = (gpu.PolicyChosen.grad!.cpu().to_type(ScalarType.Float64) - cpu.PolicyChosen.grad!).abs().max().ToDouble()
                              / Math.Max(1e-12, cpu.PolicyChosen.grad!.abs().max().ToDouble());
                bool onDevice = rg.Loss.device_type == deviceType;
                Report($"{name} on {deviceType} float32 vs float64 cpu", value < 1e-4 && grad < 1e-4 && onDevice,
                    $"value rel err {value:G3}, grad rel err {grad:G3}, result on {rg.Loss.device_type}");
            });

        // distillation, fused from both heads, every divergence (and the teacher's top-k with the student's tail): device float32 vs cpu float64
        foreach (var divergence in new[] { TokenDivergence.Jsd(0.5), TokenDivergence.ForwardKl(), TokenDivergence.ReverseKl(0.8), TokenDivergence.TotalVariation(),
                     TokenDivergence.ReverseKl().WithTopK(16, studentTail: true) })
            Guarded($"distillation {divergence} on {deviceType}", () =>
            {
                using var scope = NewDisposeScope();
                var g = new Generator(5);
                var h = randn(new long[] { 4, 33, 64 }, generator: g, dtype: ScalarType.Float64);
                var w = randn(new long[] { 1_000, 64 }, generator: g, dtype: ScalarType.Float64) / 8;
                var ht = randn(new long[] { 4, 33, 96 }, generator: g, dtype: ScalarType.Float64);
                var wt = randn(new long[] { 1_000, 96 }, generator: g, dtype: ScalarType.Float64) / 10;
                var labels = randint(0, 1_000, new long[] { 4, 33 }, generator: g);
                var loss = new DistillationLoss(new DistillationOptions { Divergence = divergence, HardWeight = 0.5, ChunkTokens = 40 });
                double Run(Device d, ScalarType dtype, out Tensor gradW)
                {
                    var wd = w.to(dtype, d).requires_grad_(true);
                    using var r = loss.Compute(DistillationStudent.FromHead(h.to(dtype, d), wd), DistillationTeacher.FromHead(ht.to(dtype, d), wt.to(dtype, d)),
                        labels.to(d), null, LabelAlignment.ShiftByOne);
                    r.Backward();
                    if (r.Loss.device_type != d.type) throw new InvalidOperationException($"the loss came back on {r.Loss.device_type}");
                    gradW = wd.grad!.cpu().to_type(ScalarType.Float64);
                    return r.Loss.ToDouble();
                }
                double onDevice = Run(device, ScalarType.Float32, out var gd), reference = Run(CPU, ScalarType.Float64, out var gc);
                double value = Math.Abs(onDevice - reference) / Math.Max(1, Math.Abs(reference));
                double grad = (gd - gc).abs().max().ToDouble() / Math.Max(1e-12, gc.abs().max().ToDouble());
                Report($"distillation {divergence} on {deviceType} float32 vs float64 cpu", value < 1e-4 && grad < 1e-3, $"value rel err {value:G3}, grad W rel err {grad:G3}");
            });
        Guarded("distillation timing", () => TimeDistillation(device, rehearse ? (256, 128, 8_192) : (4_096, 1_024, 128_256)));

        int vocab = rehearse ? 5_003 : 50_257;
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16 })
            Guarded($"sequence log-probs {dtype}", () =>
            {
                using var scope = NewDisposeScope();
                var logits = (randn(4, 33, vocab, device: device) * 3).to_type(dtype);
                var labels = randint(0, vocab, new long[] { 4, 33 }, device: device);
                var a = logits.clone().requires_grad_(true);
                var b = logits.clone().requires_grad_(true);
                using var fused = SequenceLogProbs.Compute(a, labels, null, LabelAlignment.ShiftByOne);
                string status = SequenceLogProbs.CudaKernelStatus;
                using var chunked = SequenceLogProbs.Compute(b, labels, null, LabelAlignment.ShiftByOne, new SequenceLogProbsOptions { ChunkTokens = 7 });
                fused.Sum.sum().backward();
                chunked.Sum.sum().backward();
                double value = (fused.Sum - chunked.Sum).abs().max().ToDouble() / Math.Max(1, chunked.Sum.abs().max().ToDouble());
                double grad = (a.grad!.to_type(ScalarType.Float32) - b.grad!.to_type(ScalarType.Float32)).abs().max().ToDouble();
                bool active = rehearse || status.StartsWith("fused CUDA kernels active", StringComparison.Ordinal);
                Report($"sequence log-probs {dtype}", value < 1e-4 && grad < 1e-2 && active, $"value rel err {value:G3}, grad max err {grad:G3}; {status}");
            });

        // the target case: bf16 logits 8 x 1024 x 128256 (2.1 GB); the rehearsal takes 2 x 128 x 32000
        Guarded("log-prob timing", () => TimeLogProbs(device, rehearse ? (2, 128, 32_000) : (8, 1024, 128_256)));

        Console.WriteLine(failures == 0 ? "cuda-check: all checks passed" : $"cuda-check: {failures} check(s) FAILED");
        return failures == 0 ? 0 : 1;
    }

    /// <summary>The median milliseconds of <paramref name="repeats"/> calls after <paramref name="warmups"/>, the device synchronised around each.</summary>
    private static double MedianMs(Device device, Action call, int warmups, int repeats)
    {
        void Sync() { if (device.type == DeviceType.CUDA) cuda.synchronize(device); }
        for (int i = 0; i < warmups; i++) call();
        Sync();
        var times = new List<double>();
        for (int i = 0; i < repeats; i++)
        {
            var sw = Stopwatch.StartNew();
            call();
            Sync();
            times.Add(sw.Elapsed.TotalMilliseconds);
        }
        times.Sort();
        return times[repeats / 2];
    }

    /// <summary>Median time of distillation (JSD 0.5) forward + backward, fused heads vs materialised logits, as an INFO line.</summary>
    private static void TimeDistillation(Device device, (int Tokens, int Hidden, int Vocab) shape)
    {
        using var scope = NewDisposeScope();
        var (tokens, hidden, vocab) = shape;
        var h = (randn(1, tokens, hidden, device: device) * 0.5).requires_grad_(true);
        var w = (randn(vocab, hidden, device: device) / Math.Sqrt(hidden)).requires_grad_(true);
        var ht = randn(1, tokens, hidden, device: device) * 0.5;
        var wt = randn(vocab, hidden, device: device) / Math.Sqrt(hidden);
        var labels = randint(0, vocab, new long[] { 1, tokens }, device: device);
        var loss = new DistillationLoss();
        double Time(bool fused)
        {
            void Step()
            {
                using var s = NewDisposeScope();
                using var r = fused
                    ? loss.Compute(DistillationStudent.FromHead(h, w), DistillationTeacher.FromHead(ht, wt), labels, null, LabelAlignment.Aligned)
                    : loss.Compute(h.matmul(w.t()), ht.matmul(wt.t()), labels, null, LabelAlignment.Aligned);
                r.Backward();
                h.grad = null;
                w.grad = null;
            }
            return MedianMs(device, Step, warmups: 2, repeats: 5);
        }
        double fusedMs = Time(true), materialisedMs = Time(false);
        Console.WriteLine($"INFO distillation JSD {tokens} tokens, H {hidden}, V {vocab}: fused heads {fusedMs:F2} ms, materialised logits {materialisedMs:F2} ms " +
                          $"(forward + backward; one [tokens, V] fp32 = {tokens * (double)vocab * 4 / (1 << 20):F0} MiB)");
    }

    /// <summary>
    /// Median times of sequence log-probs (forward; forward + backward) from bf16 logits, and of a copy of the logits
    /// (bytes read + written: the bandwidth ceiling), as INFO lines the GPU script's summary reads.
    /// </summary>
    private static void TimeLogProbs(Device device, (int N, int T, int V) shape)
    {
        using var scope = NewDisposeScope();
        var (n, t, v) = shape;
        var logits = randn(n, t, v, dtype: ScalarType.BFloat16, device: device).requires_grad_(true);
        var labels = randint(0, v, new long[] { n, t }, device: device);
        double bytes = logits.numel() * 2.0;
        double Time(Action a) => MedianMs(device, a, warmups: 3, repeats: 10);
        double copy = Time(() => { using var s = NewDisposeScope(); using var c = logits.detach().clone(); });
        double forward = Time(() => { using var s = NewDisposeScope(); using var r = SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.Aligned); });
        double both = Time(() =>
        {
            using var s = NewDisposeScope();
            using var r = SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.Aligned);
            r.Sum.sum().backward();
            logits.grad!.Dispose();
            logits.grad = null;
        });
        string label = $"bf16 {n}x{t}x{v}";
        Console.WriteLine($"INFO copy {label}: {copy:F2} ms ({2 * bytes / copy / 1e6:F0} GB/s read + written)");
        Console.WriteLine($"INFO sequence log-probs {label}: forward {forward:F2} ms ({bytes / forward / 1e6:F0} GB/s of logits read, " +
                          $"{forward / (copy / 2):F2}x the time to read them once at the copy's rate), forward+backward {both:F2} ms " +
                          $"(backward {both - forward:F2} ms); {SequenceLogProbs.CudaKernelStatus}");
    }
}
