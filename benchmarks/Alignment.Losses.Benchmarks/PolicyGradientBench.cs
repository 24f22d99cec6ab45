using System.Diagnostics;
using System.Text.Json;
using Alignment.Losses;
using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Benchmarks;

/// <summary>
/// Inputs of the policy-gradient cases: N completions of up to T tokens (random lengths), per-token policy log-probs
/// (with grad), l_old, l_ref, a mask and sequence advantages; the losses are <see cref="PolicyLosses"/> with a 0.04 k3 KL
/// (the PyTorch peer, <c>benchmarks/pytorch/policy_losses.py</c>, computes the same, TRL-style).
/// </summary>
internal sealed class PolicyInputs : IDisposable
{
    /// <summary>The objectives both sides implement.</summary>
    public static readonly string[] Names = { "grpo", "dapo", "dr_grpo", "bnpo", "gspo", "cispo", "sapo" };

    public PolicyInputs(int n, int t, Device device, int seed = 0)
    {
        var g = new Generator((ulong)seed);
        var lengths = randint(1, t + 1, new long[] { n }, generator: g);
        Mask = (arange(t).unsqueeze(0) < lengths.unsqueeze(1)).to(device);
        var l = -0.02 - 3 * rand(new long[] { n, t }, generator: g, dtype: ScalarType.Float64);
        Old = (l + 0.05 * randn(new long[] { n, t }, generator: g, dtype: ScalarType.Float64)).clamp_max(-1e-4).to(ScalarType.Float32, device);
        Reference = (l + 0.3 * randn(new long[] { n, t }, generator: g, dtype: ScalarType.Float64)).clamp_max(-1e-4).to(ScalarType.Float32, device);
        Advantages = randn(new long[] { n }, generator: g, dtype: ScalarType.Float64).to(ScalarType.Float32, device);
        LogProbs = l.to(ScalarType.Float32, device).requires_grad_(true);
        T = t;
    }

    /// <summary>The peer's dumped inputs (float64, CPU).</summary>
    public PolicyInputs(Dictionary<string, double[]> inputs, int n, int t)
    {
        Tensor Grid(string k) => tensor(inputs[k], new long[] { n, t }, dtype: ScalarType.Float64);
        LogProbs = Grid("l").requires_grad_(true);
        Old = Grid("old");
        Reference = Grid("ref");
        Mask = Grid("mask") != 0;
        Advantages = tensor(inputs["adv"], dtype: ScalarType.Float64);
        T = t;
    }

    public Tensor LogProbs { get; }
    public Tensor Old { get; }
    public Tensor Reference { get; }
    public Tensor Mask { get; }
    public Tensor Advantages { get; }
    public int T { get; }

    public ITokenLoss Create(string name) => PolicyLosses.Create(name, maxCompletionLength: T, kl: new KlPenalty(0.04));

    /// <summary>The same objective on its op-by-op path (PolicyGradientOptions.FusedCpu = false).</summary>
    public ITokenLoss CreateOpByOp(string name) => Create(name) switch
    {
        ClippedPolicyLoss c => new ClippedPolicyLoss(c.Options with { FusedCpu = false }, c.Name),
        CispoLoss c => new CispoLoss(c.Options with { FusedCpu = false }),
        SapoLoss c => new SapoLoss(c.Options with { FusedCpu = false }),
        var other => other,
    };

    public TokenBatch Batch() => new(LogProbs, Mask) { OldLogProbs = Old, ReferenceLogProbs = Reference, Advantages = Advantages };

    /// <summary>The plain TorchSharp formula's forward (<see cref="PlainPolicy"/>).</summary>
    public double PlainForward(string name)
    {
        using var scope = NewDisposeScope();
        return PlainPolicy.Loss(name, this).ToDouble();
    }

    /// <summary>The plain TorchSharp formula's forward and backward.</summary>
    public double PlainForwardBackward(string name)
    {
        using var scope = NewDisposeScope();
        PlainPolicy.Loss(name, this).backward();
        using var grad = LogProbs.grad!;
        double v = grad[0, 0].ToDouble();
        LogProbs.grad = null;
        return v;
    }

