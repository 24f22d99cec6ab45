using Alignment.Losses;

namespace Alignment.Losses.Tests;

public class TokenKlTests
{
    static double[][] Rows(Tensor t) => Enumerable.Range(0, (int)t.shape[0]).Select(i => TensorUtil.Values(t[i])).ToArray();

    [Theory]
    [InlineData(1L << 20)]   // one chunk
    [InlineData(7L)]         // one row per chunk: V = 11 does not divide the chunk
    [InlineData(25L)]        // two rows per chunk, a partial last chunk
    public void Kl_and_its_gradient_equal_the_exact_tabular_values(long chunkElements)
    {
        using var scope = NewDisposeScope();
        int s = 3, t = 4, v = 11;
        var policy = (randn(s, t, v, dtype: ScalarType.Float64) * 2).requires_grad_(true);
        var reference = randn(s, t, v, dtype: ScalarType.Float64) * 2;
        var mask = tensor(new double[] { 1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0 }, dtype: ScalarType.Float64).reshape(s, t);
        var kl = TokenKl.Compute(policy, reference, mask, chunkElements);
        var weights = TensorUtil.Values(torch.arange(1, s + 1, dtype: ScalarType.Float64));
        (kl * tensor(weights, dtype: ScalarType.Float64)).sum().backward();

        var p = policy.detach(); var m = TensorUtil.Values(mask.flatten());
        var grad = TensorUtil.Values(policy.grad!.flatten());
        for (int a = 0; a < s; a++)
        {
            double expected = 0;
            for (int b = 0; b < t; b++)
            {
                var pl = TensorUtil.Values(p[a, b]); var ql = TensorUtil.Values(reference[a, b]);
                double klPos = Oracle.Kl(pl, ql);
                expected += m[a * t + b] * klPos;
                double lse = Oracle.LogSumExp(pl), lseq = Oracle.LogSumExp(ql);
                for (int c = 0; c < v; c++)
                {
                    double lp = pl[c] - lse, lq = ql[c] - lseq;
                    double want = weights[a] * m[a * t + b] * Math.Exp(lp) * ((lp - lq) - klPos);
                    Assert.Equal(want, grad[(a * t + b) * v + c], 10);
                }
            }
            Assert.Equal(expected, TensorUtil.Values(kl)[a], 10);
        }
    }

    [Fact]
    public void Kl_is_zero_when_policy_equals_reference_and_no_gradient_reaches_the_reference()
    {
        using var scope = NewDisposeScope();
        var logits = randn(2, 3, 7);
        var policy = logits.clone().requires_grad_(true);
        var reference = logits.clone().requires_grad_(true);
        var kl = TokenKl.Compute(policy, reference, ones(2, 3));
        Assert.True(kl.abs().max().ToDouble() < 1e-6);
        kl.sum().backward();
        Assert.True(policy.grad!.abs().max().ToDouble() < 1e-6);
        Assert.Null(reference.grad);
    }

    [Fact]
    public void Bf16_logits_give_float32_kl_and_a_bf16_gradient()
    {
        using var scope = NewDisposeScope();
        var p32 = randn(2, 5, 9);
        var policy = p32.to_type(ScalarType.BFloat16).requires_grad_(true);
        var reference = randn(2, 5, 9).to_type(ScalarType.BFloat16);
        var kl = TokenKl.Compute(policy, reference, ones(2, 5));
        Assert.Equal(ScalarType.Float32, kl.dtype);
        var exact = TokenKl.Compute(policy.detach().to_type(ScalarType.Float64), reference.to_type(ScalarType.Float64), ones(2, 5));
        Assert.True((kl.to_type(ScalarType.Float64) - exact).abs().max().ToDouble() < 1e-5);
        kl.sum().backward();
        Assert.Equal(ScalarType.BFloat16, policy.grad!.dtype);
    }

    [Fact]
    public void Spo_with_a_kl_estimate_adds_beta_r_times_its_mean_and_reports_it()
    {
        using var scope = NewDisposeScope();
        var policy = new PreferenceLogps(tensor(new[] { -3.0, -5 }), tensor(new[] { -4.0, -4 }));
        var kl = tensor(new[] { 0.5, 1.5 });
        using var with = SpoLoss.Compute(policy, kl, new SpoOptions { KlWeight = 0.2 });
        using var without = SpoLoss.Compute(policy, null, new SpoOptions { KlWeight = 0 });
        Assert.Equal(without.Loss.ToDouble() + 0.2 * 1.0, with.Loss.ToDouble(), 12);
        Assert.Equal(1.0, with[MetricNames.SpoKl], 12);
        Assert.Equal("spo", new SpoLoss(new SpoOptions { KlWeight = 0.2 }).Name);
        Assert.Equal("spo_no_kl", new SpoLoss(new SpoOptions { KlWeight = 0 }).Name);
        // the regulariser is never dropped silently: a positive weight without a KL estimate is a named error
        var e = Assert.Throws<ArgumentException>(() => SpoLoss.Compute(policy, null, new SpoOptions { KlWeight = 0.2 }));
        Assert.Equal("batch.KlDivergence", e.ParamName);
    }
}
