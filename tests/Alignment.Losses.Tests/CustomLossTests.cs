using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>Options of the test's own loss: DPO with a per-pair target margin gamma * (s_w - s_l) from response scores.</summary>
// BetaOptions: a validated Beta in [1e-12, 1e12] (default 0.1), with the shared CheckFinite; options validate on construction
public sealed record MarginDpoOptions : BetaOptions
{
    public MarginDpoOptions() => Beta = 0.5;

    public double Gamma
    {
        get;
        init => field = value is >= 0 and <= 1e6 ? value : throw new ArgumentOutOfRangeException(nameof(Gamma), value, "Gamma must lie in [0, 1e6].");
    } = 1.0;
}

/// <summary>
/// A loss written the way a user writes one, through the public extension point: softplus(-(beta h - gamma (s_w - s_l))),
/// with a required side input and a value check of its own. The base provides validation, the upcast, the standard metrics, the NaN/Inf check, the value checks
/// and the single synchronisation.
/// </summary>
public sealed class MarginDpo(MarginDpoOptions? options = null) : PreferenceLoss<MarginDpoOptions>(options ?? new())
{
    public override string Name => "margin_dpo";

    protected override double RewardScale => Options.Beta;

    protected override IEnumerable<(Tensor? Tensor, string Name)> Validate(PreferenceBatch batch, ValueChecks checks)
    {
        var scores = batch.Scores ?? throw new ArgumentException("margin_dpo needs response scores.", "batch.Scores");
        CheckPerExample(scores.Chosen, batch, "scores.Chosen", "chosen scores");
        CheckPerExample(scores.Rejected, batch, "scores.Rejected", "rejected scores");
        checks.Add((scores.Chosen >= scores.Rejected).all(), () => new ArgumentException("chosen scores must not be below rejected ones.", "batch.Scores"));
        return new (Tensor?, string)[] { (scores.Chosen, "scores.Chosen"), (scores.Rejected, "scores.Rejected") };
    }

    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var target = (terms.Upcast(batch.Scores!.Chosen) - terms.Upcast(batch.Scores.Rejected)) * Options.Gamma;
        var z = terms.Margin * Options.Beta - target;
        return new(PreferenceMath.NegLogSigmoid(z), new[] { ("margin_dpo/past_target", (z > 0).to_type(terms.DType).mean()) });
    }
}

public class CustomLossTests
{
    static readonly double[] Pc = { -10, -20, -15 }, Pr = { -12, -19, -18 }, Rc = { -11, -20, -15.5 }, Rr = { -11, -19.5, -17 }, Sw = { 2, 1.5, 1 }, Sl = { 1, 1.5, 0.5 };

    static PreferenceBatch Batch(ScalarType dtype, out Tensor chosen, out Tensor rejected)
    {
        chosen = TensorUtil.Leaf(Pc, dtype);
        rejected = TensorUtil.Leaf(Pr, dtype);
        return new PreferenceBatch(new PreferenceLogps(chosen, rejected), new PreferenceLogps(TensorUtil.Const(Rc, dtype), TensorUtil.Const(Rr, dtype)))
        {
            Scores = new ResponseScores(TensorUtil.Const(Sw, dtype), TensorUtil.Const(Sl, dtype)),
        };
    }

