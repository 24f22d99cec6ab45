using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>
/// The log-prob step's statistics (entropy, mean logit, argmax accuracy), per-token log-probs and packed (padding-free)
/// batches, against float64 loops over positions and against the padded path.
/// </summary>
public class LogProbStepTests
{
    const int N = 4, T = 7, V = 9;

    static Tensor Mask()
    {
        var m = zeros(N, T, dtype: ScalarType.Bool);
        m[0].narrow(0, 2, 5).fill_(true);
        m[1].narrow(0, 3, 2).fill_(true);
        m[2].narrow(0, 1, 6).fill_(true);
        m[3].narrow(0, 4, 3).fill_(true);
        return m;
    }

    /// <summary>Per-sequence float64 sums over valid positions of entropy, mean logit and first-argmax hits.</summary>
    static (double[] Entropy, double[] LogitMean, double[] Hits, double[] Counts) Loop(Tensor logits, Tensor labels, Tensor mask, bool shift)
    {
        var z = logits.to_type(ScalarType.Float64).contiguous().data<double>().ToArray();
        var y = labels.data<long>().ToArray();
        var m = mask.data<bool>().ToArray();
        int off = shift ? 1 : 0, tt = T - off;
        var (h, lm, hit, c) = (new double[N], new double[N], new double[N], new double[N]);
        for (int i = 0; i < N; i++)
            for (int k = 0; k < tt; k++)
            {
                if (!m[i * T + k + off]) continue;
                var row = Enumerable.Range(0, V).Select(v => z[(i * T + k) * V + v]).ToArray();
                double lse = Oracle.LogSumExp(row);
                h[i] += -row.Where(x => !double.IsNegativeInfinity(x)).Sum(x => Math.Exp(x - lse) * (x - lse));
                lm[i] += row.Average();
                int arg = Array.IndexOf(row, row.Max());
                hit[i] += arg == y[i * T + k + off] ? 1 : 0;
                c[i]++;
            }
        return (h, lm, hit, c);
    }

    [Theory]
    [InlineData(LabelAlignment.Aligned, 3L)]
    [InlineData(LabelAlignment.ShiftByOne, 1000L)]
    public void Statistics_equal_a_float64_loop_and_trls_definitions(LabelAlignment alignment, long chunk)
    {
        using var scope = NewDisposeScope();
        manual_seed(11);
        var logits = randn(N, T, V, dtype: ScalarType.Float64) * 2;
        logits[1, 4, 3] = tensor(double.NegativeInfinity);   // a banned token in a valid row: contributes 0 entropy
        logits[0, 0] = full(V, double.NaN, dtype: ScalarType.Float64);   // masked position: ignored
        var labels = randint(0, V, new long[] { N, T });
        // make some argmax hits certain: label = argmax at a few valid positions (and a tie at the first index)
        labels[2, 3] = logits[2, alignment == LabelAlignment.ShiftByOne ? 2 : 3].argmax();
        labels[1, 4] = tensor(0L);
        var mask = Mask();
        var options = new SequenceLogProbsOptions { StepStatistics = true, ChunkTokens = chunk };
        using var r = SequenceLogProbs.Compute(logits, labels, mask, alignment, options);
        var (h, lm, hit, c) = Loop(logits, labels, mask, alignment == LabelAlignment.ShiftByOne);
        var (gotH, gotLm) = (TensorUtil.Values(r.EntropySum!), TensorUtil.Values(r.LogitMeanSum!));
        for (int i = 0; i < N; i++)
        {
            Assert.Equal(h[i], gotH[i], 11);
            Assert.Equal(lm[i], gotLm[i], 11);
        }
        Assert.Equal(hit, TensorUtil.Values(r.CorrectTokens!));
        Assert.True(hit.Sum() >= 1);
        var s = r.Statistics();
        Assert.Equal(h.Sum() / c.Sum(), s.Entropy, 12);                                    // all completion tokens
        Assert.Equal((hit[0] + hit[1]) / (c[0] + c[1]), s.MeanTokenAccuracy, 12);           // chosen rows only
        Assert.Equal((lm[0] + lm[1]) / (c[0] + c[1]), s.LogitsChosen, 12);
        Assert.Equal((lm[2] + lm[3]) / (c[2] + c[3]), s.LogitsRejected, 12);
        Assert.Equal(s.Entropy, s.ToMetrics()[MetricNames.Entropy]);
        Assert.False(r.EntropySum!.requires_grad);
    }

