using System.Diagnostics;
using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Benchmarks;

/// <summary>
/// `--cuda-check`: correctness on a GPU machine that has no .NET SDK (so no `dotnet test`). Compares every loss on CUDA
/// (float32) with the same loss on CPU in float64, checks the fused log-prob kernels against the chunked path, and
/// times sequence log-probs on bf16 logits 8 x 1024 x 128256 (the target case of docs/benchmarks.md). Exit code 0 when every check passes.
/// </summary>
internal static class CudaCheck
{
    public static int Run()
    {
        if (!cuda.is_available())
        {
            Console.WriteLine("cuda-check: no CUDA device (torch.cuda.is_available() is false)");
            return 2;
        }
        int failures = 0;
        void Report(string what, bool ok, string detail)
        {
            Console.WriteLine($"{(ok ? "PASS" : "FAIL")} {what}: {detail}");
            if (!ok) failures++;
        }

        foreach (var name in BenchInputs.LossNames)
        {
            using var scope = NewDisposeScope();
            using var gpu = new BenchInputs(64, ScalarType.Float32, CUDA);
            using var cpu = new BenchInputs(64, ScalarType.Float64, CPU);
            // one instance per device: BCO's running mean must see each batch once
            using var rg = BenchInputs.Create(name).Compute(gpu.BatchFor(name));
            using var rc = BenchInputs.Create(name).Compute(cpu.BatchFor(name));
            rg.Loss.backward();
            rc.Loss.backward();
            double value = Math.Abs(rg.Loss.ToDouble() - rc.Loss.ToDouble()) / Math.Max(1, Math.Abs(rc.Loss.ToDouble()));
            double grad = (gpu.PolicyChosen.grad!.cpu().to_type(ScalarType.Float64) - cpu.PolicyChosen.grad!).abs().max().ToDouble()
                          / Math.Max(1e-12, cpu.PolicyChosen.grad!.abs().max().ToDouble());
            bool onDevice = rg.Loss.device_type == DeviceType.CUDA;
            Report($"{name} on cuda vs float64 cpu", value < 1e-4 && grad < 1e-4 && onDevice, $"value rel err {value:G3}, grad rel err {grad:G3}, on device {onDevice}");
        }

        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16 })
        {
            using var scope = NewDisposeScope();
            var logits = (randn(4, 33, 50_257, device: CUDA) * 3).to_type(dtype);
            var labels = randint(0, 50_257, new long[] { 4, 33 }, device: CUDA);
            var a = logits.clone().requires_grad_(true);
            var b = logits.clone().requires_grad_(true);
            using var fused = SequenceLogProbs.Compute(a, labels, null, LabelAlignment.ShiftByOne);
            string status = SequenceLogProbs.CudaKernelStatus;
            using var chunked = SequenceLogProbs.Compute(b, labels, null, LabelAlignment.ShiftByOne, new SequenceLogProbsOptions { ChunkTokens = 7 });
            fused.Sum.sum().backward();
            chunked.Sum.sum().backward();
            double value = (fused.Sum - chunked.Sum).abs().max().ToDouble() / Math.Max(1, chunked.Sum.abs().max().ToDouble());
            double grad = (a.grad!.to_type(ScalarType.Float32) - b.grad!.to_type(ScalarType.Float32)).abs().max().ToDouble();
            Report($"sequence log-probs {dtype}", value < 1e-4 && grad < 1e-2, $"value rel err {value:G3}, grad max err {grad:G3}; {status}");
        }

        // the target case: bf16 logits 8 x 1024 x 128256 (2.1 GB)
        {
            using var scope = NewDisposeScope();
            var logits = randn(8, 1024, 128_256, dtype: ScalarType.BFloat16, device: CUDA).requires_grad_(true);
            var labels = randint(0, 128_256, new long[] { 8, 1024 }, device: CUDA);
            double bytes = logits.numel() * 2.0;
            double Time(Action a)
            {
                for (int i = 0; i < 3; i++) a();
                cuda.synchronize(CUDA);
                var times = new List<double>();
                for (int i = 0; i < 10; i++)
                {
                    var sw = Stopwatch.StartNew();
                    a();
                    cuda.synchronize(CUDA);
                    times.Add(sw.Elapsed.TotalMilliseconds);
                }
                times.Sort();
                return times[5];
            }
            double forward = Time(() => { using var s = NewDisposeScope(); using var r = SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.Aligned); });
            double both = Time(() =>
            {
                using var s = NewDisposeScope();
                using var r = SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.Aligned);
                r.Sum.sum().backward();
                logits.grad!.Dispose();
                logits.grad = null;
            });
            Console.WriteLine($"INFO sequence log-probs bf16 8x1024x128256: forward {forward:F2} ms ({bytes / forward / 1e6:F0} GB/s), " +
                              $"backward {both - forward:F2} ms ({(both - forward) / forward:F2}x forward); {SequenceLogProbs.CudaKernelStatus}");
        }

        Console.WriteLine(failures == 0 ? "cuda-check: all checks passed" : $"cuda-check: {failures} check(s) FAILED");
        return failures == 0 ? 0 : 1;
    }
}
