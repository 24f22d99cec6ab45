using Alignment.Losses;
using FsCheck;
using FsCheck.Fluent;

namespace Alignment.Losses.Tests;

/// <summary>
/// Gradient signs of the field's objectives (TRL's loss types) and of the score maps, as FsCheck properties in float64:
/// (the always-correct ones are in <see cref="GradientSignProperties"/>) both sides of every threshold (EXO, NCA, DiscoPOP's band, apo_down's exception, AOT's
/// smoothed ranks), and the sign of every row against the float64 oracle.
/// </summary>
public class FieldGradientSignProperties
{
    static readonly Config Cfg = PropertyConfig.Quick(60);

    static string Show(double[] g) => "[" + string.Join(", ", g.Select(v => v.ToString("G3"))) + "]";

    [Fact]
    public void Sft_raises_every_chosen_response_and_leaves_the_rejected_alone()
    {
        var c = LossCatalog.Get("sft");
        Check.One(Cfg, Prop.ForAll(Generators.Arb(minB: 2), x =>
        {
            var (gc, gr) = GradientSignProperties.Grads(c, x);
            return (gc.All(g => g < 0) && gr.All(g => g == 0)).Label($"sft: chosen {Show(gc)}, rejected {Show(gr)}");
        }));
    }

    [Fact]
    public void Exo_pair_pushes_chosen_up_below_its_stationary_margin_and_down_above_it()
    {
        var c = LossCatalog.Get("exo_pair");
        Check.One(Cfg, Prop.ForAll(Generators.Arb(minB: 2), raw =>
        {
            var (x, above) = GradientSignProperties.AroundThreshold(raw, v => Math.Log((1 - v.Eps) / v.Eps) / v.Beta);
            var (gc, gr) = GradientSignProperties.Grads(c, x);
            return Enumerable.Range(0, x.B).All(i => above[i] ? gc[i] > 0 && gr[i] < 0 : gc[i] < 0 && gr[i] > 0)
                .Label($"exo_pair: chosen {Show(gc)}, rejected {Show(gr)}");
        }));
    }

    [Fact]
    public void Nca_pair_raises_the_chosen_only_while_its_reward_is_below_ln_2_and_always_lowers_the_rejected()
    {
        var c = LossCatalog.Get("nca_pair");
        Check.One(Cfg, Prop.ForAll(Generators.Arb(minB: 2), raw =>
        {
            var (x, above) = GradientSignProperties.AroundThreshold(raw, v => Math.Log(2) / v.Beta);
            var (gc, gr) = GradientSignProperties.Grads(c, x);
            return Enumerable.Range(0, x.B).All(i => (above[i] ? gc[i] > 0 : gc[i] < 0) && gr[i] > 0)
                .Label($"nca_pair: chosen {Show(gc)}, rejected {Show(gr)}");
        }));
    }

    [Fact]
    public void Apo_down_lowers_the_rejected_always_and_the_chosen_where_its_anchor_term_dominates()
    {
        // d/du_w = beta [sigmoid'(beta u_w) - sigmoid'(beta Delta)]: positive (chosen pushed DOWN) where |u_w| < |Delta|
        var c = LossCatalog.Get("apo_down");
        Check.One(Cfg, Prop.ForAll(Generators.Arb(minB: 2), x =>
        {
            var (gc, gr) = GradientSignProperties.Grads(c, x);
            double D(double z) => Oracle.Sigmoid(z) * (1 - Oracle.Sigmoid(z));
            bool ok = Enumerable.Range(0, x.B).All(i =>
            {
                double uw = x.Pc[i] - x.Rc[i], ul = x.Pr[i] - x.Rr[i];
                double expected = D(x.Beta * uw) - D(x.Beta * (uw - ul));
                return gr[i] > 0 && (Math.Abs(expected) < 1e-9 || Math.Sign(gc[i]) == Math.Sign(expected));
            });
            return ok.Label($"apo_down: chosen {Show(gc)}, rejected {Show(gr)}");
        }));
        // and both regimes occur: at initialisation the two terms cancel exactly; |u_w| < |Delta| pushes the chosen down
        using var scope = NewDisposeScope();
        var chosen = tensor(new[] { -10.0, -10.0 }).requires_grad_(true);
        var rejected = tensor(new[] { -10.0, -12.0 }).requires_grad_(true);
        using var r = ApoLoss.Compute(new PreferenceLogps(chosen, rejected), new PreferenceLogps(tensor(new[] { -10.0, -10.2 }), tensor(new[] { -10.0, -10.0 })),
            new ApoOptions { Anchor = ApoAnchor.Down });
        r.Loss.backward();
        var g = TensorUtil.Values(chosen.grad!);
        Assert.Equal(0.0, g[0], 15);
        Assert.True(g[1] > 0, $"u_w = 0.2, Delta = 2.2: the chosen should be pushed down, got {g[1]}");
    }

