using System.Diagnostics;
using System.Text.Json;
using Alignment.Losses;
using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Benchmarks;

/// <summary>
/// The distillation case both sides time: a student head (H -> V, with grad) and a twice-wider frozen teacher head over
/// the same tokens, JSD(0.5), forward + backward. Ours fused (no [tokens, V] tensor for either model) or from materialised
/// logits; the PyTorch peer (<c>benchmarks/pytorch/distillation_losses.py</c>) materialises both, as TRL does.
/// </summary>
internal sealed class DistillationInputs : IDisposable
{
    public DistillationInputs(int tokens, int hidden, int vocab, int seed = 0, long? chunkTokens = null)
    {
        Loss = new DistillationLoss(DistillationOptions.TrlGkd(0.5) with { ChunkTokens = chunkTokens });
        var g = new Generator((ulong)seed);
        Hidden = (randn(new long[] { 1, tokens, hidden }, generator: g) * 0.5).requires_grad_(true);
        Weight = (randn(new long[] { vocab, hidden }, generator: g) / Math.Sqrt(hidden)).requires_grad_(true);
        TeacherHidden = randn(new long[] { 1, tokens, 2 * hidden }, generator: g) * 0.5;
        TeacherWeight = randn(new long[] { vocab, 2 * hidden }, generator: g) / Math.Sqrt(2 * hidden);
        Labels = randint(0, vocab, new long[] { 1, tokens }, generator: g);
        using (no_grad())
        {
            StudentLogits = Hidden.matmul(Weight.t()).detach().requires_grad_(true);
            TeacherLogits = TeacherHidden.matmul(TeacherWeight.t());
        }
    }

    /// <summary>The logits as given inputs (the loss alone, without the heads' matrix products).</summary>
    public Tensor StudentLogits { get; }
    public Tensor TeacherLogits { get; }

    /// <summary>One forward + backward of the loss from the given logits.</summary>
    public double StepFromLogits()
    {
        using var scope = NewDisposeScope();
        using var r = Loss.Compute(StudentLogits, TeacherLogits, Labels, null, LabelAlignment.Aligned);
        r.Backward();
        double value = r.Loss.ToDouble();
        StudentLogits.grad = null;
        return value;
    }

    public Tensor Hidden { get; }
    public Tensor Weight { get; }
    public Tensor TeacherHidden { get; }
    public Tensor TeacherWeight { get; }
    public Tensor Labels { get; }
    public DistillationLoss Loss { get; }

    /// <summary>One forward + backward; <paramref name="fused"/>: from both heads, else from materialised logits.</summary>
    public double Step(bool fused)
    {
        using var scope = NewDisposeScope();
        double value;
        if (fused)
        {
            using var r = Loss.Compute(DistillationStudent.FromHead(Hidden, Weight), DistillationTeacher.FromHead(TeacherHidden, TeacherWeight),
                Labels, null, LabelAlignment.Aligned);
            r.Backward();
            value = r.Loss.ToDouble();
        }
        else
        {
            var student = Hidden.matmul(Weight.t());
            Tensor teacher;
            using (no_grad()) teacher = TeacherHidden.matmul(TeacherWeight.t());
            using var r = Loss.Compute(student, teacher, Labels, null, LabelAlignment.Aligned);
            r.Backward();
            value = r.Loss.ToDouble();
        }
        Hidden.grad = null;
        Weight.grad = null;
        return value;
    }

    public void Dispose()
    {
        foreach (var t in new[] { Hidden, Weight, TeacherHidden, TeacherWeight, Labels, StudentLogits, TeacherLogits }) t.Dispose();
    }
}

/// <summary>Distillation, 512 tokens, H 256, V 16,384 (teacher H 512): fused heads vs materialised logits.</summary>
[MemoryDiagnoser]
public class DistillationBenchmarks
{
    [Params(true, false)]
    public bool Fused { get; set; }

    private DistillationInputs _x = null!;

    [GlobalSetup]
    public void Setup() => _x = new DistillationInputs(512, 256, 16384);

    [GlobalCleanup]
    public void Cleanup() => _x.Dispose();

    [Benchmark]
    public double ForwardBackward() => _x.Step(Fused);
}

