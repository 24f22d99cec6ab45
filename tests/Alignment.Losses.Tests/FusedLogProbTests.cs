using Alignment.Losses;
using Alignment.Losses.Internal;

namespace Alignment.Losses.Tests;

/// <summary>
/// The managed CPU log-prob kernel (SequenceLogProbsOptions.FusedCpu, LogSoftmaxRows) against the chunked libtorch path
/// (FusedCpu = false): sums, means, token log-probs, WPO terms, step statistics and gradients over odd vocabularies,
/// masks, ignored labels, shifts, packing, strided and bfloat16 logits; the same errors; exact zeros where masked; the same
/// bits whatever the thread count or huge-page hint; and that the kernel is what ran.
/// </summary>
public class FusedLogProbTests
{
    sealed record Outcome(Tensor Sum, Tensor Mean, Tensor Tokens, Tensor Wpo, Tensor Entropy, Tensor LogitMean, Tensor Correct, Tensor Grad, int KernelCalls);

    static Outcome Run(Tensor logitsData, Tensor labels, Tensor? mask, LabelAlignment alignment, bool fused, Func<Tensor, Tensor>? view = null,
        SequenceBoundaries? packed = null, bool hugePages = true)
    {
        var leaf = logitsData.detach().clone().requires_grad_(true);
        var logits = view is null ? leaf : view(leaf);
        var options = new SequenceLogProbsOptions { FusedCpu = fused, WpoTerms = true, StepStatistics = true, HugePageGradients = hugePages };
        int before = LogSoftmaxRows.CallsOnThisThread;
        using var r = packed is null
            ? SequenceLogProbs.Compute(logits, labels, mask, alignment, options)
            : SequenceLogProbs.Compute(logits, labels, mask, packed, alignment, options);
        var weights = linspace(-1.5, 2.0, r.Sum.shape[0], dtype: r.Sum.dtype);
        ((r.Sum * weights).sum() + (r.Mean * 0.25).sum()).backward();
        Tensor D(Tensor t) => t.detach().to_type(ScalarType.Float64).clone();
        return new Outcome(D(r.Sum), D(r.Mean), D(r.TokenLogProbs), D(r.WpoTerm!), D(r.EntropySum!), D(r.LogitMeanSum!), D(r.CorrectTokens!),
            D(leaf.grad!), LogSoftmaxRows.CallsOnThisThread - before);
    }

    static void Close(Tensor a, Tensor b, double tol, string what)
    {
        Assert.Equal(b.shape, a.shape);
        var diff = ((a - b).abs() / (b.abs() + 1)).where(a != b, 0);             // equal infinities (a mean logit with -inf) agree
        double err = diff.numel() == 0 ? 0 : diff.max().ToDouble();
        Assert.True(err <= tol, $"{what}: fused and chunked differ by {err:E2} (tolerance {tol:E1})");
    }

