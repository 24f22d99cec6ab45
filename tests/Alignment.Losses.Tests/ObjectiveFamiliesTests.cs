using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>
/// Reference-free (CPO, SimPO, AlphaPO, ORPO), unpaired (KTO, apo_zero_unpaired, BCO) and reward-model (Bradley-Terry)
/// objectives against an independent float64 oracle written from the papers' formulas with plain doubles (values, and
/// gradients by central differences of the oracle), plus gradient signs, closed-form facts and bad inputs.
/// </summary>
public class ObjectiveFamiliesTests
{
    static double Sp(double x) => x > 0 ? x + Math.Log(1 + Math.Exp(-x)) : Math.Log(1 + Math.Exp(x));   // softplus
    static double Sig(double x) => 1 / (1 + Math.Exp(-x));

    /// <summary>Oracle losses of (l_w[], l_l[]) with fixed counts and options.</summary>
    static double CpoOracle(double[] lw, double[] ll, double[] nw, double[] nl, string type, double beta, double eps, double alpha)
    {
        int b = lw.Length; double sum = 0;
        for (int i = 0; i < b; i++)
        {
            double x = type == "ipo" ? lw[i] / nw[i] - ll[i] / nl[i] : lw[i] - ll[i];
            sum += type switch
            {
                "hinge" => Math.Max(0, 1 - beta * x),
                "ipo" => Math.Pow(x - 1 / (2 * beta), 2),
                _ => (1 - eps) * Sp(-beta * x) + eps * Sp(beta * x),
            };
        }
        return sum / b + alpha * (-lw.Sum() / nw.Sum());
    }

    static double SimPoOracle(double[] lw, double[] ll, double[] nw, double[] nl, double beta, double gamma, double eps, double alpha)
    {
        double R(double a) => alpha == 0 ? a : (1 - Math.Pow(Math.Exp(a), -alpha)) / alpha;
        double sum = 0;
        for (int i = 0; i < lw.Length; i++)
        {
            double z = beta * (R(lw[i] / nw[i]) - R(ll[i] / nl[i])) - gamma;
            sum += (1 - eps) * Sp(-z) + eps * Sp(z);
        }
        return sum / lw.Length;
    }

    static double OrpoOracle(double[] lw, double[] ll, double[] nw, double[] nl, double beta)
    {
        double ratio = 0;
        for (int i = 0; i < lw.Length; i++)
        {
            double aw = lw[i] / nw[i], al = ll[i] / nl[i];
            double logOdds = (aw - al) - (Math.Log(1 - Math.Exp(aw)) - Math.Log(1 - Math.Exp(al)));
            ratio += -Sp(-logOdds);
        }
        return -lw.Sum() / nw.Sum() - beta * ratio / lw.Length;
    }

    static double KtoOracle(double[] pw, double[] rw, double[] pl, double[] rl, double z0Raw, double beta, double ld, double lu, bool apo)
    {
        double z0 = Math.Max(0, z0Raw), sum = 0;
        for (int i = 0; i < pw.Length; i++) sum += ld * (apo ? 1 - Sig(beta * (pw[i] - rw[i])) : 1 - Sig(beta * (pw[i] - rw[i] - z0)));
        for (int i = 0; i < pl.Length; i++) sum += lu * (apo ? Sig(beta * (pl[i] - rl[i])) : 1 - Sig(beta * (z0 - (pl[i] - rl[i]))));
        return sum / (pw.Length + pl.Length);
    }

    static double BcoOracle(double[] pw, double[] rw, double[] pl, double[] rl, double delta, double beta, double[]? weights)
    {
        var losses = pw.Select((p, i) => Sp(-(beta * (p - rw[i]) - delta))).Concat(pl.Select((p, i) => Sp(beta * (p - rl[i]) - delta))).ToArray();
        if (weights is not null) losses = losses.Select((l, i) => l * weights[i]).ToArray();
        return losses.Average();
    }

    static double BtOracle(double[] rw, double[] rl, double[]? margin, double c) =>
        rw.Select((r, i) => Sp(-(r - rl[i] - (margin?[i] ?? 0))) + c * Math.Pow(r + rl[i], 2)).Average();

    /// <summary>Central-difference gradient of an oracle over one input vector.</summary>
    static double[] Grad(Func<double[], double> f, double[] x)
    {
        var g = new double[x.Length];
        for (int i = 0; i < x.Length; i++)
        {
            double h = 1e-6 * Math.Max(1, Math.Abs(x[i]));
            var up = (double[])x.Clone(); up[i] += h;
            var down = (double[])x.Clone(); down[i] -= h;
            g[i] = (f(up) - f(down)) / (2 * h);
        }
        return g;
    }

