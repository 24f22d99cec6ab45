using System.Runtime.Intrinsics;
using System.Text.Json;
using Alignment.Losses;
using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Benchmarks;

/// <summary>
/// <c>--logprob-timing</c>: the CPU log-prob step (sequence log-probs from fp32 logits, forward and forward + backward,
/// a fresh gradient each call as the peer makes) through the library's kernel (with and without the huge-page hint), its
/// chunked libtorch path, and plain TorchSharp log_softmax + gather; next to this machine's memory floor for the same
/// bytes (a vectorised read of the logits, a write of a fresh buffer of their size with and without huge pages). Timed as
/// <c>benchmarks/pytorch/logprob_step.py</c> times the PyTorch peer (median of N calls after a warm-up), which
/// <c>benchmarks/compare-logprobs-with-pytorch.sh</c> runs in the same session.
/// </summary>
/// <remarks>Arguments: <c>--shapes 8x512x32000,4x1024x128256 --heads 2048x1024x32000 --threads 1 --repeats 5 --out FILE</c>
/// (<c>--heads</c>: TOKENSxHxV cases of the LM head, none by default).</remarks>
internal static unsafe class LogProbBench
{
    public static int Timing(string[] args)
    {
        var shapes = DistillationBench.Arg(args, "--shapes", "8x512x32000,4x1024x128256").Split(',', StringSplitOptions.RemoveEmptyEntries).Select(s => s.Split('x').Select(int.Parse).ToArray()).ToArray();
        int threads = int.Parse(DistillationBench.Arg(args, "--threads", "1")), repeats = int.Parse(DistillationBench.Arg(args, "--repeats", "5"));
        var output = DistillationBench.Arg(args, "--out", "logprob-timing.json");
        set_num_threads(threads);
        var records = new List<Dictionary<string, object>>();
        foreach (var shape in shapes)
        {
            var (n, t, v) = (shape[0], shape[1], shape[2]);
            manual_seed(0);
            using var logits = randn(n, t, v).requires_grad_(true);
            using var labels = randint(0, v, new long[] { n, t });
            string label = $"{n}x{t}x{v}";
            double bytes = (double)n * t * v * 4;
            void Add(string path, string method, double us)
            {
                var record = new Dictionary<string, object>
                {
                    ["suite"] = "LogProbs", ["loss"] = path, ["B"] = label, ["dtype"] = "float32", ["device"] = "cpu", ["method"] = method,
                    ["median_us"] = us, ["threads"] = threads, ["gb_per_s"] = bytes / (us * 1e3),
                };
                records.Add(record);
                Console.WriteLine(JsonSerializer.Serialize(record));
            }

            // the floor: one read of the logits; one write of a fresh buffer of their size (page faults included)
            Add("floor_read", "Forward", QuickTiming.Median(() => Read(logits), repeats, warmups: 2));
            Add("floor_fresh_write", "Forward", QuickTiming.Median(() => FreshWrite(logits, huge: false), repeats, warmups: 2));
            Add("floor_fresh_write_huge", "Forward", QuickTiming.Median(() => FreshWrite(logits, huge: true), repeats, warmups: 2));

            var paths = new (string Name, SequenceLogProbsOptions? Options)[]
            {
                ("ours_kernel", new SequenceLogProbsOptions()),
                ("ours_kernel_no_huge_pages", new SequenceLogProbsOptions { HugePageGradients = false }),
                ("ours_chunked", new SequenceLogProbsOptions { FusedCpu = false }),
                ("torchsharp_naive", null),
            };
            foreach (var (name, options) in paths)
            {
                Tensor Sum()
                {
                    if (options is not null) return SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.Aligned, options).Sum;
                    return nn.functional.log_softmax(logits, 2).gather(2, labels.unsqueeze(2)).squeeze(2).sum(1);
                }
                double Forward()
                {
                    using var scope = NewDisposeScope();
                    using var noGrad = no_grad();
                    return Sum()[0].ToDouble();
                }
                double Both()
                {
                    using var scope = NewDisposeScope();
                    Sum().sum().backward();
                    double x = logits.grad![0, 0, 0].ToDouble();
                    logits.grad = null;
                    return x;
                }
                if (name != "ours_kernel_no_huge_pages") Add(name, "Forward", QuickTiming.Median(Forward, repeats, warmups: 2));
                Add(name, "ForwardBackward", QuickTiming.Median(Both, repeats, warmups: 2));
            }
        }
        foreach (var head in DistillationBench.Arg(args, "--heads", "").Split(',', StringSplitOptions.RemoveEmptyEntries).Select(h => h.Split('x').Select(int.Parse).ToArray()))
            records.AddRange(HeadTiming(head[0], head[1], head[2], threads, repeats));
        File.WriteAllText(output, JsonSerializer.Serialize(new Dictionary<string, object> { ["library"] = "Alignment.Losses", ["device"] = "cpu", ["records"] = records },
            new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }

    private static readonly string[] HeadPaths = { "head_ours_fused", "head_ours_fused_libtorch", "head_ours_retained", "head_torchsharp_materialised" };

    /// <summary>
    /// The LM head: tokens x H hidden states (with grad) through W [V, H] (with grad) to the tokens' log-probs, forward +
    /// backward: the fused head (default, with FusedCpu = false, with RetainHeadLogits) against TorchSharp's materialised
    /// mm + log_softmax + gather, as the peer's <c>--heads</c> does it; time, and the extra memory of a step beyond the
    /// gradients of h and W (a child process each).
    /// </summary>
    private static IEnumerable<Dictionary<string, object>> HeadTiming(int tokens, int hidden, int vocab, int threads, int repeats)
    {
        foreach (var name in HeadPaths)
        {
            double us;
            using (var step = new HeadStep(name, tokens, hidden, vocab)) us = QuickTiming.Median(step.Run, repeats, warmups: 2);
            var record = new Dictionary<string, object>
            {
                ["suite"] = "LogProbs", ["loss"] = name, ["B"] = $"head {tokens}x{hidden}x{vocab}", ["dtype"] = "float32", ["device"] = "cpu",
                ["method"] = "ForwardBackward", ["median_us"] = us, ["threads"] = threads,
                ["extra_mib"] = PeakMemory.OfChild(new[] { "--logprob-memory", name, $"{tokens}x{hidden}x{vocab}", "--threads", $"{threads}" }),
            };
            Console.WriteLine(JsonSerializer.Serialize(record));
            yield return record;
        }
    }

    /// <summary>The child of <see cref="HeadTiming"/>: <c>--logprob-memory PATH TOKENSxHxV --threads N</c>.</summary>
    public static int Memory(string[] args)
    {
        set_num_threads(int.Parse(DistillationBench.Arg(args, "--threads", "1")));
        var s = args[1].Split('x').Select(int.Parse).ToArray();
        using var step = new HeadStep(args[0], s[0], s[1], s[2]);
        double gradients = ((double)s[0] * s[1] + (double)s[2] * s[1]) * 4 / (1 << 20);    // h.grad and W.grad, which every path makes
        double extra = PeakMemory.Measure(() => step.Run()) - gradients;   // the step frees its gradients at the end
        Console.WriteLine(JsonSerializer.Serialize(new Dictionary<string, object> { ["path"] = args[0], ["extra_mib"] = extra }));
        return 0;
    }

    /// <summary>One forward + backward of the LM head by one path, on fixed random inputs.</summary>
    private sealed class HeadStep : IDisposable
    {
        private readonly Tensor _h, _w, _labels;
        private readonly SequenceLogProbsOptions? _options;

        internal HeadStep(string path, int tokens, int hidden, int vocab)
        {
            manual_seed(0);
            _h = (randn(1, tokens, hidden) * 0.5).requires_grad_(true);
            _w = (randn(vocab, hidden) * (1.0 / Math.Sqrt(hidden))).requires_grad_(true);
            _labels = randint(0, vocab, new long[] { 1, tokens });
            _options = path switch
            {
                "head_ours_fused" => new SequenceLogProbsOptions(),
                "head_ours_fused_libtorch" => new SequenceLogProbsOptions { FusedCpu = false },
                "head_ours_retained" => new SequenceLogProbsOptions { RetainHeadLogits = true },
                "head_torchsharp_materialised" => null,
                _ => throw new ArgumentException($"unknown head path {path}; known: {string.Join(", ", HeadPaths)}"),
            };
        }

        internal double Run()
        {
            using var scope = NewDisposeScope();
            var sum = _options is not null
                ? FusedLinearLogProbs.Compute(_h, _w, null, _labels, null, LabelAlignment.Aligned, _options).Sum
                : nn.functional.log_softmax(_h.squeeze(0).mm(_w.t()), 1).gather(1, _labels.squeeze(0).unsqueeze(1)).sum();
            sum.sum().backward();
            double x = _w.grad![0, 0].ToDouble();
            (_h.grad, _w.grad) = (null, null);
            return x;
        }

        public void Dispose()
        {
            _h.Dispose();
            _w.Dispose();
            _labels.Dispose();
        }
    }

    /// <summary>A vectorised sum over the tensor's memory: the time to read it once.</summary>
    private static double Read(Tensor x)
    {
        var p = (float*)TensorMemory.Address(x);
        long count = x.numel();
        var (a, b) = (Vector256<float>.Zero, Vector256<float>.Zero);
        long i = 0;
        for (; i + 16 <= count; i += 16)
        {
            a += Vector256.Load(p + i);
            b += Vector256.Load(p + i + 8);
        }
        return Vector256.Sum(a + b);
    }

    /// <summary>Allocates a buffer the size of <paramref name="like"/> and writes it once (the page faults are part of the cost).</summary>
    private static double FreshWrite(Tensor like, bool huge)
    {
        using var buffer = empty_like(like, requires_grad: false);
        var p = (float*)TensorMemory.Address(buffer);
        long count = buffer.numel();
        if (huge) TensorMemory.AdviseHugePages(p, count * 4);
        var one = Vector256.Create(1f);
        for (long i = 0; i + 8 <= count; i += 8) one.Store(p + i);
        return p[count - 1];
    }
}