    static bool Identical(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && (a == b).all().ToBoolean();

    static void Same(Outcome fused, Outcome plain, double gradTol, string label)
    {
        Close(fused.Sum, plain.Sum, 2e-6, $"{label} sum");
        Close(fused.Mean, plain.Mean, 2e-6, $"{label} mean");
        Close(fused.Tokens, plain.Tokens, 2e-6, $"{label} token log-probs");
        Close(fused.Wpo, plain.Wpo, 2e-6, $"{label} WPO term");
        Close(fused.Entropy, plain.Entropy, 2e-6, $"{label} entropy");
        Close(fused.LogitMean, plain.LogitMean, 2e-6, $"{label} mean logit");
        Assert.True(Identical(fused.Correct, plain.Correct), $"{label}: argmax hits differ");
        Close(fused.Grad, plain.Grad, gradTol, $"{label} gradient");
        Assert.Equal(0, plain.KernelCalls);
    }

    public static IEnumerable<object[]> Cases()
    {
        foreach (var (n, t, v) in new[] { (3, 7, 1), (2, 5, 7), (2, 9, 33), (4, 16, 1000), (1, 3, 4103) })
            foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
                foreach (var alignment in new[] { LabelAlignment.Aligned, LabelAlignment.ShiftByOne })
                    yield return new object[] { n, t, v, dtype, alignment };
    }

    [Theory, MemberData(nameof(Cases))]
    public void The_kernel_equals_the_chunked_path_with_masks_ignored_labels_and_every_extra(int n, int t, int v, ScalarType dtype, LabelAlignment alignment)
    {
        using var scope = NewDisposeScope();
        var g = new Generator((ulong)(11 + n * 100 + t * 10 + v));
        // integer-valued logits on half the rows make ties, so the first argmax matters; -inf entries make p = 0 terms
        var logits = randn(new long[] { n, t, v }, generator: g) * 4;
        logits = logits.where(rand(new long[] { n, t, 1 }, generator: g) < 0.5, logits.round());
        if (v > 1)
        {
            logits = logits.masked_fill(rand(new long[] { n, t, v }, generator: g) < 0.05, double.NegativeInfinity);
            logits.select(2, 0).copy_(randn(new long[] { n, t }, generator: g));   // no row all -inf
        }
        logits = logits.to_type(dtype);
        var labels = randint(0, v, new long[] { n, t }, generator: g);
        labels = labels.masked_fill(rand(new long[] { n, t }, generator: g) < 0.15, -100);
        var mask = rand(new long[] { n, t }, generator: g) < 0.8;
        // a counted label whose logit is -inf has log-prob -inf (an error): count only labels scored by a finite logit
        bool shift = alignment == LabelAlignment.ShiftByOne;
        var scoredBy = shift ? logits.narrow(1, 0, t - 1) : logits;
        var scoredLabels = (shift ? labels.narrow(1, 1, t - 1) : labels).clamp_min(0);
        var finite = scoredBy.to_type(ScalarType.Float32).gather(2, scoredLabels.unsqueeze(2)).squeeze(2).isfinite();
        mask = mask & (shift ? cat(new[] { ones(n, 1, dtype: ScalarType.Bool), finite }, 1) : finite);
        var fused = Run(logits, labels, mask, alignment, fused: true);
        var plain = Run(logits, labels, mask, alignment, fused: false);
        Same(fused, plain, dtype == ScalarType.BFloat16 ? 8e-3 : 2e-6, $"[{n}, {t}, {v}] {dtype} {alignment}");
        Assert.Equal(2, fused.KernelCalls);                               // forward and backward both ran in the kernel
    }

    [Fact]
    public void Strided_and_packed_logits_and_a_model_output_take_the_kernel_and_agree()
    {
        using var scope = NewDisposeScope();
        var g = new Generator(5);
        // [T, N, V] storage read as [N, T, V]: rows are strided, V is contiguous
        var storage = randn(new long[] { 9, 3, 50 }, generator: g) * 3;
        var labels = randint(0, 50, new long[] { 3, 9 }, generator: g);
        Tensor Transposed(Tensor leaf) => leaf.transpose(0, 1);
        var fused = Run(storage, labels, null, LabelAlignment.ShiftByOne, true, Transposed);
        var plain = Run(storage, labels, null, LabelAlignment.ShiftByOne, false, Transposed);
        Same(fused, plain, 2e-6, "transposed");
        Assert.Equal(2, fused.KernelCalls);

        // a model's output (not a leaf): the gradient flows on through the graph
        var data = randn(new long[] { 2, 6, 40 }, generator: g);
        var ids = randint(0, 40, new long[] { 2, 6 }, generator: g);
        Tensor Scaled(Tensor leaf) => leaf * 1.5 - 0.25;
        Same(Run(data, ids, null, LabelAlignment.Aligned, true, Scaled), Run(data, ids, null, LabelAlignment.Aligned, false, Scaled), 2e-6, "non-leaf");

        // a packed row of three sequences
        var packedLogits = randn(new long[] { 1, 12, 30 }, generator: g) * 2;
        var packedLabels = randint(0, 30, new long[] { 1, 12 }, generator: g);
        var boundaries = SequenceBoundaries.FromLengths(new long[] { 3, 5, 4 });
        var pf = Run(packedLogits, packedLabels, null, LabelAlignment.ShiftByOne, true, packed: boundaries);
        Same(pf, Run(packedLogits, packedLabels, null, LabelAlignment.ShiftByOne, false, packed: boundaries), 2e-6, "packed");
        Assert.Equal(2, pf.KernelCalls);
    }

    [Fact]
    public void Logits_strided_along_the_vocabulary_and_float64_take_the_chunked_path()
    {
        using var scope = NewDisposeScope();
        var g = new Generator(8);
        var wide = randn(new long[] { 2, 5, 40 }, generator: g);
        var labels = randint(0, 20, new long[] { 2, 5 }, generator: g);
        Tensor EveryOther(Tensor leaf) => leaf.slice(2, 0, 40, 2);                  // V stride 2
        var strided = Run(wide, labels, null, LabelAlignment.Aligned, true, EveryOther);
        Assert.Equal(0, strided.KernelCalls);
        Same(strided, Run(wide, labels, null, LabelAlignment.Aligned, false, EveryOther), 0, "V-strided");

        var f64 = Run(wide.to_type(ScalarType.Float64), randint(0, 40, new long[] { 2, 5 }, generator: g), null, LabelAlignment.Aligned, true);
        Assert.Equal(0, f64.KernelCalls);
    }

    [Fact]
    public void Masked_rows_get_exact_zero_gradients_whatever_they_hold_and_counted_nan_is_the_same_error()
    {
        using var scope = NewDisposeScope();
        var logits = randn(2, 4, 16);
        logits[0, 1, 3] = tensor(float.NaN);
        logits[1, 2] = full(16, float.PositiveInfinity);
        var labels = randint(0, 16, new long[] { 2, 4 });
        var mask = ones(2, 4, dtype: ScalarType.Bool);
        mask[0, 1] = tensor(false);
        mask[1, 2] = tensor(false);
        var fused = Run(logits, labels, mask, LabelAlignment.Aligned, true);
        Same(fused, Run(logits, labels, mask, LabelAlignment.Aligned, false), 2e-6, "masked non-finite");
        Assert.Equal(0.0, fused.Grad[0, 1].abs().sum().ToDouble());
        Assert.Equal(0.0, fused.Grad[1, 2].abs().sum().ToDouble());
        Assert.True(fused.Grad.isfinite().all().ToBoolean());

        mask[0, 1] = tensor(true);                                                  // now the NaN counts
        string Message(bool f)
        {
            var e = Assert.Throws<ArgumentException>(() => SequenceLogProbs.Compute(logits, labels, mask, LabelAlignment.Aligned, new SequenceLogProbsOptions { FusedCpu = f }));
            Assert.Equal("logits", e.ParamName);
            return e.Message;
        }
        Assert.Equal(Message(false), Message(true));
        Assert.Contains("sequence(s) 0", Message(true));
    }

    [Fact]
    public void The_bits_do_not_depend_on_the_thread_count_or_the_huge_page_hint()
    {
        using var scope = NewDisposeScope();
        var g = new Generator(3);
        var logits = randn(new long[] { 4, 64, 8192 }, generator: g) * 2;           // 8 MiB: parallel, and a huge-page-sized gradient
        var labels = randint(0, 8192, new long[] { 4, 64 }, generator: g);
        int threads = get_num_threads();
        try
        {
            set_num_threads(1);
            var one = Run(logits, labels, null, LabelAlignment.ShiftByOne, true);
            set_num_threads(Math.Max(2, Environment.ProcessorCount));
            var many = Run(logits, labels, null, LabelAlignment.ShiftByOne, true);
            var noHuge = Run(logits, labels, null, LabelAlignment.ShiftByOne, true, hugePages: false);
            foreach (var other in new[] { many, noHuge })
            {
                Assert.True(Identical(other.Sum, one.Sum) && Identical(other.Tokens, one.Tokens) && Identical(other.Entropy, one.Entropy), "values differ");
                Assert.True(Identical(other.Grad, one.Grad), "gradients differ");
            }
            Assert.Equal(2, many.KernelCalls);
        }
        finally
        {
            set_num_threads(threads);
        }
    }

    [Fact]
    public void The_fused_head_takes_the_kernel_in_place_and_agrees_with_its_libtorch_path_with_and_without_retained_logits()
    {
        using var scope = NewDisposeScope();
        var g = new Generator(21);
        var hidden = randn(new long[] { 3, 10, 16 }, generator: g);
        var weight = randn(new long[] { 300, 16 }, generator: g) * 0.5;
        var bias = randn(new long[] { 300 }, generator: g) * 0.1;
        var labels = randint(0, 300, new long[] { 3, 10 }, generator: g).masked_fill(rand(new long[] { 3, 10 }, generator: g) < 0.2, -100);
        int recomputed = 0;
        (Tensor Sum, Tensor Gh, Tensor Gw, Tensor Gb, int Calls) Head(bool fused, long? chunk, bool retain = false, bool twice = false)
        {
            var (h, w, b) = (hidden.clone().requires_grad_(true), weight.clone().requires_grad_(true), bias.clone().requires_grad_(true));
            int before = LogSoftmaxRows.CallsOnThisThread, recomputedBefore = FusedLinearLogProbs.RecomputedChunksOnThisThread;
            using var r = FusedLinearLogProbs.Compute(h, w, b, labels, null, LabelAlignment.ShiftByOne,
                new SequenceLogProbsOptions { FusedCpu = fused, ChunkTokens = chunk, RetainHeadLogits = retain });
            var objective = (r.Sum * linspace(-1, 1, 3)).sum();
            if (twice)
            {
                objective.backward(retain_graph: true);                     // the retained logits must survive a first backward
                (h.grad, w.grad, b.grad) = (null, null, null);
            }
            objective.backward();
            recomputed = FusedLinearLogProbs.RecomputedChunksOnThisThread - recomputedBefore;
            return (r.Sum.detach().clone(), h.grad!.clone(), w.grad!.clone(), b.grad!.clone(), LogSoftmaxRows.CallsOnThisThread - before);
        }
        void Agree((Tensor Sum, Tensor Gh, Tensor Gw, Tensor Gb, int Calls) a, (Tensor Sum, Tensor Gh, Tensor Gw, Tensor Gb, int Calls) b, string label)
        {
            Close(a.Sum.to_type(ScalarType.Float64), b.Sum.to_type(ScalarType.Float64), 2e-6, $"{label} sum");
            Close(a.Gh.to_type(ScalarType.Float64), b.Gh.to_type(ScalarType.Float64), 2e-6, $"{label} hidden gradient");
            Close(a.Gw.to_type(ScalarType.Float64), b.Gw.to_type(ScalarType.Float64), 2e-6, $"{label} weight gradient");
            Close(a.Gb.to_type(ScalarType.Float64), b.Gb.to_type(ScalarType.Float64), 2e-6, $"{label} bias gradient");
        }
        foreach (long? chunk in new long?[] { null, 4 })
        {
            var fused = Head(true, chunk);
            var plain = Head(false, chunk);
            Assert.Equal(0, plain.Calls);
            Assert.True(fused.Calls >= 2, $"chunk {chunk}: the kernel ran {fused.Calls} times");
            Agree(fused, plain, $"head chunk {chunk}");
            Assert.True(recomputed > 0);
            // the retained logits (RetainHeadLogits): no chunk recomputed, the same gradients on both paths; a second backward
            // through the retained graph recomputes (the first overwrote them) and agrees too
            Agree(Head(true, chunk, retain: true), plain, $"retained head chunk {chunk}");
            Assert.Equal(0, recomputed);
            Agree(Head(false, chunk, retain: true), plain, $"retained libtorch head chunk {chunk}");
            Assert.Equal(0, recomputed);
            Agree(Head(true, chunk, retain: true, twice: true), plain, $"retained head chunk {chunk}, second backward");
            Assert.True(recomputed > 0, "the second backward must recompute the overwritten logits");
            // the libtorch path works on a copy (its in-place ops would invalidate the saved logits), so both passes reuse them
            Agree(Head(false, chunk, retain: true, twice: true), plain, $"retained libtorch head chunk {chunk}, second backward");
            Assert.Equal(0, recomputed);
        }
    }
}
