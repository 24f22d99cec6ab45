using System.Diagnostics;
using System.Text.Json;
using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Benchmarks;

/// <summary>
/// <c>--quick-timing</c>: a few losses at a few batch sizes, timed exactly as the PyTorch peer times them
/// (<c>reference_losses.py</c>: warm-up calls, then the median of N calls, each reading one value back to the host),
/// written as the peer's JSON records so that <c>benchmarks/compare.py</c> pairs them. For the GPU script's short run,
/// where BenchmarkDotNet's pilot and warm-up phases cost more device time than the measurement.
/// </summary>
/// <remarks>
/// Arguments: <c>--device cpu|cuda --losses dpo,rpo --sizes 64,4096 --dtypes float32 --repeats 100 --out FILE</c>
/// (defaults: cuda when present, dpo and rpo (all: every loss of the suites), 64 and 4096, float32, 100, quick-timing.json); <c>--op-by-op</c> turns the
/// fused CPU pass off, <c>--plain</c> times the peer's formulas in bare TorchSharp ops (<see cref="PlainPreference"/>)
/// instead of the library; <c>--skip rpo@4096,...</c> leaves cases out, as the peer's flag does.
/// </remarks>
internal static class QuickTiming
{
    public static int Run(string[] args)
    {
        string Arg(string name, string fallback)
        {
            int i = Array.IndexOf(args, name);
            return i >= 0 && i + 1 < args.Length ? args[i + 1] : fallback;
        }
        var device = Arg("--device", cuda.is_available() ? "cuda" : "cpu");
        var losses = Arg("--losses", "dpo,rpo").Split(',', StringSplitOptions.RemoveEmptyEntries);
        if (losses is ["all"]) losses = BenchInputs.LossNames;
        var sizes = Arg("--sizes", "64,4096").Split(',').Select(int.Parse).ToArray();
        var dtypes = Arg("--dtypes", "float32").Split(',');
        int repeats = int.Parse(Arg("--repeats", "100"));
        var output = Arg("--out", "quick-timing.json");
        var skip = Arg("--skip", "").Split(',', StringSplitOptions.RemoveEmptyEntries).ToHashSet();
        bool fused = !args.Contains("--op-by-op");               // the pair-link losses' fused CPU pass (default) or their op-by-op path
        bool plain = args.Contains("--plain");                   // the peer's formula in bare TorchSharp ops (PlainPreference)
        var unknown = losses.Where(l => !BenchInputs.LossNames.Contains(l)).ToList();
        if (unknown.Count > 0)
        {
            Console.Error.WriteLine($"unknown loss(es) {string.Join(", ", unknown)}; known: {string.Join(", ", BenchInputs.LossNames)}");
            return 2;
        }

        var records = new List<Dictionary<string, object>>();
        foreach (var name in losses)
            foreach (int b in sizes.Where(b => !skip.Contains($"{name}@{b}")))
                foreach (var dt in dtypes)
                {
                    using var inputs = new BenchInputs(b, dt == "bfloat16" ? ScalarType.BFloat16 : ScalarType.Float32, new Device(device));
                    var loss = BenchInputs.Create(name, fused);
                    var batch = inputs.BatchFor(name);
                    double Forward()
                    {
                        using var scope = NewDisposeScope();
                        using var r = loss.Compute(batch);
                        return r.Loss.ToDouble();
                    }
                    double PlainForward()
                    {
                        using var scope = NewDisposeScope();
                        return PlainPreference.Loss(name, inputs).ToDouble();
                    }
                    double PlainForwardBackward()
                    {
                        using var scope = NewDisposeScope();
                        PlainPreference.Loss(name, inputs).backward();
                        double v = inputs.PolicyChosen.grad![0].ToDouble();
                        inputs.PolicyChosen.grad = null;
                        inputs.PolicyRejected.grad = null;
                        return v;
                    }
                    var calls = plain
                        ? new (string, Func<double>)[] { ("Forward", PlainForward), ("ForwardBackward", PlainForwardBackward) }
                        : new (string, Func<double>)[] { ("Forward", Forward), ("ForwardBackward", () => inputs.ForwardBackward(loss, batch)) };
                    foreach (var (method, call) in calls)
                    {
                        var record = new Dictionary<string, object>
                        {
                            ["suite"] = "LossBenchmarks", ["loss"] = name, ["B"] = b, ["dtype"] = dt, ["device"] = device,
                            ["method"] = method, ["median_us"] = Median(call, repeats), ["path"] = plain ? "plain" : fused ? "default" : "op-by-op",
                        };
                        records.Add(record);
                        Console.WriteLine(JsonSerializer.Serialize(record));
                        Write(output, device, records);     // after every record: a run stopped at its time limit keeps what it measured
                    }
                }
        return 0;
    }

    private static void Write(string path, string device, List<Dictionary<string, object>> records) =>
        File.WriteAllText(path, JsonSerializer.Serialize(new Dictionary<string, object>
        {
            ["library"] = "Alignment.Losses", ["device"] = device, ["records"] = records,
        }, new JsonSerializerOptions { WriteIndented = true }));

    /// <summary>
    /// Median microseconds per call, as the peer's <c>time_call</c>, after a warm-up of at least 20 calls and 0.5 s: the
    /// .NET JIT recompiles hot methods with full optimisation only after they have run a while (tiered compilation), which
    /// eager Python has no counterpart of, so a 20-call warm-up would time partly unoptimised code. Calls of a second or
    /// more (distillation) pass fewer <paramref name="warmups"/>: the JIT has long finished by then.
    /// </summary>
    internal static double Median(Func<double> call, int repeats, int warmups = 20)
    {
        var warm = Stopwatch.StartNew();
        for (int i = 0; i < warmups || warm.ElapsedMilliseconds < 500; i++) call();
        var samples = new double[repeats];
        for (int i = 0; i < repeats; i++)
        {
            long start = Stopwatch.GetTimestamp();
            call();
            samples[i] = Stopwatch.GetElapsedTime(start).TotalMicroseconds;
        }
        Array.Sort(samples);
        return repeats % 2 == 1 ? samples[repeats / 2] : (samples[repeats / 2 - 1] + samples[repeats / 2]) / 2;
    }
}
