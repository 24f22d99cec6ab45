using Alignment.Losses;
using FsCheck.Fluent;

namespace Alignment.Losses.Tests;

/// <summary>The closed-form oracles and identities the papers state, each an exact statement about a loss.</summary>
public class SpecOracleTests
{
    static readonly ScalarType F64 = ScalarType.Float64;
    static Tensor T(params double[] v) => TensorUtil.Const(v, F64);
    static PreferenceLogps P(double[] c, double[] r) => new(T(c), T(r));
    static readonly double Ln2 = Math.Log(2);

    [Theory]
    [InlineData("dpo")]
    [InlineData("cdpo")]
    [InlineData("robust_dpo")]
    [InlineData("rpo")]
    [InlineData("rpo_weight_outside")]
    [InlineData("rpo_all_pairs")]
    [InlineData("rpo_diagonal")]
    [InlineData("rpo_unpaired")]
    [InlineData("odpo")]
    public void Loss_at_initialisation_is_ln2(string name)
    {
        var c = LossCatalog.Get(name);
        var x = Generators.One(3, 9);
        x = x with { Rc = x.Pc, Rr = x.Pr };                      // policy == reference
        if (name == "odpo") x = x with { Sw = x.Sl.Select(s => s + 1).ToArray() };   // gap 1: offset ln 1 = 0
        using var scope = NewDisposeScope();
        using var r = c.Make(x).Compute(c.Batch(new BatchTensors(x, F64)));
        Assert.Equal(Ln2, r.Loss.ToDouble(), 12);
        Assert.Equal(0.0, r[MetricNames.RewardsAccuracies]);      // strict: no pair is "won" at initialisation
    }

    [Fact]
    public void Ipo_at_initialisation_is_one_over_four_beta_squared_and_hinge_is_one()
    {
        using var scope = NewDisposeScope();
        var p = P(new[] { -5.0, -7 }, new[] { -6.0, -2 });
        using var ipo = IpoLoss.Compute(p, p, new IpoOptions { Beta = 0.25 });
        Assert.Equal(4.0, ipo.Loss.ToDouble(), 12);
        using var hinge = HingeLoss.Compute(p, p);
        Assert.Equal(1.0, hinge.Loss.ToDouble(), 12);
    }

    [Fact]
    public void Rpo_with_distinct_prompts_and_tau_to_zero_is_dpo_over_n_plus_ln2_off_diagonal()
    {
        using var scope = NewDisposeScope();
        int n = 5;
        var rng = new Random(3);
        double[] R(double lo, double hi) => Enumerable.Range(0, n).Select(_ => lo + (hi - lo) * rng.NextDouble()).ToArray();
        double[] pc = R(-50, -10), pr = R(-50, -10), rc = R(-50, -10), rr = R(-50, -10);
        var policy = P(pc, pr); var reference = P(rc, rr);
        var embeddings = eye(n, dtype: F64) * 3;                  // orthogonal prompts: cosine distance 1 off the diagonal
        using var rpo = RpoLoss.Compute(policy, reference, embeddings, new RpoOptions { Beta = 0.3, Temperature = 1e-3 });
        using var dpo = DpoLoss.Compute(policy, reference, new DpoOptions { Beta = 0.3 });
        double expected = dpo.Loss.ToDouble() / n + (n - 1.0) / n * Ln2;
        Assert.Equal(expected, rpo.Loss.ToDouble(), 12);
        Assert.Equal(1.0, rpo[MetricNames.RpoDiagonalWeight], 12);
        Assert.Equal(0.0, rpo[MetricNames.RpoRowEntropy], 12);
    }