    [Fact]
    public void The_custom_options_validate_on_construction_like_the_librarys()
    {
        Assert.Equal(0.5, new MarginDpoOptions().Beta);
        Assert.Equal(2.0, new MarginDpoOptions { Beta = 2 }.Beta);
        Assert.Throws<ArgumentOutOfRangeException>(() => new MarginDpoOptions { Beta = 0 });          // BetaOptions' own check
        Assert.Throws<ArgumentOutOfRangeException>(() => new MarginDpoOptions { Gamma = -1 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new MarginDpoOptions { Gamma = double.NaN });
    }

    [Fact]
    public void A_users_loss_gets_the_formula_gradients_and_standard_metrics_of_the_base()
    {
        using var scope = NewDisposeScope();
        var batch = Batch(ScalarType.Float64, out var chosen, out var rejected);
        using var r = new MarginDpo(new MarginDpoOptions { Gamma = 0.5 }).Compute(batch);
        r.Loss.backward();
        // float64 oracle: mean_i softplus(-z_i), z = 0.5 h - 0.5 (s_w - s_l); d/dl_w = -0.5 sigmoid(-z) / B
        double loss = 0;
        var z = new double[3];
        for (int i = 0; i < 3; i++)
        {
            double h = (Pc[i] - Rc[i]) - (Pr[i] - Rr[i]);
            z[i] = 0.5 * h - 0.5 * (Sw[i] - Sl[i]);
            loss += Oracle.Softplus(-z[i]) / 3;
            Assert.Equal(-0.5 * Oracle.Sigmoid(-z[i]) / 3, TensorUtil.Values(chosen.grad!)[i], 12);
            Assert.Equal(0.5 * Oracle.Sigmoid(-z[i]) / 3, TensorUtil.Values(rejected.grad!)[i], 12);
        }
        Assert.Equal(loss, r.Loss.ToDouble(), 12);
        Assert.Equal(0.5 * ((-10 + 11) + 0 + 0.5) / 3, r[MetricNames.RewardsChosen], 12);
        Assert.Equal(z.Count(v => v > 0) / 3.0, r["margin_dpo/past_target"], 12);
        Assert.Equal(PreferenceTermsNames, r.MetricNames.Take(6));
    }

    static readonly string[] PreferenceTermsNames =
    {
        MetricNames.RewardsChosen, MetricNames.RewardsRejected, MetricNames.RewardsMargins, MetricNames.RewardsAccuracies,
        MetricNames.LogpsChosen, MetricNames.LogpsRejected,
    };

    [Fact]
    public void A_users_loss_gets_the_upcast_the_finiteness_check_and_its_value_checks()
    {
        using var scope = NewDisposeScope();
        using (var bf16 = new MarginDpo().Compute(Batch(ScalarType.BFloat16, out var c16, out _)))
        {
            Assert.Equal(ScalarType.Float32, bf16.Loss.dtype);
            bf16.Loss.backward();
            Assert.Equal(ScalarType.BFloat16, c16.grad!.dtype);
        }
        var batch = Batch(ScalarType.Float32, out _, out _);
        var nan = batch with { Policy = new PreferenceLogps(F(-1, float.NaN, -3), batch.Policy.Rejected) };
        Assert.Equal("policy.Chosen", Assert.Throws<ArgumentException>(() => new MarginDpo().Compute(nan)).ParamName);
        var inverted = batch with { Scores = new ResponseScores(F(1, 1, 1), F(0, 2, 0)) };
        Assert.Equal("batch.Scores", Assert.Throws<ArgumentException>(() => new MarginDpo().Compute(inverted)).ParamName);
        Assert.Equal("batch.Scores", Assert.Throws<ArgumentException>(() => new MarginDpo().Compute(batch with { Scores = null })).ParamName);
    }

    static Tensor F(params float[] v) => tensor(v);

    [Fact]
    public void A_users_loss_works_in_the_fused_path()
    {
        using var scope = NewDisposeScope();
        manual_seed(9);
        var hidden = randn(6, 4, 5, dtype: ScalarType.Float64).requires_grad_(true);
        var weight = randn(7, 5, dtype: ScalarType.Float64).requires_grad_(true);
        var labels = randint(0, 7, new long[] { 6, 4 });
        var reference = new PreferenceLogps(TensorUtil.Const(Rc, ScalarType.Float64), TensorUtil.Const(Rr, ScalarType.Float64));
        PreferenceBatch Side(PreferenceLogps p) => new(p, reference) { Scores = new ResponseScores(TensorUtil.Const(Sw, ScalarType.Float64), TensorUtil.Const(Sl, ScalarType.Float64)) };
        using var fused = FusedLinearLogProbs.ComputeLoss(new MarginDpo(), Side, hidden, weight, null, labels, null, LabelAlignment.Aligned);
        var logits = hidden.matmul(weight.t());
        var sum = nn.functional.log_softmax(logits, 2).gather(2, labels.unsqueeze(2)).squeeze(2).sum(1);
        using var plain = new MarginDpo().Compute(Side(new PreferenceLogps(sum.narrow(0, 0, 3), sum.narrow(0, 3, 3))));
        Assert.Equal(plain.Loss.ToDouble(), fused.Loss.ToDouble(), 12);
    }

    [Fact]
    public void A_mistake_in_a_users_loss_is_named()
    {
        var e = Assert.Throws<InvalidOperationException>(() => new BadShape().Compute(new PreferenceBatch(new PreferenceLogps(F(-1, -2), F(-3, -4)))));
        Assert.Contains("BadShape.Evaluate must return per-example losses as a 1-D floating tensor", e.Message);
    }

    sealed record NoOptions : PreferenceLossOptions;

    sealed class BadShape() : PreferenceLoss<NoOptions>(new NoOptions())
    {
        public override string Name => "bad";
        protected override double RewardScale => 1;
        protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch) => new(terms.Margin.unsqueeze(1));
    }
}