    static double[] Uniform(Random r, int n, double lo, double hi) => Enumerable.Range(0, n).Select(_ => lo + (hi - lo) * r.NextDouble()).ToArray();

    static void Close(double expected, double actual, string what, double tol = 1e-6) =>
        Assert.True(Math.Abs(expected - actual) <= tol * Math.Max(1, Math.Abs(expected)), $"{what}: expected {expected:R}, got {actual:R}");

    static void CloseAll(double[] expected, Tensor actual, string what, double tol = 1e-5)
    {
        var a = TensorUtil.Values(actual);
        for (int i = 0; i < expected.Length; i++) Close(expected[i], a[i], $"{what}[{i}]", tol);
    }

    public static IEnumerable<object[]> ReferenceFreeCases => new[]
    {
        new object[] { "cpo" }, new object[] { "cpo_smoothed" }, new object[] { "cpo_hinge" }, new object[] { "cpo_ipo" }, new object[] { "cpo_no_nll" },
        new object[] { "simpo" }, new object[] { "simpo_smoothed" }, new object[] { "alphapo" }, new object[] { "alphapo_negative" }, new object[] { "orpo" },
    };

    static (IPreferenceLoss Loss, Func<double[], double[], double[], double[], double> Oracle) ReferenceFree(string name) => name switch
    {
        "cpo" => (new CpoLoss(new CpoOptions { Beta = 0.3 }), (a, b, c, d) => CpoOracle(a, b, c, d, "sigmoid", 0.3, 0, 1)),
        "cpo_smoothed" => (new CpoLoss(new CpoOptions { Beta = 0.2, LabelSmoothing = 0.15, CpoAlpha = 0.5 }), (a, b, c, d) => CpoOracle(a, b, c, d, "sigmoid", 0.2, 0.15, 0.5)),
        "cpo_hinge" => (new CpoLoss(new CpoOptions { Beta = 0.05, LossType = CpoLossType.Hinge }), (a, b, c, d) => CpoOracle(a, b, c, d, "hinge", 0.05, 0, 1)),
        "cpo_ipo" => (new CpoLoss(new CpoOptions { Beta = 0.4, LossType = CpoLossType.Ipo, CpoAlpha = 2 }), (a, b, c, d) => CpoOracle(a, b, c, d, "ipo", 0.4, 0, 2)),
        "cpo_no_nll" => (new CpoLoss(new CpoOptions { CpoAlpha = 0 }), (a, b, c, d) => CpoOracle(a, b, c, d, "sigmoid", 0.1, 0, 0)),
        "simpo" => (new SimPoLoss(new SimPoOptions { Beta = 2.5, Gamma = 1.4 }), (a, b, c, d) => SimPoOracle(a, b, c, d, 2.5, 1.4, 0, 0)),
        "simpo_smoothed" => (new SimPoLoss(new SimPoOptions { LabelSmoothing = 0.2 }), (a, b, c, d) => SimPoOracle(a, b, c, d, 0.1, 0.5, 0.2, 0)),
        "alphapo" => (new AlphaPoLoss(new AlphaPoOptions { Beta = 3, Gamma = 1, Alpha = 0.5 }), (a, b, c, d) => SimPoOracle(a, b, c, d, 3, 1, 0, 0.5)),
        "alphapo_negative" => (new AlphaPoLoss(new AlphaPoOptions { Beta = 1, Gamma = 0.2, Alpha = -0.7 }), (a, b, c, d) => SimPoOracle(a, b, c, d, 1, 0.2, 0, -0.7)),
        _ => (new OrpoLoss(new OrpoOptions { Beta = 0.25, NllTokens = OrpoNllTokens.Completion }), (a, b, c, d) => OrpoOracle(a, b, c, d, 0.25)),
    };

