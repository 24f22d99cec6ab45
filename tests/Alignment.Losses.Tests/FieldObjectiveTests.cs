using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>
/// Closed-form facts of the field's objectives, the score maps, per-example weights, weighted combinations and the TRL
/// adapter: each an exact statement that a wrong formula, a wrong constant or a wrong mapping would break.
/// </summary>
public class FieldObjectiveTests
{
    static Tensor D(params double[] v) => tensor(v, dtype: ScalarType.Float64);
    static PreferenceLogps P(double[] w, double[] l) => new(D(w), D(l));
    static readonly double Ln2 = Math.Log(2);

    // ---- closed forms ----------------------------------------------------------------------------------------------

    [Fact]
    public void Exo_pair_is_zero_exactly_at_its_stationary_logit_and_known_at_initialisation()
    {
        using var scope = NewDisposeScope();
        var loss = new ExoPairLoss(new ExoPairOptions { Beta = 0.5, LabelSmoothing = 0.2 });
        double hStar = loss.StationaryLogit / 0.5;                                          // ln 4 / 0.5
        using var at = loss.Compute(new PreferenceBatch(P(new[] { hStar - 10 }, new[] { -10.0 })));        // margin h* between log-probs
        Assert.Equal(0.0, at.Loss.ToDouble(), 12);
        using var init = loss.Compute(new PreferenceBatch(P(new[] { -3.0 }, new[] { -3.0 })));
        Assert.Equal(-Ln2 - (Math.Log(0.8) + Math.Log(0.2)) / 2, init.Loss.ToDouble(), 12);   // KL([1/2, 1/2] || [0.8, 0.2])
        using var away = loss.Compute(new PreferenceBatch(P(new[] { hStar - 9, hStar - 11 }, new[] { -10.0, -10.0 })));
        Assert.True(TensorUtil.Values(away.PerExample).All(v => v > 0));
    }

    [Fact]
    public void The_absolute_losses_start_where_their_formulas_say()
    {
        using var scope = NewDisposeScope();
        var policy = P(new[] { -5.0, -7 }, new[] { -6.0, -4 });
        using var nca = NcaPairLoss.Compute(policy, policy);
        using var bco = BcoPairLoss.Compute(policy, policy);
        using var apoZero = ApoLoss.Compute(policy, policy);
        using var apoDown = ApoLoss.Compute(policy, policy, new ApoOptions { Anchor = ApoAnchor.Down });
        using var aot = AotLoss.Compute(policy, policy, new AotOptions { LabelSmoothing = 0.3 });
        using var disco = DiscoPopLoss.Compute(policy, policy);
        Assert.Equal(2 * Ln2, nca.Loss.ToDouble(), 12);                                    // softplus(0) + softplus(0)/2 + softplus(0)/2
        Assert.Equal(2 * Ln2, bco.Loss.ToDouble(), 12);
        Assert.Equal(1.0, apoZero.Loss.ToDouble(), 12);
        Assert.Equal(1.0, apoDown.Loss.ToDouble(), 12);
        Assert.Equal(Ln2, aot.Loss.ToDouble(), 12);
        Assert.Equal(0.5 * Ln2 + 0.5, disco.Loss.ToDouble(), 12);                            // m = 1/2: the mean of ln 2 and e^0
    }

    [Fact]
    public void Discopop_tends_to_the_logistic_loss_below_zero_and_the_exponential_above_it_as_tau_shrinks()
    {
        using var scope = NewDisposeScope();
        var z = new[] { -2.0, -0.5, 0.5, 2.0 };
        using var r = DiscoPopLoss.Compute(P(z.Select(m => m - 10).ToArray(), new[] { -10.0, -10, -10, -10 }), null, new DiscoPopOptions { Beta = 1, Tau = 1e-6 });   // margins z
        var v = TensorUtil.Values(r.PerExample);
        Assert.Equal(Oracle.Softplus(2), v[0], 12);
        Assert.Equal(Oracle.Softplus(0.5), v[1], 12);
        Assert.Equal(Math.Exp(-0.5), v[2], 12);
        Assert.Equal(Math.Exp(-2), v[3], 12);
        // and stays finite where the literal form m * exp(-z) is 0 * Inf
        using var far = DiscoPopLoss.Compute(P(new[] { -2000.0 }, new[] { 0.0 }), null, new DiscoPopOptions { Beta = 1 });
        Assert.Equal(2000.0, far.Loss.ToDouble(), 9);
    }

