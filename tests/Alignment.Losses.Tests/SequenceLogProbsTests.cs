using Alignment.Losses;

namespace Alignment.Losses.Tests;

public class SequenceLogProbsTests
{
    /// <summary>float64 loop reference: sum over valid positions of log softmax(logits)[label], and its gradient for weights w.</summary>
    static (double[] Sum, double[] Count, double[,,] Grad) Reference(double[,,] z, long[,] y, bool[,] valid, double[] w)
    {
        int n = z.GetLength(0), t = z.GetLength(1), v = z.GetLength(2);
        var sum = new double[n]; var count = new double[n]; var grad = new double[n, t, v];
        for (int i = 0; i < n; i++)
            for (int k = 0; k < t; k++)
            {
                if (!valid[i, k]) continue;
                var row = Enumerable.Range(0, v).Select(c => z[i, k, c]).ToArray();
                double lse = Oracle.LogSumExp(row);
                sum[i] += row[y[i, k]] - lse;
                count[i]++;
                for (int c = 0; c < v; c++) grad[i, k, c] = w[i] * ((c == y[i, k] ? 1 : 0) - Math.Exp(row[c] - lse));
            }
        return (sum, count, grad);
    }

    static double[,,] ToArray3(Tensor t)
    {
        var flat = TensorUtil.Values(t.contiguous().flatten());
        int a = (int)t.shape[0], b = (int)t.shape[1], c = (int)t.shape[2];
        var r = new double[a, b, c];
        for (int i = 0; i < flat.Length; i++) r[i / (b * c), i / c % b, i % c] = flat[i];
        return r;
    }

    [Theory]
    [InlineData(LabelAlignment.Aligned, 1024L, ScalarType.Float64, 1e-12)]
    [InlineData(LabelAlignment.Aligned, 2L, ScalarType.Float64, 1e-12)]       // T = 5 is not a multiple of the chunk
    [InlineData(LabelAlignment.ShiftByOne, 3L, ScalarType.Float64, 1e-12)]
    [InlineData(LabelAlignment.ShiftByOne, 1L, ScalarType.Float32, 1e-5)]
    public void Values_and_gradients_equal_a_float64_reference(LabelAlignment alignment, long chunk, ScalarType dtype, double tol)
    {
        using var scope = NewDisposeScope();
        int n = 3, t = 5, v = 7;
        var logitsData = randn(n, t, v, dtype: ScalarType.Float64) * 3;
        var logits = logitsData.to_type(dtype).requires_grad_(true);
        var labels = randint(0, v, new long[] { n, t });
        labels[0, 2] = tensor(-100L);                                           // ignore index
        var mask = ones(n, t, dtype: ScalarType.Bool);
        mask[2] = tensor(false);                                                // an empty row
        mask[1, 0] = tensor(false);
        using var r = SequenceLogProbs.Compute(logits, labels, mask, alignment, new SequenceLogProbsOptions { ChunkTokens = chunk });
        var w = new[] { 1.0, -2.0, 0.5 };
        (r.Sum * tensor(w, dtype: r.Sum.dtype)).sum().backward();

        // the reference, in the aligned frame
        var z = ToArray3(logitsData.to_type(dtype).to_type(ScalarType.Float64));
        var lab = labels.data<long>().ToArray();
        var msk = mask.data<bool>().ToArray();
        int tt = alignment == LabelAlignment.ShiftByOne ? t - 1 : t, shift = alignment == LabelAlignment.ShiftByOne ? 1 : 0;
        var zz = new double[n, tt, v]; var yy = new long[n, tt]; var valid = new bool[n, tt];
        for (int i = 0; i < n; i++)
            for (int k = 0; k < tt; k++)
            {
                for (int c = 0; c < v; c++) zz[i, k, c] = z[i, k, c];
                long label = lab[i * t + k + shift];
                valid[i, k] = msk[i * t + k + shift] && label != -100;
                yy[i, k] = valid[i, k] ? label : 0;
            }
        var (sum, count, grad) = Reference(zz, yy, valid, w);
        var gotSum = TensorUtil.Values(r.Sum); var gotCount = TensorUtil.Values(r.TokenCounts); var gotMean = TensorUtil.Values(r.Mean);
        var gotGrad = ToArray3(logits.grad!);
        for (int i = 0; i < n; i++)
        {
            Assert.Equal(sum[i], gotSum[i], tol * Math.Max(1, Math.Abs(sum[i])));
            Assert.Equal(count[i], gotCount[i]);
            Assert.Equal(count[i] == 0 ? 0 : sum[i] / count[i], gotMean[i], tol * 10);
            for (int k = 0; k < t; k++)
                for (int c = 0; c < v; c++)
                    Assert.Equal(k < tt ? grad[i, k, c] : 0, gotGrad[i, k, c], tol * 10);
        }
        Assert.Equal(0, gotSum[2]);                                             // empty row: sum 0, count 0, mean 0
        Assert.Equal(dtype, logits.grad!.dtype);
        Assert.True(r.Sum.requires_grad && r.Mean.requires_grad, "Sum and Mean must both be differentiable");
        Assert.False(r.TokenCounts.requires_grad);
    }