    [Theory, MemberData(nameof(ReferenceFreeCases))]
    public void Reference_free_losses_equal_the_float64_oracle_in_value_and_gradient(string name)
    {
        var (loss, oracle) = ReferenceFree(name);
        var rng = new Random(name.GetHashCode(StringComparison.Ordinal) & 0xffff);
        for (int trial = 0; trial < 40; trial++)
        {
            using var scope = NewDisposeScope();
            int b = 1 + rng.Next(6);
            var nw = Enumerable.Range(0, b).Select(_ => (double)(1 + rng.Next(40))).ToArray();
            var nl = Enumerable.Range(0, b).Select(_ => (double)(1 + rng.Next(40))).ToArray();
            var lw = nw.Select(n => -n * (0.05 + 3 * rng.NextDouble())).ToArray();   // per-token means in [-3.05, -0.05]
            var ll = nl.Select(n => -n * (0.05 + 3 * rng.NextDouble())).ToArray();
            var (cw, cl) = (TensorUtil.Leaf(lw, ScalarType.Float64), TensorUtil.Leaf(ll, ScalarType.Float64));
            using var r = loss.Compute(new PreferenceBatch(new PreferenceLogps(cw, cl, tensor(nw), tensor(nl))));
            Close(oracle(lw, ll, nw, nl), r.Loss.ToDouble(), $"{name} loss (trial {trial})", 1e-10);
            r.Loss.backward();
            CloseAll(Grad(x => oracle(x, ll, nw, nl), lw), cw.grad!, $"{name} d/dl_w");
            CloseAll(Grad(x => oracle(lw, x, nw, nl), ll), cl.grad!, $"{name} d/dl_l");
            Assert.Equal(r.Loss.ToDouble(), r.PerExample.mean().ToDouble(), 12);
        }
    }

    [Fact]
    public void Reference_free_gradients_push_chosen_up_and_rejected_down()
    {
        var rng = new Random(5);
        foreach (var name in new[] { "cpo", "cpo_no_nll", "simpo", "alphapo", "alphapo_negative", "orpo" })
        {
            var (loss, _) = ReferenceFree(name);
            for (int trial = 0; trial < 30; trial++)
            {
                using var scope = NewDisposeScope();
                var n = Uniform(rng, 4, 1, 30).Select(v => Math.Round(v)).ToArray();
                var cw = TensorUtil.Leaf(n.Select(k => -k * (0.01 + 5 * rng.NextDouble())).ToArray(), ScalarType.Float32);
                var cl = TensorUtil.Leaf(n.Select(k => -k * (0.01 + 5 * rng.NextDouble())).ToArray(), ScalarType.Float32);
                using var r = loss.Compute(new PreferenceBatch(new PreferenceLogps(cw, cl, tensor(n), tensor(n))));
                r.Loss.backward();
                Assert.True(cw.grad!.le(0).all().item<bool>(), $"{name}: chosen gradient must be <= 0");
                Assert.True(cl.grad!.ge(0).all().item<bool>(), $"{name}: rejected gradient must be >= 0");
            }
        }
    }

    [Fact]
    public void SimPo_gradient_halves_exactly_at_the_target_margin_gamma_over_beta()
    {
        using var scope = NewDisposeScope();
        double beta = 2.5, gamma = 1.375;
        // per-token margin a_w - a_l = gamma / beta exactly: z = 0, |dL/da_w| = beta * sigmoid(0) = beta / 2
        var cw = TensorUtil.Leaf(new[] { -0.45 * 10 }, ScalarType.Float64);
        var cl = TensorUtil.Leaf(new[] { (-0.45 - gamma / beta) * 4 }, ScalarType.Float64);
        using var r = SimPoLoss.Compute(new PreferenceLogps(cw, cl, tensor(new[] { 10.0 }), tensor(new[] { 4.0 })), new SimPoOptions { Beta = beta, Gamma = gamma });
        Assert.Equal(Math.Log(2), r.Loss.ToDouble(), 12);
        r.Loss.backward();
        Assert.Equal(-beta / 2 / 10, cw.grad!.ToDouble(), 12);
        Assert.Equal(beta / 2 / 4, cl.grad!.ToDouble(), 12);
        Assert.Equal(beta * -0.45, r[MetricNames.RewardsChosen], 12);   // TRL's rewards: beta * per-token mean
    }

