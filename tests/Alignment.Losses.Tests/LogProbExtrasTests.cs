using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>
/// LD-DPO's shared-length/tail split and WPO's per-sequence term, produced in the same chunked pass as the log-probs, by
/// <see cref="SequenceLogProbs"/> and <see cref="FusedLinearLogProbs"/>, against a float64 loop over positions.
/// </summary>
public class LogProbExtrasTests
{
    const int N = 4, T = 6, V = 7;   // rows 0-1 chosen, rows 2-3 rejected: pairs (0, 2) and (1, 3)

    static Tensor Mask()
    {
        var m = zeros(N, T, dtype: ScalarType.Bool);
        m[0].narrow(0, 1, 5).fill_(true);   // chosen 0: 5 completion positions
        m[2].narrow(0, 2, 2).fill_(true);   // rejected 0: 2 -> shared 2, chosen tail 3
        m[1].narrow(0, 3, 2).fill_(true);   // chosen 1: 2
        m[3].narrow(0, 1, 4).fill_(true);   // rejected 1: 4 -> shared 2, rejected tail 2
        return m;
    }

    /// <summary>The loop reference in the aligned frame: LD-weighted sums, their gradient for row weights g, and WPO terms.</summary>
    static (double[] Sum, double[,,] Grad, double[] Wpo) Reference(Tensor logits, Tensor labels, Tensor mask, double? ldAlpha, double[] g, bool shift)
    {
        var z = logits.to_type(ScalarType.Float64).contiguous().data<double>().ToArray();
        var y = labels.data<long>().ToArray();
        var m = mask.data<bool>().ToArray();
        int tt = shift ? T - 1 : T, off = shift ? 1 : 0;
        bool Valid(int i, int k) => m[i * T + k + off];
        var lengths = Enumerable.Range(0, N).Select(i => Enumerable.Range(0, tt).Count(k => Valid(i, k))).ToArray();
        var sum = new double[N]; var wpo = new double[N]; var grad = new double[N, T, V];
        for (int i = 0; i < N; i++)
        {
            int shared = Math.Min(lengths[i % 2], lengths[i % 2 + 2]), position = 0;
            for (int k = 0; k < tt; k++)
            {
                if (!Valid(i, k)) continue;
                position++;
                double w = ldAlpha is { } a && position > shared ? a : 1;
                var row = Enumerable.Range(0, V).Select(c => z[(i * T + k) * V + c]).ToArray();
                double lse = Oracle.LogSumExp(row), lse2 = Oracle.LogSumExp(row.Select(v => 2 * v).ToArray());
                long label = y[i * T + k + off];
                double logp = row[label] - lse;
                sum[i] += w * logp;
                wpo[i] += logp - (lse2 - 2 * lse);
                for (int c = 0; c < V; c++) grad[i, k, c] = g[i] * w * ((c == label ? 1 : 0) - Math.Exp(row[c] - lse));
            }
        }
        return (sum, grad, wpo);
    }

    [Theory]
    [InlineData(LabelAlignment.Aligned, 0.3, 2L)]
    [InlineData(LabelAlignment.ShiftByOne, 0.0, 4L)]
    [InlineData(LabelAlignment.ShiftByOne, 0.7, 1024L)]
    public void Ld_weights_and_wpo_terms_equal_a_float64_loop(LabelAlignment alignment, double ldAlpha, long chunk)
    {
        using var scope = NewDisposeScope();
        manual_seed(4);
        var data = randn(N, T, V, dtype: ScalarType.Float64) * 2;
        var logits = data.clone().requires_grad_(true);
        var labels = randint(0, V, new long[] { N, T });
        var mask = Mask();
        var options = new SequenceLogProbsOptions { LdAlpha = ldAlpha, WpoTerms = true, ChunkTokens = chunk };
        using var r = SequenceLogProbs.Compute(logits, labels, mask, alignment, options);
        var g = new[] { 1.0, -2.0, 0.5, 3.0 };
        (r.Sum * tensor(g, dtype: ScalarType.Float64)).sum().backward();
        var (sum, grad, wpo) = Reference(data, labels, mask, ldAlpha, g, alignment == LabelAlignment.ShiftByOne);
        var gotSum = TensorUtil.Values(r.Sum);
        var gotWpo = TensorUtil.Values(r.WpoTerm!);
        var gotGrad = logits.grad!.contiguous().data<double>().ToArray();
        for (int i = 0; i < N; i++)
        {
            Assert.Equal(sum[i], gotSum[i], 11);
            Assert.Equal(wpo[i], gotWpo[i], 11);
            for (int k = 0; k < T; k++)
                for (int c = 0; c < V; c++)
                    Assert.Equal(grad[i, k, c], gotGrad[(i * T + k) * V + c], 11);
        }
        Assert.False(r.WpoTerm!.requires_grad);
        // pair weights: exp(mean per token) of the chosen times that of the rejected
        var counts = TensorUtil.Values(r.TokenCounts);
        var weights = TensorUtil.Values(r.WpoPairWeights());
        for (int p = 0; p < 2; p++)
            Assert.Equal(Math.Exp(wpo[p] / counts[p]) * Math.Exp(wpo[p + 2] / counts[p + 2]), weights[p], 12);
    }