    [Fact]
    public void Aot_sorts_the_batch_so_shuffling_pairs_changes_nothing_and_aligned_ranks_give_cdpo()
    {
        using var scope = NewDisposeScope();
        double[] pc = { -10, -20, -15, -12 }, pr = { -12, -19, -18, -11 }, rc = { -11, -20, -15.5, -12 }, rr = { -11, -19.5, -17, -12.5 };
        var options = new AotOptions { Beta = 0.7, LabelSmoothing = 0.1 };
        using var a = AotLoss.Compute(P(pc, pr), P(rc, rr), options);
        int[] perm = { 2, 0, 3, 1 };
        double[] S(double[] x) => perm.Select(i => x[i]).ToArray();
        using var b = AotLoss.Compute(P(S(pc), S(pr)), P(S(rc), S(rr)), options);
        Assert.Equal(a.Loss.ToDouble(), b.Loss.ToDouble(), 14);
        // when the policy margins and the reference margins have the same order, AOT is cDPO on the pairs
        double[] qc = { -10, -11, -12 }, qr = { -13, -13, -13 }, sc = { -10, -10.5, -11 }, sr = { -12, -12, -12 };
        using var aligned = AotLoss.Compute(P(qc, qr), P(sc, sr), options);
        using var cdpo = ConservativeDpoLoss.Compute(P(qc, qr), P(sc, sr), new ConservativeDpoOptions { Beta = 0.7, LabelSmoothing = 0.1 });
        Assert.Equal(cdpo.Loss.ToDouble(), aligned.Loss.ToDouble(), 12);
    }

    [Fact]
    public void Sigmoid_norm_is_dpo_on_per_token_log_ratios_and_sft_is_the_token_weighted_nll()
    {
        using var scope = NewDisposeScope();
        var n = D(4, 4, 4);
        var policy = new PreferenceLogps(D(-8, -12, -20), D(-9, -10, -24), n, n);
        var reference = P(new[] { -8.4, -12.0, -19.0 }, new[] { -8.8, -10.4, -23.0 });
        using var norm = SigmoidNormLoss.Compute(policy, reference, new SigmoidNormOptions { Beta = 0.8 });
        using var dpo = DpoLoss.Compute(policy, reference, new DpoOptions { Beta = 0.2 });   // equal lengths: beta / n
        Assert.Equal(dpo.Loss.ToDouble(), norm.Loss.ToDouble(), 12);
        using var sft = SftLoss.Compute(new PreferenceLogps(D(-8, -12), D(-1, -1), D(2, 6), D(1, 1)));
        Assert.Equal(20.0 / 8, sft.Loss.ToDouble(), 12);                                   // (8 + 12) / (2 + 6), not the mean of 4 and 2
        Assert.Equal(new[] { 2.5, 2.5 }, TensorUtil.Values(sft.PerExample));
    }

    // ---- score maps -------------------------------------------------------------------------------------------------

    [Fact]
    public void Score_maps_follow_trls_definitions_and_reward_metrics_keep_the_raw_log_ratio()
    {
        using var scope = NewDisposeScope();
        var u = D(-1.5, 0.3, 2.0);
        Assert.Equal(TensorUtil.Values(u), TensorUtil.Values(ScoreMap.ReverseKl.Apply(u)));
        Assert.Equal(new[] { -Math.Exp(1.5), -Math.Exp(-0.3), -Math.Exp(-2) }, TensorUtil.Values(ScoreMap.ForwardKl.Apply(u)).Select(v => Math.Round(v, 12)).ToArray(),
            new RoundedComparer());
        Assert.Equal(new[] { -Oracle.Softplus(1.5), -Oracle.Softplus(-0.3), -Oracle.Softplus(-2) }, TensorUtil.Values(ScoreMap.JensenShannon.Apply(u)), new RoundedComparer());
        Assert.Equal(new[] { Math.Exp(0.75) / -0.5, Math.Exp(-0.15) / -0.5, Math.Exp(-1) / -0.5 }, TensorUtil.Values(ScoreMap.AlphaDivergence(0.5).Apply(u)), new RoundedComparer());
        Assert.Same(ScoreMap.ReverseKl, ScoreMap.AlphaDivergence(1 + 1e-7));               // the limit, as in TRL
        Assert.Equal(TensorUtil.Values(ScoreMap.ForwardKl.Apply(u)), TensorUtil.Values(ScoreMap.AlphaDivergence(0).Apply(u)), new RoundedComparer());
        // the exponent is clamped at 80: finite, with zero gradient past it
        var far = D(-200).requires_grad_(true);
        var s = ScoreMap.ForwardKl.Apply(far);
        s.backward();
        Assert.Equal(-Math.Exp(80), s.ToDouble(), 1e20);
        Assert.Equal(0.0, far.grad!.ToDouble());

        var policy = P(new[] { -4.0, -6 }, new[] { -5.0, -5 });
        var reference = P(new[] { -4.5, -6.5 }, new[] { -4.0, -5.5 });
        using var plain = DpoLoss.Compute(policy, reference);
        using var js = DpoLoss.Compute(policy, reference, new DpoOptions { ScoreMap = ScoreMap.JensenShannon });
        Assert.NotEqual(plain.Loss.ToDouble(), js.Loss.ToDouble());
        Assert.Equal(plain[MetricNames.RewardsMargins], js[MetricNames.RewardsMargins], 14);
        Assert.Equal("dpo_js", new DpoLoss(new() { ScoreMap = ScoreMap.JensenShannon }).Name);
        Assert.Equal("ipo_per_token_alpha0.5", new IpoLoss(new() { LogRatio = IpoLogRatio.PerTokenMean, ScoreMap = ScoreMap.AlphaDivergence(0.5) }).Name);
    }