    [Fact]
    public void Discopop_pushes_the_chosen_down_in_a_band_around_zero_and_up_outside_it_as_its_derivative_says()
    {
        using var scope = NewDisposeScope();
        var loss = new DiscoPopLoss(new DiscoPopOptions { Beta = 1, Tau = 0.05 });
        var z = Enumerable.Range(-60, 121).Select(k => k * 0.05).ToArray();                 // beta Delta from -3 to 3
        var chosen = tensor(z.Select(m => m - 10).ToArray()).requires_grad_(true);      // log-probs with margins z over -10
        using var r = loss.Compute(new PreferenceBatch(new PreferenceLogps(chosen, full(z.Length, -10.0, dtype: ScalarType.Float64))));
        r.Loss.backward();
        var g = TensorUtil.Values(chosen.grad!);
        var oracle = Oracle.DiscoPop(z, new double[z.Length], null, null, 1, 0.05, Oracle.ReverseKl).GradChosen;
        int reversed = 0;
        for (int k = 0; k < z.Length; k++)
        {
            if (Math.Abs(oracle[k]) > 1e-12) Assert.True(Math.Sign(g[k]) == Math.Sign(oracle[k]), $"z = {z[k]}: {g[k]} vs oracle {oracle[k]}");
            if (g[k] > 0) reversed++;
        }
        Assert.True(g[60] > 0, "at z = 0 the chosen response is pushed down (dL/dz = -3/4 + (1 - ln 2) / (4 tau) > 0)");
        Assert.True(g[0] < 0 && g[^1] < 0, "far from 0 the chosen response is pushed up");
        Assert.InRange(reversed, 2, z.Length - 2);
    }

    public static IEnumerable<object[]> Thresholded => new[] { "aot", "exo_pair_alpha", "nca_pair_js", "apo_down_forward_kl", "discopop", "cpo_smoothed", "cpo_hinge", "cpo_ipo", "simpo_smoothed", "bradley_terry" }.Select(n => new object[] { n });

    /// <summary>Every row's gradient has the sign of the float64 oracle's, so both sides of each threshold are right.</summary>
    [Theory, MemberData(nameof(Thresholded))]
    public void Every_row_is_pushed_the_way_the_oracle_says(string name)
    {
        var c = LossCatalog.Get(name);
        Check.One(Cfg, Prop.ForAll(Generators.Arb(minB: 2), x =>
        {
            var (gc, gr) = GradientSignProperties.Grads(c, x);
            var o = c.Expected(x);
            double scale = o.GradChosen.Concat(o.GradRejected).Max(Math.Abs);
            bool Same(double a, double b) => Math.Abs(b) <= 1e-9 * scale || Math.Sign(a) == Math.Sign(b);
            bool ok = Enumerable.Range(0, x.B).All(i => Same(gc[i], o.GradChosen[i]) && Same(gr[i], o.GradRejected[i]));
            return ok.Label($"{name}: chosen {Show(gc)} vs {Show(o.GradChosen)}, rejected {Show(gr)} vs {Show(o.GradRejected)}");
        }));
    }
}