    [Fact]
    public void Ld_alpha_one_is_plain_sums_and_an_odd_batch_is_refused()
    {
        using var scope = NewDisposeScope();
        var logits = randn(N, T, V, dtype: ScalarType.Float64);
        var labels = randint(0, V, new long[] { N, T });
        using var plain = SequenceLogProbs.Compute(logits, labels, Mask(), LabelAlignment.Aligned);
        using var one = SequenceLogProbs.Compute(logits, labels, Mask(), LabelAlignment.Aligned, new SequenceLogProbsOptions { LdAlpha = 1 });
        Assert.Equal(TensorUtil.Values(plain.Sum), TensorUtil.Values(one.Sum));
        Assert.Null(plain.WpoTerm);
        Assert.Throws<InvalidOperationException>(() => plain.WpoPairWeights());
        var e = Assert.Throws<ArgumentException>(() => SequenceLogProbs.Compute(randn(3, T, V), randint(0, V, new long[] { 3, T }), null, LabelAlignment.Aligned,
            new SequenceLogProbsOptions { LdAlpha = 0.5 }));
        Assert.Equal("logits", e.ParamName);
        Assert.Throws<ArgumentOutOfRangeException>(() => new SequenceLogProbsOptions { LdAlpha = -0.1 });
    }

    [Fact]
    public void The_fused_path_gives_the_same_ld_sums_wpo_terms_and_gradients_as_the_logits_path()
    {
        using var scope = NewDisposeScope();
        manual_seed(6);
        const int H = 5;
        var hidden0 = randn(N, T, H, dtype: ScalarType.Float64);
        var weight0 = randn(V, H, dtype: ScalarType.Float64) * 0.7;
        var labels = randint(0, V, new long[] { N, T });
        var options = new SequenceLogProbsOptions { LdAlpha = 0.4, WpoTerms = true, ChunkTokens = 3 };
        var g = tensor(new[] { 0.5, -1.0, 2.0, 1.5 }, dtype: ScalarType.Float64);

        var (h1, w1) = (hidden0.clone().requires_grad_(true), weight0.clone().requires_grad_(true));
        using var fused = FusedLinearLogProbs.Compute(h1, w1, null, labels, Mask(), LabelAlignment.ShiftByOne, options);
        (fused.Sum * g).sum().backward();

        var (h2, w2) = (hidden0.clone().requires_grad_(true), weight0.clone().requires_grad_(true));
        using var viaLogits = SequenceLogProbs.Compute(h2.matmul(w2.t()), labels, Mask(), LabelAlignment.ShiftByOne, options);
        (viaLogits.Sum * g).sum().backward();

        Assert.True(allclose(fused.Sum, viaLogits.Sum, 1e-12, 1e-12));
        Assert.True(allclose(fused.WpoTerm!, viaLogits.WpoTerm!, 1e-12, 1e-12));
        Assert.True(allclose(h1.grad!, h2.grad!, 1e-11, 1e-12));
        Assert.True(allclose(w1.grad!, w2.grad!, 1e-11, 1e-12));
    }

    [Fact]
    public void Wpo_pair_weights_feed_any_pairwise_loss_as_example_weights()
    {
        using var scope = NewDisposeScope();
        var logits = (randn(N, T, V, dtype: ScalarType.Float64) * 2).requires_grad_(true);
        var labels = randint(0, V, new long[] { N, T });
        using var logps = SequenceLogProbs.Compute(logits, labels, Mask(), LabelAlignment.ShiftByOne, new SequenceLogProbsOptions { WpoTerms = true });
        var weights = logps.WpoPairWeights();
        var policy = logps.ToPreferenceLogps();
        using var plain = new DpoLoss().Compute(new PreferenceBatch(policy));
        using var wpo = new DpoLoss().Compute(new PreferenceBatch(policy) { ExampleWeights = weights });
        Assert.True(allclose(wpo.PerExample, plain.PerExample * weights, 1e-14, 1e-14));
    }
}