/// <summary>
/// <c>--distill-crosscheck FILE</c> (the peer's <c>--dump</c>: every case's value and gradient to 1e-9 in float64),
/// <c>--distill-timing --tokens 512 --hidden 256 --vocab 16384 --repeats 10 --out FILE</c> (timed as the peer times) and
/// <c>--distill-memory fused|materialised ...</c> (a child process: the extra resident memory of one step, as the peer's).
/// </summary>
internal static class DistillationBench
{
    public static int CrossCheck(string path)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        var root = doc.RootElement;
        int n = root.GetProperty("n").GetInt32(), t = root.GetProperty("t").GetInt32(), v = root.GetProperty("v").GetInt32();
        double[] Values(string k) => root.GetProperty("inputs").GetProperty(k).EnumerateArray().Select(e => e.GetDouble()).ToArray();
        var cases = new Dictionary<string, DistillationOptions>();
        foreach (var beta in new[] { 0.0, 0.3, 1.0 })
            foreach (var tau in new[] { 1.0, 0.8 })
                cases[$"trl_jsd_b{beta:G}_t{tau:G}"] = new DistillationOptions { Divergence = TokenDivergence.Jsd(beta, tau) };
        cases["liger_jsd"] = DistillationOptions.Liger();
        cases["tvd"] = new DistillationOptions { Divergence = TokenDivergence.TotalVariation() };
        cases["nemo_forward_top4"] = new DistillationOptions { Divergence = TokenDivergence.ForwardKl().WithTopK(4) };
        cases["nemo_reverse_top4_tail"] = new DistillationOptions { Divergence = TokenDivergence.ReverseKl().WithTopK(4, studentTail: true) };
        int failures = 0;
        foreach (var (name, options) in cases)
        {
            var peer = root.GetProperty("losses").GetProperty(name);
            using var scope = NewDisposeScope();
            var student = tensor(Values("student"), new long[] { n, t, v }, dtype: ScalarType.Float64).requires_grad_(true);
            var teacher = tensor(Values("teacher"), new long[] { n, t, v }, dtype: ScalarType.Float64);
            var labels = tensor(Values("labels").Select(x => (long)x).ToArray(), new long[] { n, t });
            using var r = new DistillationLoss(options).Compute(student, teacher, labels, null, LabelAlignment.Aligned);
            r.Backward();
            double value = r.Loss.ToDouble(), want = peer.GetProperty("value").GetDouble();
            var wantGrad = peer.GetProperty("grad").EnumerateArray().Select(e => e.GetDouble()).ToArray();
            var grad = student.grad!.data<double>().ToArray();
            double valueError = Math.Abs(value - want) / Math.Max(1, Math.Abs(want));
            double gradError = grad.Zip(wantGrad, (a, b) => Math.Abs(a - b)).Max() / Math.Max(1e-300, wantGrad.Max(Math.Abs));
            bool ok = valueError < 1e-9 && gradError < 1e-9;
            if (!ok) failures++;
            Console.WriteLine($"{(ok ? "PASS" : "FAIL")} {name}: ours {value:R}, peer {want:R}, value rel err {valueError:G3}, grad rel err {gradError:G3}");
        }
        Console.WriteLine(failures == 0 ? $"all {cases.Count} distillation cases agree with the peer" : $"{failures} distillation cases differ from the peer");
        return failures == 0 ? 0 : 1;
    }

    /// <summary>The value after <paramref name="name"/> in <paramref name="args"/>, or <paramref name="fallback"/> (shared by the timing modes).</summary>
    internal static string Arg(string[] args, string name, string fallback)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? args[i + 1] : fallback;
    }

    public static int Timing(string[] args)
    {
        int tokens = int.Parse(Arg(args, "--tokens", "512")), hidden = int.Parse(Arg(args, "--hidden", "256"));
        int vocab = int.Parse(Arg(args, "--vocab", "16384")), repeats = int.Parse(Arg(args, "--repeats", "10"));
        var output = Arg(args, "--out", "distillation-timing.json");
        int threads = int.Parse(Arg(args, "--threads", "1"));
        set_num_threads(threads);
        using var x = new DistillationInputs(tokens, hidden, vocab, chunkTokens: Chunk(args));
        var records = new List<Dictionary<string, object>>();
        foreach (var fused in new[] { true, false })
        {
            var record = new Dictionary<string, object>
            {
                ["suite"] = "Distillation", ["loss"] = fused ? "jsd_fused_heads" : "jsd_materialised", ["B"] = tokens, ["dtype"] = "float32", ["device"] = "cpu",
                ["method"] = "ForwardBackward", ["median_us"] = QuickTiming.Median(() => x.Step(fused), repeats, warmups: 3), ["hidden"] = hidden, ["vocab"] = vocab,
                ["extra_mib"] = MemoryOf(fused ? "fused" : "materialised", tokens, hidden, vocab, threads, Chunk(args)), ["threads"] = threads,
            };
            records.Add(record);
            Console.WriteLine(JsonSerializer.Serialize(record));
        }
        records.Add(new Dictionary<string, object>
        {
            ["suite"] = "Distillation", ["loss"] = "jsd_from_logits", ["B"] = tokens, ["dtype"] = "float32", ["device"] = "cpu", ["method"] = "ForwardBackward",
            ["median_us"] = QuickTiming.Median(x.StepFromLogits, repeats, warmups: 3), ["hidden"] = hidden, ["vocab"] = vocab, ["threads"] = threads,
        });
        Console.WriteLine(JsonSerializer.Serialize(records[^1]));
        File.WriteAllText(output, JsonSerializer.Serialize(new Dictionary<string, object> { ["library"] = "Alignment.Losses", ["device"] = "cpu", ["records"] = records },
            new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }

    /// <summary>Runs <c>--distill-memory</c> in a child process (with the peer's malloc setting) and returns its extra MiB.</summary>
    private static long? Chunk(string[] args) => Arg(args, "--chunk", "") is { Length: > 0 } c ? long.Parse(c) : null;

    private static double MemoryOf(string path, int tokens, int hidden, int vocab, int threads, long? chunk)
    {
        var args = new List<string> { "--distill-memory", path, "--tokens", $"{tokens}", "--hidden", $"{hidden}", "--vocab", $"{vocab}", "--threads", $"{threads}" };
        if (chunk is { } c) args.AddRange(new[] { "--chunk", $"{c}" });
        return PeakMemory.OfChild(args);
    }

    /// <summary>The child: one warm-up step, the peak resident set reset, one step; prints the extra MiB over the resident set before it.</summary>
    public static int Memory(string[] args)
    {
        bool fused = args[0] == "fused";
        set_num_threads(int.Parse(Arg(args, "--threads", "1")));
        using var x = new DistillationInputs(int.Parse(Arg(args, "--tokens", "512")), int.Parse(Arg(args, "--hidden", "256")), int.Parse(Arg(args, "--vocab", "16384")),
            chunkTokens: Chunk(args));
        double extra = PeakMemory.Measure(() => x.Step(fused));
        Console.WriteLine(JsonSerializer.Serialize(new Dictionary<string, object> { ["path"] = fused ? "fused" : "materialised", ["extra_mib"] = extra }));
        return 0;
    }
}