    [Fact]
    public void Statistics_add_up_over_micro_batches_to_those_of_the_whole_batch()
    {
        using var scope = NewDisposeScope();
        manual_seed(12);
        var logits = randn(N, T, V);
        var labels = randint(0, V, new long[] { N, T });
        var options = new SequenceLogProbsOptions { StepStatistics = true };
        using var whole = SequenceLogProbs.Compute(logits, labels, Mask(), LabelAlignment.ShiftByOne, options);
        // micro-batches of one pair each: rows (0, 2) and (1, 3)
        var parts = new[] { new long[] { 0, 2 }, new long[] { 1, 3 } }.Select(rows =>
        {
            var idx = tensor(rows);
            using var part = SequenceLogProbs.Compute(logits.index_select(0, idx), labels.index_select(0, idx), Mask().index_select(0, idx), LabelAlignment.ShiftByOne, options);
            return part.Statistics();
        }).ToArray();
        var sum = parts[0] + parts[1];
        var w = whole.Statistics();
        Assert.Equal(w.Entropy, sum.Entropy, 5);
        Assert.Equal(w.MeanTokenAccuracy, sum.MeanTokenAccuracy, 12);
        Assert.Equal(w.LogitsChosen, sum.LogitsChosen, 5);
        Assert.Equal(w.LogitsRejected, sum.LogitsRejected, 5);
    }

    [Fact]
    public void Fused_statistics_equal_those_from_the_logits()
    {
        using var scope = NewDisposeScope();
        manual_seed(13);
        var hidden = randn(N, T, 5, dtype: ScalarType.Float64);
        var weight = randn(V, 5, dtype: ScalarType.Float64);
        var bias = randn(V, dtype: ScalarType.Float64);
        var labels = randint(0, V, new long[] { N, T });
        var options = new SequenceLogProbsOptions { StepStatistics = true, WpoTerms = true, ChunkTokens = 4 };
        using var fused = FusedLinearLogProbs.Compute(hidden, weight, bias, labels, Mask(), LabelAlignment.ShiftByOne, options);
        using var plain = SequenceLogProbs.Compute(hidden.matmul(weight.t()) + bias, labels, Mask(), LabelAlignment.ShiftByOne, options);
        foreach (var (a, b) in new[] { (fused.EntropySum!, plain.EntropySum!), (fused.LogitMeanSum!, plain.LogitMeanSum!), (fused.CorrectTokens!, plain.CorrectTokens!), (fused.WpoTerm!, plain.WpoTerm!) })
            Assert.True(allclose(a, b, 1e-12, 1e-12));
        Assert.Throws<InvalidOperationException>(() => SequenceLogProbs.Compute(randn(2, 3, 4), randint(0, 4, new long[] { 2, 3 }), null, LabelAlignment.Aligned).Statistics());
    }

    [Fact]
    public void Token_log_probs_are_differentiable_and_zero_where_they_do_not_count()
    {
        using var scope = NewDisposeScope();
        manual_seed(14);
        var data = randn(N, T, V, dtype: ScalarType.Float64);
        var logits = data.clone().requires_grad_(true);
        var labels = randint(0, V, new long[] { N, T });
        using var r = SequenceLogProbs.Compute(logits, labels, Mask(), LabelAlignment.ShiftByOne, new SequenceLogProbsOptions { ChunkTokens = 5 });
        Assert.Equal(new long[] { N, T - 1 }, r.TokenLogProbs.shape);
        Assert.True(allclose(r.TokenLogProbs.sum(1), r.Sum, 1e-12, 1e-12));
        Assert.Equal(0.0, r.TokenLogProbs.masked_select(r.TokenMask.logical_not()).abs().sum().ToDouble());
        var w = randn(N, T - 1, dtype: ScalarType.Float64);
        (r.TokenLogProbs * w).sum().backward();
        // reference: autograd through plain log_softmax
        var reference = data.clone().requires_grad_(true);
        var logp = reference.narrow(1, 0, T - 1).log_softmax(2).gather(2, labels.narrow(1, 1, T - 1).unsqueeze(2)).squeeze(2);
        (logp * w * Mask().narrow(1, 1, T - 1)).sum().backward();
        Assert.True(allclose(logits.grad!, reference.grad!, 1e-12, 1e-12));
    }

