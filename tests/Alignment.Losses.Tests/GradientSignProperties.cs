using Alignment.Losses;
using FsCheck;
using FsCheck.Fluent;

namespace Alignment.Losses.Tests;

/// <summary>
/// The gradient-sign table of docs/losses.md as FsCheck properties over random batches and hyperparameters (float64).
/// "Chosen up, rejected down" means d loss / d l_pol(y_w) &lt;= 0 and d loss / d l_pol(y_l) &gt;= 0 (gradient descent raises
/// the chosen log-prob and lowers the rejected one). Thresholded losses are checked on both sides of their threshold.
/// Failures shrink to the smallest batch and print it.
/// </summary>
public class GradientSignProperties
{
    static readonly Config Cfg = PropertyConfig.Quick(80);

    /// <summary>The gradients with respect to the policy log-probs (0 where none flows, e.g. the rejected side of sft).</summary>
    internal static (double[] Chosen, double[] Rejected) Grads(LossCase c, Inputs x)
    {
        using var scope = NewDisposeScope();
        var t = new BatchTensors(x, ScalarType.Float64);
        using var r = c.Make(x).Compute(c.Batch(t));
        r.Loss.backward();
        static double[] G(Tensor leaf) => leaf.grad is { } g ? TensorUtil.Values(g) : new double[leaf.shape[0]];
        return (G(t.PolicyChosen), G(t.PolicyRejected));
    }

    public static IEnumerable<object[]> AlwaysCorrect => new[]
    {
        "dpo", "dpo_reference_free", "robust_dpo", "hinge", "odpo", "odpo_ratio", "spo",
        "rpo", "rpo_weight_outside", "rpo_all_pairs", "rpo_diagonal", "rpo_unpaired",
        // the field's objectives and the score maps (every map is increasing, so it keeps the sign rule)
        "dpo_forward_kl", "dpo_js", "dpo_alpha", "robust_dpo_js", "sigmoid_norm", "sigmoid_norm_forward_kl", "bco_pair", "apo_zero",
        "aot_unpaired", "mpo", "dpo_weighted",
        // reference-free and unpaired objectives without label smoothing (an NLL on the chosen side only adds to "up")
        "cpo", "simpo", "alphapo", "alphapo_negative", "orpo", "kto", "kto_unbalanced", "apo_zero_unpaired", "bco",
    }.Select(n => new object[] { n });

    [Theory, MemberData(nameof(AlwaysCorrect))]
    public void Gradient_always_pushes_chosen_up_and_rejected_down(string name)
    {
        var c = LossCatalog.Get(name);
        Check.One(Cfg, Prop.ForAll(Generators.Arb(minB: 2), x =>
        {
            var (gc, gr) = Grads(c, x);
            bool ok = gc.All(g => g <= 0) && gr.All(g => g >= 0);
            if (name != "hinge") ok &= gc.Sum() < 0 && gr.Sum() > 0;   // strictly: only hinge may have zero gradient
            return ok.Label($"{name}: chosen grads [{string.Join(", ", gc.Select(g => g.ToString("G3")))}], rejected grads [{string.Join(", ", gr.Select(g => g.ToString("G3")))}]");
        }));
    }

    /// <summary>Puts row i's margin at threshold ± (0.01 + mu_i), alternating sides, via the reference log-probs.</summary>
    internal static (Inputs X, bool[] Above) AroundThreshold(Inputs x, Func<Inputs, double> threshold)
    {
        double t = threshold(x);
        var above = Enumerable.Range(0, x.B).Select(i => i % 2 == 0).ToArray();
        var h = Enumerable.Range(0, x.B).Select(i => t + (above[i] ? 1 : -1) * (0.01 + x.Mu[i])).ToArray();
        // u_l = 0 (reference rejected = policy rejected), u_w = h; the chosen pair shifted down together where the reference
        // would be above -0.1 (log-probs are at most 0)
        var pc = x.Pc.Select((p, i) => p + Math.Min(0, -0.1 - (p - h[i]))).ToArray();
        return (x with { Rr = x.Pr, Pc = pc, Rc = pc.Select((p, i) => p - h[i]).ToArray() }, above);
    }