    sealed class RoundedComparer : IEqualityComparer<double>
    {
        public bool Equals(double a, double b) => Math.Abs(a - b) <= 1e-12 * Math.Max(1, Math.Abs(b));
        public int GetHashCode(double v) => 0;
    }

    // ---- per-example weights ------------------------------------------------------------------------------------------

    [Fact]
    public void Example_weights_multiply_every_pair_loss_and_are_validated()
    {
        using var scope = NewDisposeScope();
        var policy = P(new[] { -4.0, -6, -3 }, new[] { -5.0, -5, -3.5 });
        var w = D(0.5, 2, 0);
        using var plain = new NcaPairLoss().Compute(new PreferenceBatch(policy));
        using var weighted = new NcaPairLoss().Compute(new PreferenceBatch(policy) { ExampleWeights = w });
        var p = TensorUtil.Values(plain.PerExample);
        Assert.Equal(new[] { 0.5 * p[0], 2 * p[1], 0 }, TensorUtil.Values(weighted.PerExample), new RoundedComparer());
        Assert.Equal("batch.ExampleWeights", Assert.Throws<ArgumentException>(() => new DpoLoss().Compute(new PreferenceBatch(policy) { ExampleWeights = D(1, -1, 1) })).ParamName);
        Assert.Equal("batch.ExampleWeights", Assert.Throws<ArgumentException>(() => new DpoLoss().Compute(new PreferenceBatch(policy) { ExampleWeights = D(1, 1) })).ParamName);
        Assert.Equal("batch.ExampleWeights", Assert.Throws<ArgumentException>(() => new AotLoss().Compute(new PreferenceBatch(policy) { ExampleWeights = w })).ParamName);
    }

    // ---- weighted combinations --------------------------------------------------------------------------------------

    [Fact]
    public void Mpo_is_the_weighted_sum_of_its_parts_with_each_parts_metrics_under_its_name()
    {
        using var scope = NewDisposeScope();
        var policy = new PreferenceLogps(D(-8, -12, -20), D(-9, -10, -24), D(4, 6, 10), D(5, 5, 12));
        var reference = P(new[] { -8.4, -12.0, -19.0 }, new[] { -8.8, -10.4, -23.0 });
        var batch = new PreferenceBatch(policy, reference);
        var mpo = new WeightedLoss((new DpoLoss(), 0.8), (new BcoPairLoss(), 0.2), (new SftLoss(), 1.0));
        using var r = mpo.Compute(batch);
        using var dpo = new DpoLoss().Compute(batch);
        using var bco = new BcoPairLoss().Compute(batch);
        using var sft = new SftLoss().Compute(batch);
        Assert.Equal(0.8 * dpo.Loss.ToDouble() + 0.2 * bco.Loss.ToDouble() + sft.Loss.ToDouble(), r.Loss.ToDouble(), 12);
        Assert.Equal(r.Loss.ToDouble(), r.PerExample.mean().ToDouble(), 12);
        Assert.Equal("0.8*dpo+0.2*bco_pair+sft", mpo.Name);
        Assert.Equal(dpo.Loss.ToDouble(), r["dpo/loss"], 12);
        Assert.Equal(bco[MetricNames.RewardsChosen], r["bco_pair/rewards/chosen"], 12);
        Assert.Equal(sft[MetricNames.NllLoss], r["sft/nll_loss"], 12);
        Assert.Equal(dpo[MetricNames.RewardsAccuracies], r[MetricNames.RewardsAccuracies], 12);
        var twice = new WeightedLoss((new DpoLoss(), 1), (new DpoLoss(new() { Beta = 0.5 }), 1));
        using var t = twice.Compute(batch);
        Assert.Contains("dpo#2/loss", t.MetricNames);
        Assert.Throws<ArgumentOutOfRangeException>(() => new WeightedLoss((new DpoLoss(), -1)));
        Assert.Throws<ArgumentException>(() => new WeightedLoss());
    }

    // ---- the TRL adapter ------------------------------------------------------------------------------------------