    // ---- packed (padding-free) batches ----

    /// <summary>
    /// A packed row from per-sequence pieces: sequence s is rows[s] of the padded batch trimmed to its length, so that
    /// the packed result must equal the padded one sequence by sequence.
    /// </summary>
    static (Tensor Logits, Tensor Labels, Tensor Mask, SequenceBoundaries Boundaries) Pack(Tensor logits, Tensor labels, Tensor mask, long[] lengths, long trailing)
    {
        var parts = Enumerable.Range(0, lengths.Length).Select(i => (logits[i].narrow(0, 0, lengths[i]), labels[i].narrow(0, 0, lengths[i]), mask[i].narrow(0, 0, lengths[i]))).ToList();
        var l = cat(parts.Select(p => p.Item1).Append(randn(trailing, logits.shape[2], dtype: logits.dtype)).ToArray(), 0).unsqueeze(0);
        var y = cat(parts.Select(p => p.Item2).Append(randint(0, logits.shape[2], new[] { trailing })).ToArray(), 0).unsqueeze(0);
        var m = cat(parts.Select(p => p.Item3).Append(ones(trailing, dtype: ScalarType.Bool)).ToArray(), 0).unsqueeze(0);
        return (l, y, m, SequenceBoundaries.FromLengths(lengths));
    }

    [Theory]
    [InlineData(LabelAlignment.ShiftByOne, 1000L, null)]
    [InlineData(LabelAlignment.ShiftByOne, 3L, 0.3)]
    [InlineData(LabelAlignment.Aligned, 2L, 0.0)]
    public void A_packed_batch_gives_each_sequence_exactly_its_padded_log_prob_and_gradient(LabelAlignment alignment, long chunk, double? ldAlpha)
    {
        using var scope = NewDisposeScope();
        manual_seed(15);
        var data = randn(N, T, V, dtype: ScalarType.Float64) * 2;
        var labels = randint(0, V, new long[] { N, T });
        var mask = Mask();
        var lengths = new long[] { 7, 5, 7, 7 };   // sequence 1 ends at its last completion token
        // the padded reference only sees each sequence's own positions
        var trimmedMask = mask.clone();
        trimmedMask[1].narrow(0, 5, 2).fill_(false);
        var options = new SequenceLogProbsOptions { ChunkTokens = chunk, LdAlpha = ldAlpha, StepStatistics = true, WpoTerms = true };
        var padded = data.clone().requires_grad_(true);
        using var a = SequenceLogProbs.Compute(padded, labels, trimmedMask, alignment, options);
        var (pl, py, pm, boundaries) = Pack(data, labels, trimmedMask, lengths, trailing: 3);
        var packed = pl.clone().requires_grad_(true);
        using var b = SequenceLogProbs.Compute(packed, py, pm, boundaries, alignment, options);
        Assert.True(b.IsPacked);
        foreach (var (x, y) in new[] { (a.Sum, b.Sum), (a.TokenCounts, b.TokenCounts), (a.WpoTerm!, b.WpoTerm!), (a.EntropySum!, b.EntropySum!), (a.CorrectTokens!, b.CorrectTokens!) })
            Assert.True(allclose(x, y, 1e-12, 1e-12), $"{string.Join(",", TensorUtil.Values(x))} vs {string.Join(",", TensorUtil.Values(y))}");
        var g = tensor(new[] { 1.0, -0.5, 2.0, 0.25 }, dtype: ScalarType.Float64);
        (a.Sum * g).sum().backward();
        (b.Sum * g).sum().backward();
        // the packed gradient, cut back into sequences, is the padded one; trailing padding gets none
        long offset = 0;
        for (int i = 0; i < N; i++)
        {
            Assert.True(allclose(packed.grad![0].narrow(0, offset, lengths[i]), padded.grad![i].narrow(0, 0, lengths[i]), 1e-12, 1e-12), $"sequence {i}");
            offset += lengths[i];
        }
        Assert.Equal(0.0, packed.grad![0].narrow(0, offset, 3).abs().sum().ToDouble());
    }