    [Fact]
    public void Single_token_and_non_contiguous_inputs_work_without_copying_the_whole_tensor()
    {
        using var scope = NewDisposeScope();
        var one = randn(1, 1, 11, dtype: ScalarType.Float64).requires_grad_(true);
        using var r1 = SequenceLogProbs.Compute(one, tensor(new long[] { 4 }).reshape(1, 1), null, LabelAlignment.Aligned);
        Assert.Equal(nn.functional.log_softmax(one.detach(), 2)[0, 0, 4].ToDouble(), r1.Sum.ToDouble(), 12);

        var storage = randn(6, 2, 9, dtype: ScalarType.Float64);                // [T, N, V]
        var view = storage.transpose(0, 1).requires_grad_(true);                // [N, T, V], non-contiguous
        Assert.False(view.is_contiguous());
        var labels = randint(0, 9, new long[] { 2, 6 });
        using var r = SequenceLogProbs.Compute(view, labels, null, LabelAlignment.Aligned, new SequenceLogProbsOptions { ChunkTokens = 4 });
        var naive = nn.functional.log_softmax(view.detach().contiguous(), 2).gather(2, labels.unsqueeze(2)).squeeze(2).sum(1);
        Assert.True(allclose(r.Sum, naive, 1e-12, 1e-12));
        r.Sum.sum().backward();
        Assert.Equal(view.shape, view.grad!.shape);
    }

    [Fact]
    public void Bf16_logits_accumulate_in_float32_and_return_a_bf16_gradient()
    {
        using var scope = NewDisposeScope();
        var logits = (randn(2, 16, 50) * 4).to_type(ScalarType.BFloat16).requires_grad_(true);
        var labels = randint(0, 50, new long[] { 2, 16 });
        using var r = SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.Aligned, new SequenceLogProbsOptions { ChunkTokens = 5 });
        Assert.Equal(ScalarType.Float32, r.Sum.dtype);
        var exact = nn.functional.log_softmax(logits.detach().to_type(ScalarType.Float64), 2).gather(2, labels.unsqueeze(2)).squeeze(2).sum(1);
        Assert.True((r.Sum.to_type(ScalarType.Float64) - exact).abs().max().ToDouble() < 1e-4 * exact.abs().max().ToDouble());
        r.Sum.sum().backward();
        Assert.Equal(ScalarType.BFloat16, logits.grad!.dtype);
    }

    [Fact]
    public void Bad_labels_and_non_finite_logits_are_clear_errors_but_masked_nan_is_ignored()
    {
        using var scope = NewDisposeScope();
        var logits = randn(2, 3, 5);
        var labels = tensor(new long[] { 1, 2, 5, 0, 1, 2 }).reshape(2, 3);
        var e = Assert.Throws<ArgumentException>(() => SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.Aligned));
        Assert.Equal("labels", e.ParamName);
        Assert.Contains("sequence 0, position 2", e.Message);
        Assert.Throws<ArgumentException>(() => SequenceLogProbs.Compute(logits, labels.to_type(ScalarType.Int32), null, LabelAlignment.Aligned));

        var ok = tensor(new long[] { 1, 2, 3, 0, 1, 2 }).reshape(2, 3);
        var nanLogits = logits.clone();
        nanLogits[1, 1, 3] = tensor(float.NaN);
        var e2 = Assert.Throws<ArgumentException>(() => SequenceLogProbs.Compute(nanLogits, ok, null, LabelAlignment.Aligned));
        Assert.Contains("sequence(s) 1", e2.Message);
        var mask = ones(2, 3); mask[1, 1] = tensor(0f);
        using var r = SequenceLogProbs.Compute(nanLogits, ok, mask, LabelAlignment.Aligned);
        Assert.True(isfinite(r.Sum).all().item<bool>());
    }

    [Fact]
    public void Stacked_chosen_rejected_rows_split_into_paired_logps_with_token_counts()
    {
        using var scope = NewDisposeScope();
        using var r = SequenceLogProbs.Compute(randn(4, 3, 6), randint(0, 6, new long[] { 4, 3 }), null, LabelAlignment.Aligned);
        var p = r.ToPreferenceLogps();
        Assert.Equal(2, p.ChosenCount);
        Assert.Equal(TensorUtil.Values(r.Sum)[2], TensorUtil.Values(p.Rejected)[0]);
        Assert.Equal(3.0, TensorUtil.Values(p.ChosenTokenCounts!)[0]);
    }
}