    [Fact]
    public void Every_trl_loss_type_maps_to_a_loss_and_unknown_names_list_the_valid_ones()
    {
        var config = new TrlDpoConfig { LabelSmoothing = 0.1 };
        var expected = new Dictionary<string, string>
        {
            ["sigmoid"] = "dpo", ["hinge"] = "hinge", ["ipo"] = "ipo_per_token", ["exo_pair"] = "exo_pair", ["nca_pair"] = "nca_pair",
            ["robust"] = "robust_dpo", ["bco_pair"] = "bco_pair", ["sppo_hard"] = "sppo_hard", ["aot"] = "aot", ["aot_unpaired"] = "aot_unpaired",
            ["apo_zero"] = "apo_zero", ["apo_down"] = "apo_down", ["discopop"] = "discopop", ["sft"] = "sft", ["sigmoid_norm"] = "sigmoid_norm",
        };
        Assert.Equal(expected.Keys.OrderBy(k => k), TrlLosses.LossTypes.OrderBy(k => k));
        // label_smoothing only for the types TRL reads it for (exo_pair needs it > 0); the others refuse it by TRL's name
        string[] smoothed = { "robust", "exo_pair", "aot", "aot_unpaired" };
        foreach (var (trl, name) in expected)
        {
            Assert.Equal(name, TrlLosses.Create(trl, smoothed.Contains(trl) ? config : new TrlDpoConfig()).Name);
            if (!smoothed.Contains(trl)) Assert.Equal("label_smoothing", Assert.Throws<ArgumentException>(() => TrlLosses.Create(trl, config)).ParamName);
        }
        var e = Assert.Throws<ArgumentException>(() => TrlLosses.Create("dpop", config));
        Assert.Equal("loss_type", e.ParamName);
        Assert.Contains("sigmoid, hinge, ipo", e.Message);
        Assert.Equal("f_divergence_type", Assert.Throws<ArgumentException>(() => TrlLosses.Create(config with { FDivergenceType = "kl" })).ParamName);
    }

    [Fact]
    public void Trl_fields_map_to_options_exactly()
    {
        var robust = (RobustDpoLoss)TrlLosses.Create("robust", new TrlDpoConfig { Beta = 0.3, LabelSmoothing = 0.2, FDivergenceType = "js_divergence" });
        Assert.Equal(0.3, robust.Options.Beta);
        Assert.Equal(0.2, robust.Options.LabelSmoothing);
        Assert.Equal(ScoreMap.JensenShannon, robust.Options.ScoreMap);
        var alpha = (DpoLoss)TrlLosses.Create(new TrlDpoConfig { FDivergenceType = "alpha_divergence" });
        Assert.Equal(ScoreMap.AlphaDivergence(0.5), alpha.Options.ScoreMap);                // TRL's default coefficient
        var disco = (DiscoPopLoss)TrlLosses.Create("discopop", new TrlDpoConfig { DiscopopTau = 0.2 });
        Assert.Equal(0.2, disco.Options.Tau);
        var apoZero = (ApoLoss)TrlLosses.Create("apo_zero", new TrlDpoConfig { FDivergenceType = "forward_kl" });
        Assert.Equal(ScoreMap.ReverseKl, apoZero.Options.ScoreMap);                        // TRL's apo_zero reads the raw log-ratios
        var ipo = (IpoLoss)TrlLosses.Create("ipo");
        Assert.Equal(IpoLogRatio.PerTokenMean, ipo.Options.LogRatio);
        // TRL's default label_smoothing = 0 is not a valid EXO eps: named under TRL's field
        var exo = Assert.Throws<ArgumentOutOfRangeException>(() => TrlLosses.Create("exo_pair"));
        Assert.Equal("label_smoothing", exo.ParamName);
        var mpo = (WeightedLoss)TrlLosses.Create(new TrlDpoConfig { LossType = new[] { "sigmoid", "bco_pair", "sft" }, LossWeights = new[] { 0.8, 0.2, 1.0 } });
        Assert.Equal(new[] { 0.8, 0.2, 1.0 }, mpo.Parts.Select(p => p.Weight));
        Assert.Equal("loss_weights", Assert.Throws<ArgumentException>(() => TrlLosses.Create(new TrlDpoConfig { LossType = new[] { "sigmoid", "sft" }, LossWeights = new[] { 1.0 } })).ParamName);
        Assert.Equal("use_weighting", Assert.Throws<ArgumentException>(() => TrlLosses.Create(new TrlDpoConfig { LossType = new[] { "aot" }, UseWeighting = true })).ParamName);
        var logp = TrlLosses.LogProbOptions(new TrlDpoConfig { LdAlpha = 0.4, UseWeighting = true });
        Assert.Equal(0.4, logp.LdAlpha);
        Assert.True(logp.WpoTerms);
        Assert.Equal("ld_alpha", Assert.Throws<ArgumentOutOfRangeException>(() => TrlLosses.LogProbOptions(new TrlDpoConfig { LdAlpha = 1.5 })).ParamName);
    }
}