    [Fact]
    public void Shifted_packed_scoring_never_crosses_a_boundary()
    {
        using var scope = NewDisposeScope();
        // two sequences of 3 tokens; every label counts: the logit at position 2 (end of sequence 0) must not score token 3
        var logits = randn(1, 6, 5, dtype: ScalarType.Float64);
        var labels = randint(0, 5, new long[] { 1, 6 });
        using var r = SequenceLogProbs.Compute(logits, labels, null, SequenceBoundaries.FromLengths(new long[] { 3, 3 }), LabelAlignment.ShiftByOne);
        Assert.Equal(new[] { 2.0, 2.0 }, TensorUtil.Values(r.TokenCounts));
        Assert.False(r.TokenMask[0, 2].item<bool>());
        var logp = logits[0].log_softmax(1);
        double expected0 = logp[0, labels[0, 1]].ToDouble() + logp[1, labels[0, 2]].ToDouble();
        Assert.Equal(expected0, TensorUtil.Values(r.Sum)[0], 12);
    }

    [Fact]
    public void Fused_packed_equals_fused_padded()
    {
        using var scope = NewDisposeScope();
        manual_seed(16);
        var hidden = randn(N, T, 4, dtype: ScalarType.Float64);
        var weight = randn(V, 4, dtype: ScalarType.Float64).requires_grad_(true);
        var labels = randint(0, V, new long[] { N, T });
        var lengths = new long[] { 7, 7, 7, 7 };
        using var a = FusedLinearLogProbs.Compute(hidden, weight, null, labels, Mask(), LabelAlignment.ShiftByOne);
        var (ph, py, pm, boundaries) = Pack(hidden, labels, Mask(), lengths, trailing: 0);
        using var b = FusedLinearLogProbs.Compute(ph, weight, null, py, pm, boundaries, LabelAlignment.ShiftByOne);
        Assert.True(allclose(a.Sum, b.Sum, 1e-12, 1e-12));
        var ga = autograd.grad(new[] { a.Sum.sum() }, new[] { weight })[0];
        var gb = autograd.grad(new[] { b.Sum.sum() }, new[] { weight })[0];
        Assert.True(allclose(ga, gb, 1e-12, 1e-12));
    }

    [Fact]
    public void Packed_inputs_and_boundaries_are_validated()
    {
        using var scope = NewDisposeScope();
        var boundaries = SequenceBoundaries.FromLengths(new long[] { 2, 3 });
        var e = Assert.Throws<ArgumentException>(() => SequenceLogProbs.Compute(randn(2, 5, 4), randint(0, 4, new long[] { 2, 5 }), null, boundaries, LabelAlignment.Aligned));
        Assert.Equal("logits", e.ParamName);
        Assert.Contains("[1, Total", e.Message);
        e = Assert.Throws<ArgumentException>(() => SequenceLogProbs.Compute(randn(1, 4, 4), randint(0, 4, new long[] { 1, 4 }), null, boundaries, LabelAlignment.Aligned));
        Assert.Equal("boundaries", e.ParamName);
        Assert.Throws<ArgumentException>(() => new SequenceBoundaries(new long[] { 1, 3 }));
        Assert.Throws<ArgumentException>(() => new SequenceBoundaries(new long[] { 0, 3, 3 }));
        Assert.Throws<ArgumentException>(() => new SequenceBoundaries(new long[] { 0 }));
        Assert.Throws<ArgumentException>(() => SequenceBoundaries.FromLengths(new long[] { 2, 0 }));
        Assert.Equal(new long[] { 0, 2, 5 }, SequenceBoundaries.FromTensor(tensor(new[] { 0, 2, 5 })).CumulativeLengths);
        Assert.Equal(new long[] { 0, 1, 0, 1, 2, 3 }, boundaries.PositionIds(6).data<long>().ToArray());
        var attention = boundaries.CausalAttentionMask();
        Assert.True(attention[3, 2].item<bool>());
        Assert.False(attention[2, 1].item<bool>());   // across the boundary
        Assert.False(attention[2, 3].item<bool>());   // the future
    }
}