    [Fact]
    public void Orpo_log1mexp_is_accurate_over_the_whole_range_and_probability_one_is_an_error()
    {
        using var scope = NewDisposeScope();
        // log(1 - e^a) against series / exact forms where naive evaluation fails
        var a = tensor(new[] { -1e-300, -1e-12, -1e-5, -0.5, -Math.Log(2), -1.0, -40.0, -800.0 });
        var got = TensorUtil.Values(OrpoLoss.Log1mExp(a));
        // near 0 the series log(1 - e^-x) = log x - x/2 + x^2/24 - ...; far below, -e^a (and 0 at -800)
        double[] expected = { Math.Log(1e-300), Math.Log(1e-12) - 0.5e-12, Math.Log(1e-5) - 1e-5 / 2 + 1e-10 / 24, Math.Log(1 - Math.Exp(-0.5)), Math.Log(0.5), Math.Log(1 - Math.Exp(-1)), -Math.Exp(-40), -0.0 };
        for (int i = 0; i < got.Length; i++) Close(expected[i], got[i], $"log1mexp({TensorUtil.Values(a)[i]})", 1e-12);
        // a = 0: probability 1
        var p = new PreferenceLogps(tensor(new[] { 0.0, -3.0 }), tensor(new[] { -2.0, -1.0 }), tensor(new[] { 2.0, 3.0 }), tensor(new[] { 2.0, 3.0 }));
        var completionOnly = new OrpoOptions { NllTokens = OrpoNllTokens.Completion };
        var e = Assert.Throws<ArgumentException>(() => OrpoLoss.Compute(p, null, completionOnly));
        Assert.Contains("probability 1", e.Message);
        using var r = OrpoLoss.Compute(new PreferenceLogps(tensor(new[] { -1e-9 }), tensor(new[] { -50.0 }), tensor(new[] { 1.0 }), tensor(new[] { 1.0 })), null, completionOnly);
        Assert.True(double.IsFinite(r.Loss.ToDouble()));
        foreach (var m in new[] { "log_odds_ratio", "log_odds_chosen", MetricNames.NllLoss }) Assert.True(r.Metrics.ContainsKey(m), m);
    }

