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
        void Sync() { if (device.type == DeviceType.CUDA) cuda.synchronize(device); }
        double Time(Action a)
        {
            for (int i = 0; i < 3; i++) a();
            Sync();
            var times = new List<double>();
            for (int i = 0; i < 10; i++)
            {
                var sw = Stopwatch.StartNew();
                a();
                Sync();
                times.Add(sw.Elapsed.TotalMilliseconds);
            }
            times.Sort();
            return times[5];
        }
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