    public double Forward(ITokenLoss loss, TokenBatch batch)
    {
        using var scope = NewDisposeScope();
        using var r = loss.Compute(batch);
        return r.Loss.ToDouble();
    }

    public double ForwardBackward(ITokenLoss loss, TokenBatch batch)
    {
        using var scope = NewDisposeScope();
        using (var r = loss.Compute(batch)) r.Backward();
        using var grad = LogProbs.grad!;
        double v = grad[0, 0].ToDouble();
        LogProbs.grad = null;
        return v;
    }

    public void Dispose()
    {
        foreach (var t in new[] { LogProbs, Old, Reference, Mask, Advantages }) t.Dispose();
    }
}

/// <summary>How do the policy-gradient objectives compare, N completions of up to 256 tokens? Forward, forward + backward.</summary>
[MemoryDiagnoser]
public class PolicyGradientBenchmarks
{
    [ParamsSource(nameof(Losses))]
    public string Loss { get; set; } = "grpo";

    public static IEnumerable<string> Losses() =>
        Environment.GetEnvironmentVariable("BENCH_LOSSES") is { Length: > 0 } only ? only.Split(',').Where(PolicyInputs.Names.Contains) : PolicyInputs.Names;

    [ParamsSource(nameof(Sizes))]
    public int N { get; set; }

    /// <summary>N = 64, 512; BENCH_SIZES keeps some.</summary>
    public static IEnumerable<int> Sizes() =>
        Environment.GetEnvironmentVariable("BENCH_SIZES") is { Length: > 0 } only ? only.Split(',').Select(int.Parse) : new[] { 64, 512 };

    [ParamsSource(nameof(Devices))]
    public string Device { get; set; } = "cpu";

    public static IEnumerable<string> Devices() => BenchInputs.Devices();

    private PolicyInputs _inputs = null!;
    private ITokenLoss _loss = null!;
    private TokenBatch _batch = null!;

    [GlobalSetup]
    public void Setup()
    {
        _inputs = new PolicyInputs(N, 256, new Device(Device));
        _loss = _inputs.Create(Loss);
        _batch = _inputs.Batch();
    }

    [GlobalCleanup]
    public void Cleanup() => _inputs.Dispose();

    [Benchmark]
    public double Forward() => _inputs.Forward(_loss, _batch);

    [Benchmark]
    public double ForwardBackward() => _inputs.ForwardBackward(_loss, _batch);
}