    [Fact]
    public void Rpo_with_identical_prompts_weights_are_uniform()
    {
        using var scope = NewDisposeScope();
        int n = 4;
        double[] pc = { -10, -20, -15, -12 }, pr = { -11, -18, -16, -12.5 }, rc = { -10.5, -19, -15, -13 }, rr = { -10, -19, -15.5, -12 };
        var embeddings = T(Enumerable.Repeat(new[] { 0.3, -1.2, 2.0 }, n).SelectMany(v => v).ToArray()).reshape(n, 3);
        double beta = 0.7;
        using var rpo = RpoLoss.Compute(P(pc, pr), P(rc, rr), embeddings, new RpoOptions { Beta = beta, Temperature = 0.25 });
        double expected = 0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++)
                expected += Oracle.Softplus(-beta * ((pc[i] - rc[i]) - (pr[j] - rr[j])) / n) / (n * n);
        Assert.Equal(expected, rpo.Loss.ToDouble(), 12);
        Assert.Equal(1.0 / n, rpo[MetricNames.RpoDiagonalWeight], 12);
        Assert.Equal(Math.Log(n), rpo[MetricNames.RpoRowEntropy], 12);
    }

    [Fact]
    public void Rpo_weighting_is_a_separable_part_rows_sum_to_one()
    {
        using var scope = NewDisposeScope();
        var w = new CosineSoftmaxWeighting(0.5).ComputeWeights(randn(6, 8), randn(3, 8), ScalarType.Float32);
        Assert.Equal(new long[] { 6, 3 }, w.shape);
        Assert.True(allclose(w.sum(1), ones(6)));
        Assert.False(w.requires_grad);
    }

    [Fact]
    public void Rpo_caller_weights_replace_the_similarity()
    {
        using var scope = NewDisposeScope();
        double[] pc = { -3, -4, -5 }, pr = { -4, -4, -6 };
        var w = new double[,] { { 1, 0, 0 }, { 0, 2, 0 }, { 0.5, 0.5, 0 } };
        var flat = new[] { 1.0, 0, 0, 0, 2, 0, 0.5, 0.5, 0 };
        using var r = new RpoLoss(new RpoOptions { Beta = 0.4 }).Compute(new PreferenceBatch(P(pc, pr)) { RpoWeights = T(flat).reshape(3, 3) });
        Assert.Equal(Oracle.Rpo(pc, pr, null, null, w, 0.4, inside: true).Loss, r.Loss.ToDouble(), 12);
    }

    [Fact]
    public void Sppo_initial_loss_is_122500_with_the_default_eta()
    {
        using var scope = NewDisposeScope();
        var logps = new PreferenceLogps(tensor(new[] { -40f, -55f }), tensor(new[] { -41f, -60f }));
        using var r = SppoLoss.Compute(logps, logps, SppoWinRates.Individual(tensor(new[] { 0.85f, 0.85f }), tensor(new[] { 0.15f, 0.15f })));
        // 0.85f is not exact in float32 (0.85f - 0.5 = 0.35000002), hence a relative tolerance
        Assert.InRange(r.Loss.ToDouble() / 122_500, 1 - 1e-6, 1 + 1e-6);
    }

    [Fact]
    public void Sppo_is_zero_at_its_targets_with_zero_gradient()
    {
        using var scope = NewDisposeScope();
        double beta = 0.1, pw = 0.7, pl = 0.2;       // policy log-probs -8 and -23 at the targets
        var pc = TensorUtil.Leaf(new[] { -10 + (pw - 0.5) / beta }, F64);
        var pr = TensorUtil.Leaf(new[] { -20 + (pl - 0.5) / beta }, F64);
        using var r = new SppoLoss(new SppoOptions { Beta = beta }).Compute(
            new PreferenceBatch(new PreferenceLogps(pc, pr), P(new[] { -10.0 }, new[] { -20.0 })) { WinRates = SppoWinRates.Individual(T(pw), T(pl)) });
        r.Loss.backward();
        Assert.Equal(0.0, r.Loss.ToDouble(), 12);
        Assert.Equal(0.0, pc.grad!.ToDouble(), 12);
        Assert.Equal(0.0, pr.grad!.ToDouble(), 12);
    }

    [Fact]
    public void Sppo_hard_is_twice_sppo_with_certain_win_rates()
    {
        using var scope = NewDisposeScope();
        var policy = P(new[] { -3.0, -9 }, new[] { -4.0, -7 });
        var reference = P(new[] { -3.5, -8 }, new[] { -3.0, -7.5 });
        var options = new SppoOptions { Beta = 0.2 };
        using var hard = SppoLoss.Compute(policy, reference, null, options with { Form = SppoForm.Hard });
        using var soft = SppoLoss.Compute(policy, reference, SppoWinRates.Individual(T(1, 1), T(0, 0)), options);
        Assert.Equal(2 * soft.Loss.ToDouble(), hard.Loss.ToDouble(), 12);
    }

    [Fact]
    public void Odpo_with_alpha_zero_equals_dpo_exactly()
    {
        using var scope = NewDisposeScope();
        var policy = P(new[] { -3.0, -9, -1 }, new[] { -4.0, -7, -2 });
        var reference = P(new[] { -3.5, -8, -1.5 }, new[] { -3.0, -7.5, -2.5 });
        using var odpo = OdpoLoss.Compute(policy, reference, new ResponseScores(T(1.5, 0.9, 3), T(0.2, 0.8, 1)), new OdpoOptions { Beta = 0.3, Alpha = 0 });
        // bit for bit against DPO's op-by-op path, the same libtorch formula (its fused CPU pass agrees to float64 rounding)
        using var dpo = DpoLoss.Compute(policy, reference, new DpoOptions { Beta = 0.3, FusedCpu = false });
        Assert.Equal(dpo.Loss.ToDouble(), odpo.Loss.ToDouble());
        using var fused = DpoLoss.Compute(policy, reference, new DpoOptions { Beta = 0.3 });
        Assert.Equal(fused.Loss.ToDouble(), odpo.Loss.ToDouble(), 15);
    }

    [Theory]
    [InlineData(OdpoOffsetForm.Difference)]
    [InlineData(OdpoOffsetForm.Ratio)]
    public void Odpo_is_dpo_shifted_by_offset_over_beta(OdpoOffsetForm form)
    {
        using var scope = NewDisposeScope();
        double beta = 0.4, alpha = 0.8;
        double[] pc = { -3, -9, -1 }, pr = { -4, -7, -2 }, sw = { 1.5, 0.9, 3 }, sl = { 0.2, 0.8, 1 };
        double[] offset = sw.Select((s, i) => alpha * Math.Log(form == OdpoOffsetForm.Ratio ? s / sl[i] : s - sl[i])).ToArray();
        using var odpo = OdpoLoss.Compute(P(pc, pr), null, new ResponseScores(T(sw), T(sl)), new OdpoOptions { Beta = beta, Alpha = alpha, OffsetForm = form });
        using var shifted = DpoLoss.Compute(P(pc.Select((v, i) => v - offset[i] / beta).ToArray(), pr), null, new DpoOptions { Beta = beta });
        Assert.Equal(shifted.Loss.ToDouble(), odpo.Loss.ToDouble(), 12);
        Assert.Equal(offset.Average(), odpo[MetricNames.OdpoOffset], 12);
    }

    [Fact]
    public void Spo_preference_term_is_reference_free_dpo_with_beta_alpha_over_alpha()
    {
        using var scope = NewDisposeScope();
        var policy = P(new[] { -3.0, -9, -1 }, new[] { -4.0, -7, -2 });
        double alpha = 0.7;
        using var spo = SpoLoss.Compute(policy, null, new SpoOptions { Alpha = alpha, KlWeight = 0 });
        using var dpo = DpoLoss.Compute(policy, null, new DpoOptions { Beta = alpha });
        Assert.Equal(dpo.Loss.ToDouble() / alpha, spo.Loss.ToDouble(), 12);
        Assert.Equal(0.0, spo[MetricNames.SpoKl]);
    }

    [Fact]
    public void Spo_listwise_with_two_candidates_equals_the_pairwise_term()
    {
        using var scope = NewDisposeScope();
        double[] w = { -3, -9, -1 }, l = { -4, -7, -2 };
        var candidates = stack(new[] { T(w), T(l) }, 1);
        var listwise = SpoLoss.ListwisePreference(candidates, zeros(3, dtype: ScalarType.Int64), alpha: 0.6);
        using var pair = SpoLoss.Compute(P(w, l), null, new SpoOptions { Alpha = 0.6, KlWeight = 0 });
        Assert.Equal(pair.Loss.ToDouble(), listwise.ToDouble(), 12);
    }

    [Theory]
    [InlineData(-6.0)]
    [InlineData(0.0)]
    [InlineData(0.3)]
    [InlineData(9.0)]
    public void Robust_dpo_expectation_over_label_flips_equals_clean_dpo(double h)
    {
        using var scope = NewDisposeScope();
        double eps = 0.2, beta = 0.5;
        var clean = P(new[] { h - 20 }, new[] { -20.0 });              // log-prob margin h
        var flipped = P(new[] { -20.0 }, new[] { h - 20 });
        var options = new RobustDpoOptions { Beta = beta, LabelSmoothing = eps };
        using var a = RobustDpoLoss.Compute(clean, null, options);
        using var b = RobustDpoLoss.Compute(flipped, null, options);
        using var dpo = DpoLoss.Compute(clean, null, new DpoOptions { Beta = beta });
        Assert.Equal(dpo.Loss.ToDouble(), (1 - eps) * a.Loss.ToDouble() + eps * b.Loss.ToDouble(), 12);
    }

    [Fact]
    public void Cdpo_is_stationary_at_h_star()
    {
        using var scope = NewDisposeScope();
        var loss = new ConservativeDpoLoss(new ConservativeDpoOptions { Beta = 0.5, LabelSmoothing = 0.2 });
        Assert.Equal(2.772588722239781, loss.StationaryMargin, 12);   // ln(0.8 / 0.2) / 0.5
        var chosen = TensorUtil.Leaf(new[] { loss.StationaryMargin - 10 }, F64);   // margin h* over a rejected log-prob of -10
        using var r = loss.Compute(new PreferenceBatch(new PreferenceLogps(chosen, T(-10))));
        r.Loss.backward();
        Assert.Equal(0.0, chosen.grad!.ToDouble(), 12);
    }

    [Fact]
    public void Standard_metrics_follow_the_trl_definitions()
    {
        using var scope = NewDisposeScope();
        double beta = 0.2;
        double[] pc = { -3, -9, -1 }, pr = { -4, -7, -2 }, rc = { -3.5, -8, -1.5 }, rr = { -3, -7.5, -2.5 };
        using var r = DpoLoss.Compute(P(pc, pr), P(rc, rr), new DpoOptions { Beta = beta });
        var uw = pc.Select((v, i) => v - rc[i]).ToArray();
        var ul = pr.Select((v, i) => v - rr[i]).ToArray();
        Assert.Equal(beta * uw.Average(), r[MetricNames.RewardsChosen], 12);
        Assert.Equal(beta * ul.Average(), r[MetricNames.RewardsRejected], 12);
        Assert.Equal(beta * (uw.Average() - ul.Average()), r[MetricNames.RewardsMargins], 12);
        Assert.Equal(uw.Zip(ul).Count(t => t.First > t.Second) / 3.0, r[MetricNames.RewardsAccuracies], 12);
        Assert.Equal(pc.Average(), r[MetricNames.LogpsChosen], 12);
        Assert.Equal(pr.Average(), r[MetricNames.LogpsRejected], 12);
        Assert.Equal(3, r.PerExample.shape[0]);
        Assert.Equal(r.PerExample.mean().ToDouble(), r.Loss.ToDouble(), 14);
    }
}
