using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>Options of the test's own loss: DPO with a target margin gamma and caller weights.</summary>
public sealed record MarginDpoOptions : PreferenceLossOptions
{
    public double Beta { get; init; } = 0.5;
    public double Gamma { get; init; } = 1.0;
}

/// <summary>
/// A loss written the way a user writes one, through the public extension point: softplus(-(beta h - gamma)) times a
/// per-pair weight. The base provides validation, the upcast, the standard metrics, the NaN/Inf check, the value checks
/// and the single synchronisation.
/// </summary>
public sealed class MarginDpo(MarginDpoOptions? options = null) : PreferenceLoss<MarginDpoOptions>(options ?? new())
{
    public override string Name => "margin_dpo";

    protected override double RewardScale => Options.Beta;

    protected override IEnumerable<(Tensor? Tensor, string Name)> Validate(PreferenceBatch batch, ValueChecks checks)
    {
        CheckPerExample(batch.ExampleWeights, batch, "batch.ExampleWeights", "per-pair weights");
        checks.Add((batch.ExampleWeights! >= 0).all(), () => new ArgumentException("batch.ExampleWeights must be non-negative.", "batch.ExampleWeights"));
        return new (Tensor?, string)[] { (batch.ExampleWeights, "batch.ExampleWeights") };
    }

    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var z = terms.Margin * Options.Beta - Options.Gamma;
        var perExample = PreferenceMath.NegLogSigmoid(z) * terms.Upcast(batch.ExampleWeights!);
        return new(perExample, new[] { ("margin_dpo/past_gamma", (z > 0).to_type(terms.DType).mean()) });
    }
}

public class CustomLossTests
{
    static readonly double[] Pc = { -10, -20, -15 }, Pr = { -12, -19, -18 }, Rc = { -11, -20, -15.5 }, Rr = { -11, -19.5, -17 }, W = { 1, 0.5, 2 };

    static PreferenceBatch Batch(ScalarType dtype, out Tensor chosen, out Tensor rejected)
    {
        chosen = TensorUtil.Leaf(Pc, dtype);
        rejected = TensorUtil.Leaf(Pr, dtype);
        return new PreferenceBatch(new PreferenceLogps(chosen, rejected), new PreferenceLogps(TensorUtil.Const(Rc, dtype), TensorUtil.Const(Rr, dtype)))
        {
            ExampleWeights = TensorUtil.Const(W, dtype),
        };
    }

    [Fact]
    public void A_users_loss_gets_the_formula_gradients_and_standard_metrics_of_the_base()
    {
        using var scope = NewDisposeScope();
        var batch = Batch(ScalarType.Float64, out var chosen, out var rejected);
        using var r = new MarginDpo(new MarginDpoOptions { Gamma = 0.5 }).Compute(batch);
        r.Loss.backward();
        // float64 oracle: mean_i w_i softplus(-(0.5 h_i - 0.5)), d/dl_w = -0.5 w_i sigmoid(-(0.5 h_i - 0.5)) / B
        double loss = 0;
        for (int i = 0; i < 3; i++)
        {
            double h = (Pc[i] - Rc[i]) - (Pr[i] - Rr[i]), z = 0.5 * h - 0.5;
            loss += W[i] * Oracle.Softplus(-z) / 3;
            Assert.Equal(-0.5 * W[i] * Oracle.Sigmoid(-z) / 3, TensorUtil.Values(chosen.grad!)[i], 12);
            Assert.Equal(0.5 * W[i] * Oracle.Sigmoid(-z) / 3, TensorUtil.Values(rejected.grad!)[i], 12);
        }
        Assert.Equal(loss, r.Loss.ToDouble(), 12);
        Assert.Equal(0.5 * ((-10 + 11) + 0 + 0.5) / 3, r[MetricNames.RewardsChosen], 12);
        Assert.Equal(2.0 / 3, r["margin_dpo/past_gamma"], 12);   // z = 0.5 h - 0.5 = 0.5, -0.75, 0.25
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
        var negative = batch with { ExampleWeights = F(1, -1, 1) };
        Assert.Equal("batch.ExampleWeights", Assert.Throws<ArgumentException>(() => new MarginDpo().Compute(negative)).ParamName);
        Assert.Equal("batch.ExampleWeights", Assert.Throws<ArgumentException>(() => new MarginDpo().Compute(batch with { ExampleWeights = null })).ParamName);
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
        PreferenceBatch Side(PreferenceLogps p) => new(p, reference) { ExampleWeights = TensorUtil.Const(W, ScalarType.Float64) };
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