/// <summary>
/// <c>--pg-crosscheck FILE</c> (the peer's <c>policy_losses.py --dump FILE</c>: values and gradients must agree to 1e-9 in
/// float64) and <c>--pg-timing --losses a,b --sizes 64,512 --tokens 256 --repeats 100 --device cpu --out FILE [--op-by-op]</c>
/// (timed as the peer times, written as its records for <c>benchmarks/compare.py</c>; --op-by-op: FusedCpu = false;
/// --plain: the bare formula in TorchSharp ops, <see cref="PlainPolicy"/>).
/// </summary>
internal static class PolicyGradientBench
{
    public static int CrossCheck(string path)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        var root = doc.RootElement;
        int n = root.GetProperty("n").GetInt32(), t = root.GetProperty("t").GetInt32();
        var inputs = root.GetProperty("inputs").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.EnumerateArray().Select(e => e.GetDouble()).ToArray());
        int failures = 0;
        foreach (var name in PolicyInputs.Names)
        {
            var peer = root.GetProperty("losses").GetProperty(name);
            using var scope = NewDisposeScope();
            using var x = new PolicyInputs(inputs, n, t);
            using var r = x.Create(name).Compute(x.Batch());
            r.Backward();
            double value = r.Loss.ToDouble(), want = peer.GetProperty("value").GetDouble();
            var wantGrad = peer.GetProperty("grad").EnumerateArray().Select(e => e.GetDouble()).ToArray();
            var grad = x.LogProbs.grad!.data<double>().ToArray();
            double scale = Math.Max(1e-300, wantGrad.Max(Math.Abs));
            double valueError = Math.Abs(value - want) / Math.Max(1, Math.Abs(want));
            double gradError = grad.Zip(wantGrad, (a, b) => Math.Abs(a - b)).Max() / scale;
            bool ok = valueError < 1e-9 && gradError < 1e-9;
            if (!ok) failures++;
            Console.WriteLine($"{(ok ? "PASS" : "FAIL")} {name}: ours {value:R}, peer {want:R}, value rel err {valueError:G3}, grad rel err {gradError:G3}");
            // the plain TorchSharp formula of the timing's third column must be the peer's formula too
            x.LogProbs.grad = null;
            var plain = PlainPolicy.Loss(name, x);
            plain.backward();
            double plainError = Math.Abs(plain.ToDouble() - want) / Math.Max(1, Math.Abs(want));
            double plainGradError = x.LogProbs.grad!.data<double>().ToArray().Zip(wantGrad, (a, b) => Math.Abs(a - b)).Max() / scale;
            bool plainOk = plainError < 1e-9 && plainGradError < 1e-9;
            if (!plainOk) failures++;
            Console.WriteLine($"{(plainOk ? "PASS" : "FAIL")} {name} (plain TorchSharp): value rel err {plainError:G3}, grad rel err {plainGradError:G3}");
        }
        Console.WriteLine(failures == 0 ? $"all {PolicyInputs.Names.Length} policy losses agree with the peer (ours, and the plain TorchSharp formulas)"
            : $"{failures} policy losses differ from the peer");
        return failures == 0 ? 0 : 1;
    }

    public static int Timing(string[] args)
    {
        string Arg(string name, string fallback)
        {
            int i = Array.IndexOf(args, name);
            return i >= 0 && i + 1 < args.Length ? args[i + 1] : fallback;
        }
        var device = Arg("--device", cuda.is_available() ? "cuda" : "cpu");
        var losses = Arg("--losses", string.Join(",", PolicyInputs.Names)).Split(',', StringSplitOptions.RemoveEmptyEntries);
        var sizes = Arg("--sizes", "64,512").Split(',').Select(int.Parse).ToArray();
        int tokens = int.Parse(Arg("--tokens", "256")), repeats = int.Parse(Arg("--repeats", "100"));
        var output = Arg("--out", "policy-timing.json");
        bool opByOp = args.Contains("--op-by-op");               // FusedCpu = false: the op-by-op path the fused pass replaces
        bool plain = args.Contains("--plain");                   // the bare formula in TorchSharp ops (PlainPolicy)
        var unknown = losses.Where(l => !PolicyInputs.Names.Contains(l)).ToList();
        if (unknown.Count > 0)
        {
            Console.Error.WriteLine($"unknown policy loss(es) {string.Join(", ", unknown)}; known: {string.Join(", ", PolicyInputs.Names)}");
            return 2;
        }
        var records = new List<Dictionary<string, object>>();
        foreach (var name in losses)
            foreach (int n in sizes)
            {
                using var x = new PolicyInputs(n, tokens, new Device(device));
                var loss = opByOp ? x.CreateOpByOp(name) : x.Create(name);
                var batch = x.Batch();
                var calls = plain
                    ? new (string, Func<double>)[] { ("Forward", () => x.PlainForward(name)), ("ForwardBackward", () => x.PlainForwardBackward(name)) }
                    : new (string, Func<double>)[] { ("Forward", () => x.Forward(loss, batch)), ("ForwardBackward", () => x.ForwardBackward(loss, batch)) };
                foreach (var (method, call) in calls)
                {
                    var record = new Dictionary<string, object>
                    {
                        ["suite"] = "PolicyGradientBenchmarks", ["loss"] = name, ["B"] = n, ["dtype"] = "float32", ["device"] = device,
                        ["method"] = method, ["median_us"] = QuickTiming.Median(call, repeats),
                    };
                    records.Add(record);
                    Console.WriteLine(JsonSerializer.Serialize(record));
                }
            }
        File.WriteAllText(output, JsonSerializer.Serialize(new Dictionary<string, object> { ["library"] = "Alignment.Losses", ["device"] = device, ["records"] = records },
            new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }
}