    [Fact]
    public void Reference_free_losses_refuse_a_reference_and_need_token_counts()
    {
        using var scope = NewDisposeScope();
        var p = new PreferenceLogps(tensor(new[] { -3.0 }), tensor(new[] { -4.0 }), tensor(new[] { 2.0 }), tensor(new[] { 2.0 }));
        foreach (var loss in new IPreferenceLoss[] { new CpoLoss(), new SimPoLoss(), new AlphaPoLoss(), new OrpoLoss(), new BradleyTerryLoss() })
        {
            var e = Assert.Throws<ArgumentException>(() => loss.Compute(new PreferenceBatch(p, p)));
            Assert.Equal("reference", e.ParamName);
        }
        var noCounts = new PreferenceLogps(tensor(new[] { -3.0 }), tensor(new[] { -4.0 }));
        foreach (var loss in new IPreferenceLoss[] { new CpoLoss(), new SimPoLoss(), new OrpoLoss(new() { NllTokens = OrpoNllTokens.Completion }), new CpoLoss(new CpoOptions { LossType = CpoLossType.Ipo, CpoAlpha = 0 }) })
            Assert.Throws<ArgumentException>(() => loss.Compute(new PreferenceBatch(noCounts)));
        using var ok = new CpoLoss(new CpoOptions { CpoAlpha = 0 }).Compute(new PreferenceBatch(noCounts));   // sigmoid without NLL needs none
        Assert.Equal(Math.Log(1 + Math.Exp(-0.1)), ok.Loss.ToDouble(), 12);
        Assert.Throws<ArgumentOutOfRangeException>(() => new CpoOptions { LabelSmoothing = 0.5 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new SimPoOptions { Gamma = -1 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new CpoOptions { LossType = (CpoLossType)9 });
    }

    // ---- unpaired ----

    static (PreferenceLogps Policy, PreferenceLogps Reference, Tensor W, Tensor L, double[] Pw, double[] Rw, double[] Pl, double[] Rl) Unpaired(Random rng, int d, int u)
    {
        var pw = Uniform(rng, d, -60, -5); var rw = pw.Select(x => Math.Min(x + (rng.NextDouble() - 0.5) * 20, -0.1)).ToArray();
        var pl = Uniform(rng, u, -60, -5); var rl = pl.Select(x => Math.Min(x + (rng.NextDouble() - 0.5) * 20, -0.1)).ToArray();
        var (w, l) = (TensorUtil.Leaf(pw, ScalarType.Float64), TensorUtil.Leaf(pl, ScalarType.Float64));
        return (PreferenceLogps.Unpaired(w, l), PreferenceLogps.Unpaired(tensor(rw), tensor(rl)), w, l, pw, rw, pl, rl);
    }

    [Theory]
    [InlineData("kto", 3, 5)]
    [InlineData("kto", 4, 0)]
    [InlineData("kto_precomputed", 0, 3)]
    [InlineData("apo_zero_unpaired", 2, 6)]
    [InlineData("bco", 5, 2)]
    [InlineData("bco_weighted", 3, 3)]
    public void Unpaired_losses_equal_the_float64_oracle_in_value_and_gradient(string name, int d, int u)
    {
        var rng = new Random(d * 31 + u);
        for (int trial = 0; trial < 25; trial++)
        {
            using var scope = NewDisposeScope();
            var (policy, reference, w, l, pw, rw, pl, rl) = Unpaired(rng, d, u);
            var kPol = Uniform(rng, 4, -50, -10); var kRef = kPol.Select(x => x + (rng.NextDouble() - 0.3) * 8).ToArray();
            double z0Raw = kPol.Zip(kRef, (a, b) => a - b).Average();
            var opts = new KtoOptions { Beta = 0.2, DesirableWeight = 1.3, UndesirableWeight = 0.7 };
            var weights = Uniform(rng, d + u, 0.2, 2);
            var baseline = BcoRewardBaseline.FromJson("{\"mean\": 0.4, \"count\": 10}");
            Func<double[], double[], double> oracle;
            PreferenceLossResult r;
            switch (name)
            {
                case "kto":
                    r = new KtoLoss(opts).Compute(new PreferenceBatch(policy, reference) { Mismatched = new MismatchedLogps(tensor(kPol), tensor(kRef)) });
                    oracle = (a, b) => KtoOracle(a, rw, b, rl, z0Raw, 0.2, 1.3, 0.7, false);
                    break;
                case "kto_precomputed":
                    r = new KtoLoss(opts).Compute(new PreferenceBatch(policy, reference) { KlDivergence = tensor(z0Raw) });
                    oracle = (a, b) => KtoOracle(a, rw, b, rl, z0Raw, 0.2, 1.3, 0.7, false);
                    break;
                case "apo_zero_unpaired":
                    r = new ApoZeroUnpairedLoss(opts).Compute(new PreferenceBatch(policy, reference));
                    oracle = (a, b) => KtoOracle(a, rw, b, rl, 0, 0.2, 1.3, 0.7, true);
                    break;
                default:
                    bool weighted = name == "bco_weighted";
                    var bco = new BcoLoss(baseline, new BcoOptions { Beta = 0.2 });
                    r = bco.Compute(new PreferenceBatch(policy, reference) { ExampleWeights = weighted ? tensor(weights) : null });
                    // delta: the running mean after adding this batch's rewards (TRL updates before use)
                    var rewards = pw.Select((p, i) => 0.2 * (p - rw[i])).Concat(pl.Select((p, i) => 0.2 * (p - rl[i]))).ToArray();
                    double delta = (0.4 * 10 + rewards.Sum()) / (10 + rewards.Length);
                    Assert.Equal(delta, baseline.Mean, 12);
                    oracle = (a, b) => BcoOracle(a, rw, b, rl, delta, 0.2, weighted ? weights : null);
                    break;
            }
            using (r)
            {
                Close(oracle(pw, pl), r.Loss.ToDouble(), $"{name} loss", 1e-10);
                Assert.Equal(d + u, r.PerExample.shape[0]);
                r.Loss.backward();
                if (d > 0) CloseAll(Grad(x => oracle(x, pl), pw), w.grad!, $"{name} d/dl_desirable");
                if (u > 0) CloseAll(Grad(x => oracle(pw, x), pl), l.grad!, $"{name} d/dl_undesirable");
                if (d > 0) Assert.True(w.grad!.le(0).all().item<bool>(), $"{name}: desirable pushed up");
                if (u > 0) Assert.True(l.grad!.ge(0).all().item<bool>(), $"{name}: undesirable pushed down");
                foreach (var m in r.Metrics) Assert.True(double.IsFinite(m.Value), $"{name}: metric {m.Key} = {m.Value}");
            }
        }
    }

    [Fact]
    public void Kto_losses_are_bounded_by_their_weights_and_z0_is_clamped_and_detached()
    {
        var rng = new Random(8);
        for (int trial = 0; trial < 50; trial++)
        {
            using var scope = NewDisposeScope();
            var (policy, reference, _, _, _, _, _, _) = Unpaired(rng, 3, 4);
            var kPol = TensorUtil.Leaf(Uniform(rng, 3, -40, -10), ScalarType.Float64);
            var opts = new KtoOptions { Beta = 0.5 + 3 * rng.NextDouble(), DesirableWeight = 2, UndesirableWeight = 0.5 };
            using var r = new KtoLoss(opts).Compute(new PreferenceBatch(policy, reference) { Mismatched = new MismatchedLogps(kPol, kPol.detach() + 1) });
            var per = TensorUtil.Values(r.PerExample);
            Assert.All(per.Take(3), x => Assert.InRange(x, 0, 2));
            Assert.All(per.Skip(3), x => Assert.InRange(x, 0, 0.5));
            Assert.Equal(0.0, r["kl"]);                      // mean(l_pol - l_ref) = -1 < 0: clamped
            r.Loss.backward();
            Assert.Null(kPol.grad);                          // z0 is detached
        }
    }

    [Fact]
    public void Bco_delta_converges_to_the_mean_reward_is_frozen_in_evaluation_and_resumes_from_json()
    {
        using var scope = NewDisposeScope();
        var baseline = new BcoRewardBaseline();
        var loss = new BcoLoss(baseline, new BcoOptions { Beta = 0.5 });
        var all = new List<double>();
        var rng = new Random(3);
        for (int step = 0; step < 20; step++)
        {
            using var inner = NewDisposeScope();
            int d = rng.Next(0, 4), u = rng.Next(d == 0 ? 1 : 0, 4);
            var (policy, reference, _, _, pw, rw, pl, rl) = Unpaired(rng, d, u);
            all.AddRange(pw.Select((p, i) => 0.5 * (p - rw[i])).Concat(pl.Select((p, i) => 0.5 * (p - rl[i]))));
            using var r = loss.Compute(new PreferenceBatch(policy, reference));
            Assert.Equal(all.Average(), baseline.Mean, 10);
            Assert.Equal(baseline.Mean, r["delta"], 10);
        }
        Assert.Equal(all.Count, baseline.Count);
        var json = baseline.ToJson();
        var resumed = BcoRewardBaseline.FromJson(json);
        Assert.Equal(baseline.Mean, resumed.Mean);
        Assert.Equal(baseline.Count, resumed.Count);
        baseline.Training = false;                             // evaluation: frozen
        var (p2, r2, _, _, _, _, _, _) = Unpaired(rng, 2, 2);
        using (var r = loss.Compute(new PreferenceBatch(p2, r2))) Assert.Equal(resumed.Mean, r["delta"], 12);
        Assert.Equal(resumed.Count, baseline.Count);
        Assert.Throws<FormatException>(() => BcoRewardBaseline.FromJson("{\"mean\": 1}"));
        Assert.Throws<FormatException>(() => BcoRewardBaseline.FromJson("{\"mean\": 1, \"count\": -2}"));
        foreach (var bad in new[] { "{\"mean\": 1, \"count\": 3.5}", "{\"mean\": \"x\", \"count\": 3}", "[1, 2]", "not json" })
            Assert.Contains("not a BCO baseline state", Assert.Throws<FormatException>(() => BcoRewardBaseline.FromJson(bad)).Message);
        Assert.Contains("invalid BCO baseline state", Assert.Throws<FormatException>(() => BcoRewardBaseline.FromJson("{\"mean\": 1e400, \"count\": 3}")).Message);
    }

    [Fact]
    public void Unpaired_inputs_are_validated_clearly()
    {
        using var scope = NewDisposeScope();
        var e = Assert.Throws<ArgumentException>(() => PreferenceLogps.Unpaired(zeros(0, dtype: ScalarType.Float64), zeros(0, dtype: ScalarType.Float64)));
        Assert.Contains("both empty", e.Message);
        var policy = PreferenceLogps.Unpaired(tensor(new[] { -3.0 }), zeros(0, dtype: ScalarType.Float64));
        var reference = PreferenceLogps.Unpaired(tensor(new[] { -3.5 }), zeros(0, dtype: ScalarType.Float64));
        e = Assert.Throws<ArgumentException>(() => new KtoLoss().Compute(new PreferenceBatch(policy, reference)));
        Assert.Contains("reference point z0", e.Message);
        Assert.Equal("reference", Assert.Throws<ArgumentException>(() => new KtoLoss().Compute(new PreferenceBatch(policy) { KlDivergence = zeros(1) })).ParamName);
        // a precomputed z0 is a scalar or a per-sample vector, as SPO's KL
        e = Assert.Throws<ArgumentException>(() => new KtoLoss().Compute(new PreferenceBatch(policy, reference) { KlDivergence = zeros(2, 2, dtype: ScalarType.Float64) }));
        Assert.Equal("batch.KlDivergence", e.ParamName);
        Assert.Contains("scalar or a 1-D", e.Message);
        // paired data is unpaired by KTO (chosen desirable, rejected undesirable), as TRL's KTOTrainer does with paired datasets
        using (var paired = new KtoLoss().Compute(new PreferenceBatch(new PreferenceLogps(tensor(new[] { -1.0 }), tensor(new[] { -2.0 })), new PreferenceLogps(tensor(new[] { -1.5 }), tensor(new[] { -2.5 }))) { KlDivergence = zeros(1) }))
        using (var unpaired = new KtoLoss().Compute(new PreferenceBatch(PreferenceLogps.Unpaired(tensor(new[] { -1.0 }), tensor(new[] { -2.0 })), PreferenceLogps.Unpaired(tensor(new[] { -1.5 }), tensor(new[] { -2.5 }))) { KlDivergence = zeros(1) }))
            Assert.Equal(unpaired.Loss.ToDouble(), paired.Loss.ToDouble(), 14);
        // RPO still needs both sides
        Assert.Throws<ArgumentException>(() => RpoLoss.Compute(policy, reference, PromptEmbeddings.Unpaired(randn(1, 3), zeros(0, 3))));
        // weights: D + U of them
        Assert.Equal("batch.ExampleWeights", Assert.Throws<ArgumentException>(() => new ApoZeroUnpairedLoss().Compute(new PreferenceBatch(policy, reference) { ExampleWeights = ones(2) })).ParamName);
        Assert.Null(KtoLoss.BalanceAdvice(100, 100));
        Assert.Null(KtoLoss.BalanceAdvice(130, 100));
        Assert.Contains("[1, 4/3]", KtoLoss.BalanceAdvice(100, 300)!);
        Assert.Contains("DesirableWeight in [3, 4]", KtoLoss.BalanceAdvice(100, 300)!);
    }

    // ---- reward model ----

    [Theory]
    [InlineData(false, 0.0)]
    [InlineData(true, 0.0)]
    [InlineData(true, 0.01)]
    public void Bradley_terry_equals_the_float64_oracle_with_margin_and_centering(bool withMargin, double c)
    {
        var rng = new Random(withMargin ? 1 : 2);
        for (int trial = 0; trial < 30; trial++)
        {
            using var scope = NewDisposeScope();
            int b = 1 + rng.Next(8);
            var rw = Uniform(rng, b, -4, 4); var rl = Uniform(rng, b, -4, 4);
            var margin = withMargin ? Uniform(rng, b, 0, 2) : null;
            var (w, l) = (TensorUtil.Leaf(rw, ScalarType.Float64), TensorUtil.Leaf(rl, ScalarType.Float64));
            using var r = BradleyTerryLoss.Compute(w, l, margin is null ? null : tensor(margin), new BradleyTerryOptions { CenteringCoefficient = c });
            Close(BtOracle(rw, rl, margin, c), r.Loss.ToDouble(), "bt loss", 1e-12);
            r.Loss.backward();
            CloseAll(Grad(x => BtOracle(x, rl, margin, c), rw), w.grad!, "bt d/dr_w");
            CloseAll(Grad(x => BtOracle(rw, x, margin, c), rl), l.grad!, "bt d/dr_l");
            if (c == 0) Assert.True(w.grad!.le(0).all().item<bool>() && l.grad!.ge(0).all().item<bool>());
            Assert.Equal(rw.Zip(rl, (x, y) => x > y ? 1.0 : 0.0).Average(), r["accuracy"], 12);
            Assert.Equal(rw.Zip(rl, (x, y) => x - y).Average(), r["margin"], 12);
            Assert.Equal(rw.Concat(rl).Average(), r["mean_reward"], 12);
            Assert.Equal(rw.Concat(rl).Min(), r["min_reward"], 12);
            Assert.Equal(rw.Concat(rl).Max(), r["max_reward"], 12);
            Assert.False(r.Metrics.ContainsKey(MetricNames.LogpsChosen));
        }
    }

    [Fact]
    public void Trl_trainer_names_build_each_objective()
    {
        var baseline = new BcoRewardBaseline();
        var expected = new Dictionary<string, string>
        {
            ["cpo"] = "cpo", ["simpo"] = "cpo_simpo", ["alphapo"] = "simpo", ["orpo"] = "orpo", ["kto"] = "kto",
            ["apo_zero_unpaired"] = "apo_zero_unpaired", ["sigmoid"] = "dpo", ["ipo"] = "ipo_per_token",
        };
        foreach (var (name, lossName) in expected)
            Assert.Equal(lossName, TrlLosses.CreateForTrainer(name).Name);
        Assert.Equal("bco", TrlLosses.CreateForTrainer("bco", new TrlTrainerConfig { BcoBaseline = baseline }).Name);
        Assert.Equal("cpo_hinge", TrlLosses.CreateForTrainer("cpo", new TrlTrainerConfig { CpoLossType = "hinge" }).Name);
        Assert.Equal("simpo", TrlLosses.CreateForTrainer("simpo", new TrlTrainerConfig { CpoAlpha = 0 }).Name);
        var alphapo = (CpoLoss)TrlLosses.CreateForTrainer("alphapo", new TrlTrainerConfig { Alpha = 0.3 });
        Assert.Equal(("alphapo", 0.3, 0.0, CpoLossType.Simpo), (alphapo.Name, alphapo.Options.Alpha, alphapo.Options.CpoAlpha, alphapo.Options.LossType));
        var cpoAlphapo = (CpoLoss)TrlLosses.CreateForTrainer("cpo", new TrlTrainerConfig { CpoLossType = "alphapo", Alpha = 0.5 });
        Assert.Equal(("alphapo", 0.0), (cpoAlphapo.Name, cpoAlphapo.Options.CpoAlpha));
        var simpo = (CpoLoss)TrlLosses.CreateForTrainer("simpo");
        Assert.Equal((1.0, 0.5, 0.1), (simpo.Options.CpoAlpha, simpo.Options.SimpoGamma, simpo.Options.Beta));   // TRL's CPOConfig defaults
        Assert.Throws<ArgumentException>(() => TrlLosses.CreateForTrainer("bco"));
        Assert.Contains("kto", Assert.Throws<ArgumentException>(() => TrlLosses.CreateForTrainer("ktoo")).Message);
    }

    [Theory]
    [InlineData("kto", "BcoBaseline")]
    [InlineData("orpo", "cpo_alpha")]
    [InlineData("orpo", "label_smoothing")]
    [InlineData("cpo", "desirable_weight")]
    [InlineData("sigmoid", "simpo_gamma")]
    [InlineData("sigmoid", "label_smoothing")]
    [InlineData("cpo-hinge", "label_smoothing")]
    [InlineData("cpo-sigmoid", "simpo_gamma")]
    [InlineData("alphapo", "cpo_alpha")]
    [InlineData("alphapo", "loss_type")]
    public void Trl_trainer_names_refuse_a_field_their_trainer_does_not_read_by_its_trl_name(string name, string field)
    {
        var baseline = new BcoRewardBaseline();
        var config = field switch
        {
            "BcoBaseline" => new TrlTrainerConfig { BcoBaseline = baseline },
            "cpo_alpha" => new TrlTrainerConfig { CpoAlpha = 0.5 },
            "label_smoothing" => new TrlTrainerConfig { LabelSmoothing = 0.1 },
            "desirable_weight" => new TrlTrainerConfig { DesirableWeight = 2 },
            "simpo_gamma" => new TrlTrainerConfig { SimpoGamma = 1 },
            "loss_type" => new TrlTrainerConfig { CpoLossType = "sigmoid" },
            _ => throw new InvalidOperationException(field),
        };
        var (trainer, type) = name.StartsWith("cpo-") ? ("cpo", name[4..]) : (name, null);
        if (type is not null) config = config with { CpoLossType = type };
        var e = Assert.Throws<ArgumentException>(() => TrlLosses.CreateForTrainer(trainer, config));
        Assert.Equal(field, e.ParamName);
        Assert.Contains(field, e.Message);
    }

    [Fact]
    public void Reference_free_losses_run_on_fused_log_probs_and_unpaired_ones_on_split_rows()
    {
        using var scope = NewDisposeScope();
        manual_seed(9);
        var hidden = randn(4, 6, 8, dtype: ScalarType.Float64, requires_grad: true);
        var weight = randn(11, 8, dtype: ScalarType.Float64, requires_grad: true);
        var labels = randint(0, 11, new long[] { 4, 6 });
        var mask = ones(4, 6, dtype: ScalarType.Bool);
        using var fused = FusedLinearLogProbs.ComputeLoss(new SimPoLoss(), hidden, weight, null, labels, mask, LabelAlignment.ShiftByOne);
        using var logps = SequenceLogProbs.Compute(hidden.matmul(weight.t()), labels, mask, LabelAlignment.ShiftByOne);
        using var plain = new SimPoLoss().Compute(new PreferenceBatch(logps.ToPreferenceLogps()));
        Assert.Equal(plain.Loss.ToDouble(), fused.Loss.ToDouble(), 12);
        // unpaired: first D rows desirable, the rest undesirable
        using var policy = FusedLinearLogProbs.Compute(hidden, weight, null, labels, mask, LabelAlignment.ShiftByOne);
        var split = policy.ToUnpairedLogps(desirableCount: 1);
        Assert.Equal(1, split.ChosenCount);
        Assert.Equal(3, split.RejectedCount);
        using var kto = new KtoLoss().Compute(new PreferenceBatch(split, PreferenceLogps.Unpaired(split.Chosen.detach() - 1, split.Rejected.detach() + 1)) { KlDivergence = zeros(1) });
        kto.Loss.backward();
        Assert.True(weight.grad is not null && double.IsFinite(weight.grad.abs().sum().ToDouble()));
    }
}