    [Fact]
    public void Cdpo_pushes_chosen_up_below_h_star_and_down_above_it()
    {
        var c = LossCatalog.Get("cdpo");
        Check.One(Cfg, Prop.ForAll(Generators.Arb(minB: 2), raw =>
        {
            var (x, above) = AroundThreshold(raw, v => Math.Log((1 - v.Eps) / v.Eps) / v.Beta);
            var (gc, gr) = Grads(c, x);
            return Enumerable.Range(0, x.B).All(i => above[i] ? gc[i] > 0 && gr[i] < 0 : gc[i] < 0 && gr[i] > 0)
                .Label($"cdpo grads chosen [{string.Join(", ", gc)}] above={string.Join(",", above)}");
        }));
    }

    [Fact]
    public void Ipo_pushes_chosen_up_below_its_target_margin_and_down_above_it()
    {
        var c = LossCatalog.Get("ipo");
        Check.One(Cfg, Prop.ForAll(Generators.Arb(minB: 2), raw =>
        {
            var (x, above) = AroundThreshold(raw, v => 1 / (2 * v.Beta));
            var (gc, gr) = Grads(c, x);
            return Enumerable.Range(0, x.B).All(i => above[i] ? gc[i] > 0 && gr[i] < 0 : gc[i] < 0 && gr[i] > 0)
                .Label($"ipo grads chosen [{string.Join(", ", gc)}]");
        }));
    }

    [Theory]
    [InlineData("sppo")]
    [InlineData("sppo_single")]
    [InlineData("sppo_hard")]
    public void Sppo_pushes_each_log_ratio_towards_its_target_from_both_sides(string name)
    {
        var c = LossCatalog.Get(name);
        Check.One(Cfg, Prop.ForAll(Generators.Arb(minB: 2), raw =>
        {
            // targets per form; place u_w and u_l on alternating sides of them
            double[] tw = name switch
            {
                "sppo_hard" => raw.Pc.Select(_ => 1 / (2 * raw.Beta)).ToArray(),
                _ => raw.Pw.Select(p => (p - 0.5) / raw.Beta).ToArray(),
            };
            double[] tl = name switch
            {
                "sppo_hard" => raw.Pc.Select(_ => -1 / (2 * raw.Beta)).ToArray(),
                "sppo_single" => raw.Pw.Select(p => -(p - 0.5) / raw.Beta).ToArray(),
                _ => raw.Pl.Select(p => (p - 0.5) / raw.Beta).ToArray(),
            };
            var chosenAbove = Enumerable.Range(0, raw.B).Select(i => i % 2 == 0).ToArray();
            var rejectedAbove = Enumerable.Range(0, raw.B).Select(i => i % 3 == 0).ToArray();
            var uw = tw.Select((t, i) => t + (chosenAbove[i] ? 1 : -1) * (0.01 + raw.Mu[i])).ToArray();
            var ul = tl.Select((t, i) => t + (rejectedAbove[i] ? 1 : -1) * (0.01 + raw.Mu[i])).ToArray();
            // policy = reference + u, both shifted down together where the reference would be above -0.1 (log-probs are at most 0)
            double[] Down(double[] p, double[] u) => p.Select((v, i) => Math.Min(0, -0.1 - (v - u[i]))).ToArray();
            double[] dw = Down(raw.Pc, uw), dl = Down(raw.Pr, ul);
            var x = raw with
            {
                Pc = raw.Pc.Select((p, i) => p + dw[i]).ToArray(), Pr = raw.Pr.Select((p, i) => p + dl[i]).ToArray(),
                Rc = raw.Pc.Select((p, i) => p + dw[i] - uw[i]).ToArray(), Rr = raw.Pr.Select((p, i) => p + dl[i] - ul[i]).ToArray(),
            };
            var (gc, gr) = Grads(c, x);
            // past its target the chosen is pushed DOWN (positive gradient); below it, up. Rejected: below its target it is pushed UP.
            bool ok = Enumerable.Range(0, x.B).All(i =>
                (chosenAbove[i] ? gc[i] > 0 : gc[i] < 0) && (rejectedAbove[i] ? gr[i] > 0 : gr[i] < 0));
            return ok.Label($"{name}: grads chosen [{string.Join(", ", gc)}], rejected [{string.Join(", ", gr)}]");
        }));
    }
}
