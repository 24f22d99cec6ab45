using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>Turns the oracle's plain cases into token batches (garbage NaN where no token counts) and reads results back.</summary>
static class Pg
{
    public static Tensor Row(params double[] x) => tensor(x, new long[] { 1, x.Length }, dtype: ScalarType.Float64);

    public static Tensor Grid(double[,] g, ScalarType dtype) => tensor(g, dtype: ScalarType.Float64).to_type(dtype);

    public static double[,] Rounded(double[,] g, ScalarType dtype)
    {
        using var t = Grid(g, dtype);
        return ToGrid(t);
    }

    public static double[,] ToGrid(Tensor t)
    {
        using var h = t.detach().to_type(ScalarType.Float64).cpu();
        var flat = h.data<double>().ToArray();
        int n = (int)t.shape[0], m = (int)t.shape[1];
        var g = new double[n, m];
        for (int i = 0; i < n; i++) for (int k = 0; k < m; k++) g[i, k] = flat[i * m + k];
        return g;
    }

    public static Tensor Mask(PgCase x)
    {
        var m = new bool[x.N, x.T];
        for (int i = 0; i < x.N; i++) for (int t = 0; t < x.T; t++) m[i, t] = x.Valid(i, t);
        return tensor(m.Cast<bool>().ToArray(), new long[] { x.N, x.T });
    }

    /// <summary>The case with every input rounded to <paramref name="dtype"/> (what the library sees), for the oracle.</summary>
    public static PgCase RoundedCase(PgCase x, ScalarType dtype) => x with
    {
        L = Rounded(x.L, dtype), Old = x.Old is null ? null : Rounded(x.Old, dtype), Ref = Rounded(x.Ref, dtype), Beh = Rounded(x.Beh, dtype),
    };

    public static (TokenBatch Batch, Tensor Leaf) Batch(PgCase x, ScalarType dtype, TokenWindow? window = null, bool reference = false, bool behaviour = false)
    {
        var leaf = Grid(x.L, dtype).detach().requires_grad_(true);
        var adv = x.SeqAdv is not null ? tensor(x.SeqAdv, dtype: ScalarType.Float64) : Grid(x.TokAdv!, ScalarType.Float64);
        return (new TokenBatch(leaf, Mask(x))
        {
            OldLogProbs = x.Old is null ? null : Grid(x.Old, dtype),
            ReferenceLogProbs = reference ? Grid(x.Ref, dtype) : null,
            BehaviourLogProbs = behaviour ? Grid(x.Beh, dtype) : null,
            Advantages = adv,
            Window = window,
        }, leaf);
    }

    public static void AssertGridClose(double[,] expected, double[,] actual, PgCase x, double tol, string what)
    {
        double scale = 1e-12;
        for (int i = 0; i < x.N; i++) for (int t = 0; t < x.Lengths[i]; t++) scale = Math.Max(scale, Math.Abs(expected[i, t]));
        for (int i = 0; i < x.N; i++)
            for (int t = 0; t < x.T; t++)
            {
                double e = x.Valid(i, t) ? expected[i, t] : 0, a = actual[i, t];
                Assert.True(Math.Abs(e - a) <= tol * Math.Max(1, scale), $"{what}: gradient [{i}, {t}] expected {e:G10}, got {a:G10} (scale {scale:G4})");
            }
    }
}

/// <summary>
/// The policy-gradient family (spec §12) against its float64 oracle, the spec's reference values, TRL's GRPOTrainer
/// conventions, and the properties the objectives must have.
/// </summary>
public class PolicyGradientTests
{
    public static IEnumerable<object[]> NamesAndDtypes =>
        from n in PolicyLosses.Names
        from d in new[] { ScalarType.Float64, ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16 }
        select new object[] { n, d };

    [Theory, MemberData(nameof(NamesAndDtypes))]
    public void Every_objective_matches_the_float64_oracle_value_and_gradient(string name, ScalarType dtype)
    {
        var rng = new Random(name.Sum(ch => ch) * 7919 + (int)dtype);   // deterministic (string hashes are randomised per process)
        double tol = dtype == ScalarType.Float64 ? 1e-6 : 3e-4;
        for (int trial = 0; trial < 12; trial++)
        {
            bool withKl = trial % 3 == 1;
            double drift = trial % 4 == 0 ? 1e-5 : trial % 4 == 1 ? 0.05 : 0.3;
            var raw = PgCase.Random(rng, rng.Next(1, 6), rng.Next(1, 7), allowEmpty: true, withOld: trial % 5 != 0,
                tokenAdvantages: trial % 2 == 1, drift: drift);
            var x = Pg.RoundedCase(raw, dtype);
            var config = PolicyOracle.For(name) with { KlBeta = withKl ? 0.04 : 0 };
            var loss = PolicyLosses.Create(name, kl: withKl ? new KlPenalty(0.04) : null);
            var (batch, leaf) = Pg.Batch(x, dtype, reference: withKl);
            using var r = loss.Compute(batch);
            r.Backward();
            double expected = PolicyOracle.Loss(x, config, x.L, x.L);
            double got = r.Loss.to_type(ScalarType.Float64).item<double>();
            Assert.True(Math.Abs(expected - got) <= tol * Math.Max(1, Math.Abs(expected)), $"{name} {dtype} trial {trial}: loss {got:G10}, oracle {expected:G10}");
            Pg.AssertGridClose(PolicyOracle.Gradient(x, config), Pg.ToGrid(leaf.grad!), x, tol * 10, $"{name} {dtype} trial {trial}");
        }
    }

    [Fact]
    public void The_registry_names_every_objective_and_each_reports_its_name()
    {
        foreach (var name in PolicyLosses.Names)
        {
            var loss = PolicyLosses.Create(name);
            Assert.Equal(name, loss.Name);
            _ = PolicyOracle.For(name);                                     // the oracle covers every name
        }
        var e = Assert.Throws<ArgumentException>(() => PolicyLosses.Create("grpoo"));
        Assert.Contains("grpo, dapo", e.Message);
    }

    static TokenLossResult One(ITokenLoss loss, double logRatio, double advantage, Tensor? leafOut = null)
    {
        var l = Pg.Row(-1.0).requires_grad_(true);
        var batch = new TokenBatch(l, ones(1, 1, dtype: ScalarType.Bool))
        {
            OldLogProbs = Pg.Row(-1.0 - logRatio),
            Advantages = tensor(new[] { advantage }, dtype: ScalarType.Float64),
        };
        return loss.Compute(batch);
    }

    [Fact]
    public void The_spec_reference_values_of_the_policy_losses()
    {
        double V(ITokenLoss loss, double lr, double a) { using var r = One(loss, lr, a); return r.Loss.item<double>(); }
        Assert.Equal(-1.2, V(new ClippedPolicyLoss(), 0.3, 1), 9);
        Assert.Equal(-1.28, V(new ClippedPolicyLoss(new() { EpsilonHigh = 0.28 }), 0.3, 1), 9);
        Assert.Equal(4.481689, V(new ClippedPolicyLoss(), 1.5, -1), 6);
        Assert.Equal(3.0, V(new ClippedPolicyLoss(new() { DualClip = 3 }), 1.5, -1), 9);
        Assert.Equal(-1.3498588 * -1.0, V(new CispoLoss(new() { EpsilonHigh = 5 }), 0.3, 1), 6);        // -w A l with l = -1
        Assert.Equal(-1.2 * -1.0, V(new CispoLoss(new() { Bound = CispoBound.Clip, EpsilonHigh = 0.2 }), 0.3, 1), 9);
        Assert.Equal(-2.3463334, V(new SapoLoss(), 0.3, 1), 6);
        Assert.Equal(2.2507387, V(new SapoLoss(), 0.3, -1), 6);
        // TRL's delta caps the unclipped ratio: A = -1, log rho = 1.5, delta 2 -> -min(-2, -1.2) = 2
        Assert.Equal(2.0, V(new ClippedPolicyLoss(new() { Delta = 2 }), 1.5, -1), 9);

        // GSPO: log-ratios [0.1, -0.3, 0.5] -> s = exp(0.1) = 1.1051709; unclipped with wide eps, L = -s A
        var l = Pg.Row(-1.0, -1.0, -1.0).requires_grad_(true);
        var gspo = new ClippedPolicyLoss(new() { Ratio = ImportanceRatio.SequenceMean, EpsilonLow = 0.5, EpsilonHigh = 0.5 }, "gspo");
        using var g = gspo.Compute(new TokenBatch(l, ones(1, 3, dtype: ScalarType.Bool))
        {
            OldLogProbs = Pg.Row(-1.1, -0.7, -1.5),
            Advantages = tensor(new[] { 1.0 }, dtype: ScalarType.Float64),
        });
        Assert.Equal(-1.1051709, g.Loss.item<double>(), 6);
    }

    [Fact]
    public void The_spec_reference_values_of_the_kl_estimators()
    {
        using var l = tensor(new[] { -1.0 }, dtype: ScalarType.Float64);
        using var r = tensor(new[] { -1.5 }, dtype: ScalarType.Float64);
        double K(KlEstimator e) { using var t = new KlPenalty(1, e).PerToken(l, r); return t.item<double>(); }
        Assert.Equal(0.5, K(KlEstimator.K1), 12);
        Assert.Equal(0.125, K(KlEstimator.K2), 12);
        Assert.Equal(0.1065307, K(KlEstimator.K3), 7);
        Assert.Equal(0.1065307, K(KlEstimator.K3Plus), 7);
        // k3+ has k2's gradient: d k2 / d l = -(l_ref - l) = 0.5 ... times -1: u = r - l, dk2/dl = -u = 0.5
        using var leaf = tensor(new[] { -1.0 }, dtype: ScalarType.Float64).requires_grad_(true);
        using (var k = new KlPenalty(1, KlEstimator.K3Plus).PerToken(leaf, r)) k.sum().backward();
        Assert.Equal(0.5, leaf.grad!.item<double>(), 12);
    }

    [Fact]
    public void The_spec_reference_values_of_the_reductions()
    {
        // L = [[1, 2, ., .], [3, 4, 5, 6]]: REINFORCE with A = -1 and l = L makes the per-token loss L itself
        var values = tensor(new[] { -1.0, -2, 0, 0, -3, -4, -5, -6 }, new long[] { 2, 4 }, dtype: ScalarType.Float64);
        var mask = tensor(new[] { true, true, false, false, true, true, true, true }, new long[] { 2, 4 });
        double R(TokenReduction reduction)
        {
            using var res = new ReinforceLoss(new() { Reduction = reduction }).Compute(new TokenBatch(values, mask)
            {
                Advantages = tensor(new[] { -1.0, -1.0 }, dtype: ScalarType.Float64),
            });
            return -res.Loss.item<double>();
        }
        Assert.Equal(3.5, R(TokenReduction.TokenMean), 12);
        Assert.Equal(3.0, R(TokenReduction.SequenceMeanTokenMean), 12);
        Assert.Equal(10.5, R(TokenReduction.SequenceMeanTokenSum), 12);
        Assert.Equal(2.625, R(TokenReduction.ConstantNormalizer(4)), 12);
        Assert.Equal(3.5, R(TokenReduction.LocalTokenMean), 12);
    }

    [Fact]
    public void The_spec_reference_values_of_the_advantage_estimators()
    {
        using var r = tensor(new[] { 1.0, 0, 0, 1 });
        var one = GroupIds.Contiguous(4);
        double First(AdvantageResult a) { using (a) return a.Values.to_type(ScalarType.Float64)[0].item<double>(); }
        Assert.Equal(0.865875, First(Advantages.Grpo(r, one)), 6);
        Assert.Equal(0.866024, First(Advantages.Grpo(r, one, new() { Epsilon = 1e-6 })), 6);
        Assert.Equal(0.866025, First(Advantages.Grpo(r, one, new() { Epsilon = 1e-9 })), 6);
        Assert.Equal(1.154699, First(Advantages.Grpo(r, one, new() { Epsilon = 1e-6, LeaveOneOut = true })), 6);
        Assert.Equal(0.5, First(Advantages.DrGrpo(r, one)), 6);
        Assert.Equal(0.666667, First(Advantages.Rloo(r, one)), 6);
        using var all = Advantages.Grpo(r, one);
        Assert.Equal(new[] { 1.0, -1, -1, 1 }, TensorUtil.Values(all.Values).Select(v => Math.Sign(v) * 1.0));
        Assert.Equal(0.5, all.Metrics[MetricNames.Reward], 12);
        Assert.Equal(Math.Sqrt(1.0 / 3), all.Metrics[MetricNames.RewardStd], 9);
    }

    [Fact]
    public void Advantages_exclude_unscorable_completions_and_follow_each_anchors_singleton_rule()
    {
        // group 0: [1, NaN, 0] -> the NaN is excluded (mean 0.5 of two) and gets 0; group 1: [2, NaN, NaN] is a singleton
        using var r = tensor(new[] { 1.0, double.NaN, 0, 2, double.NaN, double.NaN });
        var groups = GroupIds.Contiguous(3);
        using var trl = Advantages.Grpo(r, groups);
        var a = TensorUtil.Values(trl.Values);
        double std = Math.Sqrt(0.5);                                               // Bessel std of [1, 0]
        Assert.Equal(0.5 / (std + 1e-4), a[0], 6);
        Assert.Equal(0, a[1]);
        Assert.Equal(-0.5 / (std + 1e-4), a[2], 6);
        Assert.Equal(new double[] { 0, 0, 0 }, a.Skip(3));
        using var verl = Advantages.Grpo(r, groups, new() { Epsilon = 1e-6, SingletonGroup = SingletonGroup.RawReward });
        Assert.Equal(2 / (1 + 1e-6), TensorUtil.Values(verl.Values)[3], 9);
        // batch scaling divides by the std of every scorable reward [1, 0, 2]
        using var batch = Advantages.Grpo(r, groups, new() { Scaling = RewardScaling.Batch });
        Assert.Equal(0.5 / (1.0 + 1e-4), TensorUtil.Values(batch.Values)[0], 6);
        // ids in any order form the same groups as the contiguous layout
        using var byId = Advantages.Grpo(r, GroupIds.FromIds(new long[] { 7, 7, 7, 3, 3, 3 }));
        Assert.Equal(a, TensorUtil.Values(byId.Values));
        // RLOO: the leave-one-out baseline over scorable siblings; a group of one scorable gets 0
        using var rloo = Advantages.Rloo(r, groups);
        Assert.Equal(new[] { 1.0, 0, -1, 0, 0, 0 }, TensorUtil.Values(rloo.Values));
    }

    [Fact]
    public void Reinforce_plus_plus_whitens_discounted_returns_over_the_batch_tokens()
    {
        using var r = tensor(new[] { 1.0, 0.0 });
        using var mask = tensor(new[] { true, true, true, true, false, false }, new long[] { 2, 3 });
        using var res = Advantages.ReinforcePlusPlus(r, mask, new() { Gamma = 0.5 });
        // returns: row 0 [0.25, 0.5, 1], row 1 [0, ., .]; whitened with the unbiased variance + 1e-8
        var g = new[] { 0.25, 0.5, 1.0, 0.0 };
        double mu = g.Average(), sd = Math.Sqrt(g.Sum(v => (v - mu) * (v - mu)) / 3 + 1e-8);
        var expected = new[] { (0.25 - mu) / sd, (0.5 - mu) / sd, (1 - mu) / sd, (0 - mu) / sd, 0, 0 };
        var got = TensorUtil.Values(res.Values);
        for (int k = 0; k < 6; k++) Assert.Equal(expected[k], got[k], 9);
        // the baseline variant subtracts the group mean (0.5) first: returns [0.125, 0.25, 0.5] and [-0.5]
        using var b = Advantages.ReinforcePlusPlus(r, mask, new() { Gamma = 0.5, Baseline = GroupIds.Contiguous(2) });
        var g2 = new[] { 0.125, 0.25, 0.5, -0.5 };
        double mu2 = g2.Average(), sd2 = Math.Sqrt(g2.Sum(v => (v - mu2) * (v - mu2)) / 3 + 1e-8);
        Assert.Equal((-0.5 - mu2) / sd2, TensorUtil.Values(b.Values)[3], 9);
    }

    [Fact]
    public void Gdpo_normalises_each_reward_in_its_group_then_the_weighted_sum_over_the_batch()
    {
        using var rewards = tensor(new[] { 1.0, 10, 0, 30, 1, 20, 0, 10 }, new long[] { 4, 2 });
        using var res = Advantages.Gdpo(rewards, GroupIds.Contiguous(2), new[] { 1.0, 0.5 });
        double Z(double v, double a, double b) { double m = (a + b) / 2, s = Math.Sqrt(((a - m) * (a - m) + (b - m) * (b - m)) / 1); return (v - m) / (s + 1e-4); }
        var sums = new[]
        {
            Z(1, 1, 0) + 0.5 * Z(10, 10, 30), Z(0, 1, 0) + 0.5 * Z(30, 10, 30),
            Z(1, 1, 0) + 0.5 * Z(20, 20, 10), Z(0, 1, 0) + 0.5 * Z(10, 20, 10),
        };
        double mu = sums.Average(), sd = Math.Sqrt(sums.Sum(v => (v - mu) * (v - mu)) / 3);
        var got = TensorUtil.Values(res.Values);
        for (int i = 0; i < 4; i++) Assert.Equal((sums[i] - mu) / (sd + 1e-4), got[i], 9);
    }

    [Fact]
    public void Inside_the_trust_region_a_positive_advantage_raises_every_sampled_token()
    {
        var rng = new Random(3);
        foreach (var name in new[] { "grpo", "dapo", "dr_grpo", "gspo_token", "cispo", "sapo", "reinforce", "dual_clip", "rloo", "gmpo" })
            for (int trial = 0; trial < 10; trial++)
            {
                var x = PgCase.Random(rng, 4, 5, allowEmpty: false, withOld: false) with { SeqAdv = new[] { 1.0, 0.5, 2, 0.1 } };
                var (batch, leaf) = Pg.Batch(x, ScalarType.Float64);
                using var res = PolicyLosses.Create(name).Compute(batch);
                res.Backward();
                var g = Pg.ToGrid(leaf.grad!);
                for (int i = 0; i < x.N; i++)
                    for (int t = 0; t < x.Lengths[i]; t++)
                        Assert.True(g[i, t] < 0, $"{name}: d loss / d l[{i},{t}] = {g[i, t]} should be < 0 (gradient descent raises the token)");
            }
    }

    [Fact]
    public void Clipped_tokens_get_exactly_zero_gradient_and_ratio_one_gives_the_reinforce_gradient()
    {
        // tokens 0, 1 beyond 1 + eps with A > 0 (clipped), tokens 2, 3 inside
        var l = Pg.Row(-1.0, -1.0, -1.0, -1.0).requires_grad_(true);
        var old = Pg.Row(-1.5, -1.4, -1.05, -0.95);
        using (var r = new ClippedPolicyLoss().Compute(new TokenBatch(l, ones(1, 4, dtype: ScalarType.Bool))
        { OldLogProbs = old, Advantages = tensor(new[] { 1.0 }, dtype: ScalarType.Float64) }))
        {
            r.Backward();
            var g = TensorUtil.Values(l.grad!);
            Assert.Equal(0.0, g[0]);
            Assert.Equal(0.0, g[1]);
            Assert.True(g[2] < 0 && g[3] < 0);
            Assert.Equal(0.5, r[MetricNames.ClipRatioHighMean], 12);
            Assert.Equal(0.0, r[MetricNames.ClipRatioLowMean], 12);
        }
        var x = PgCase.Random(new Random(9), 5, 6, withOld: false, tokenAdvantages: true);
        foreach (var reduction in new[] { TokenReduction.TokenMean, TokenReduction.SequenceMeanTokenMean, TokenReduction.ConstantNormalizer(6) })
        {
            var (b1, leaf1) = Pg.Batch(x, ScalarType.Float64);
            var (b2, leaf2) = Pg.Batch(x, ScalarType.Float64);
            using (var a = new ClippedPolicyLoss(new() { Reduction = reduction }).Compute(b1)) a.Backward();
            using (var b = new ReinforceLoss(new() { Reduction = reduction }).Compute(b2)) b.Backward();
            Pg.AssertGridClose(Pg.ToGrid(leaf2.grad!), Pg.ToGrid(leaf1.grad!), x, 1e-12, $"ratio 1 vs REINFORCE, {reduction}");
        }
    }

    public static IEnumerable<object[]> InvariantNames =>
        PolicyLosses.Names.Where(n => n != "bnpo").Select(n => new object[] { n });

    /// <summary>
    /// The invariance oracle: one batch whole, or cut into R = 2 ranks x M = 2 micro-batches of unequal sizes and lengths with
    /// the window counts supplied, gives the same gradient: the parts' gradients summed, divided by D (DDP's average).
    /// </summary>
    [Theory, MemberData(nameof(InvariantNames))]
    public void A_batch_cut_into_ranks_and_micro_batches_gives_the_whole_batch_gradient(string name)
    {
        var rng = new Random(11);
        var x = PgCase.Random(rng, 9, 7, allowEmpty: true, withOld: true, tokenAdvantages: false, drift: 0.1);
        var loss = PolicyLosses.Create(name, maxCompletionLength: 7, kl: new KlPenalty(0.05));
        var (whole, leaf) = Pg.Batch(x, ScalarType.Float64, reference: true);
        using (var r = loss.Compute(whole)) r.Backward();
        var expected = Pg.ToGrid(leaf.grad!);

        var parts = new[] { new[] { 0, 1, 2 }, new[] { 3 }, new[] { 4, 5 }, new[] { 6, 7, 8 } };   // rank 0: parts 0, 1; rank 1: parts 2, 3
        var window = new TokenWindow { Tokens = x.Tokens, Sequences = name == "rloo" ? x.N : x.NonEmpty, DataParallelSize = 2 };
        var summed = new double[x.N, x.T];
        foreach (var rows in parts)
        {
            int t = Math.Max(1, rows.Max(i => x.Lengths[i]));                     // each micro-batch padded to its own length
            double[,] Cut(double[,] g) { var c = new double[rows.Length, t]; for (int a = 0; a < rows.Length; a++) for (int k = 0; k < t; k++) c[a, k] = g[rows[a], k]; return c; }
            var part = new PgCase(rows.Length, t, rows.Select(i => x.Lengths[i]).ToArray(), Cut(x.L), Cut(x.Old!), Cut(x.Ref), Cut(x.Beh),
                rows.Select(i => x.SeqAdv![i]).ToArray(), null);
            var (b, partLeaf) = Pg.Batch(part, ScalarType.Float64, window, reference: true);
            using (var r = loss.Compute(b)) r.Backward();
            var g = Pg.ToGrid(partLeaf.grad!);
            for (int a = 0; a < rows.Length; a++) for (int k = 0; k < t; k++) summed[rows[a], k] += g[a, k] / 2;
        }
        Pg.AssertGridClose(expected, summed, x, 1e-12, $"{name}: whole vs 2 ranks x 2 micro-batches");
    }

    [Fact]
    public void Bnpo_is_the_local_token_mean_divided_by_the_micro_batches_as_trl()
    {
        var x = PgCase.Random(new Random(5), 4, 5, allowEmpty: false);
        var (b, _) = Pg.Batch(x, ScalarType.Float64, new TokenWindow { MicroBatches = 4, Tokens = 1000, DataParallelSize = 8 });
        using var r = PolicyLosses.Create("bnpo").Compute(b);
        double expected = PolicyOracle.Loss(x, PolicyOracle.For("bnpo"), x.L, x.L) / 4;
        Assert.Equal(expected, r.Loss.item<double>(), 12);
    }

    [Fact]
    public void Packed_and_padded_batches_give_the_same_loss_and_gradient()
    {
        var x = PgCase.Random(new Random(21), 5, 6, allowEmpty: false, tokenAdvantages: false);
        foreach (var name in PolicyLosses.Names)
        {
            var loss = PolicyLosses.Create(name, maxCompletionLength: 6);
            var (padded, leaf) = Pg.Batch(x, ScalarType.Float64);
            using var a = loss.Compute(padded);
            a.Backward();
            // pack: every valid token end to end, then 3 positions of padding that belong to no sequence
            var flat = new List<(int I, int T)>();
            for (int i = 0; i < x.N; i++) for (int t = 0; t < x.Lengths[i]; t++) flat.Add((i, t));
            int p = flat.Count + 3;
            double[,] Pack(double[,] g) { var c = new double[1, p]; for (int k = 0; k < p; k++) c[0, k] = k < flat.Count ? g[flat[k].I, flat[k].T] : double.NaN; return c; }
            var packedLeaf = Pg.Grid(Pack(x.L), ScalarType.Float64).requires_grad_(true);
            var mask = tensor(Enumerable.Range(0, p).Select(k => k < flat.Count).ToArray(), new long[] { 1, p });
            using var b = loss.Compute(new TokenBatch(packedLeaf, mask)
            {
                OldLogProbs = Pg.Grid(Pack(x.Old!), ScalarType.Float64),
                Advantages = tensor(x.SeqAdv!, dtype: ScalarType.Float64),
                Boundaries = SequenceBoundaries.FromLengths(x.Lengths.Select(n => (long)n)),
            });
            b.Backward();
            Assert.Equal(a.Loss.item<double>(), b.Loss.item<double>(), 12);
            var g1 = Pg.ToGrid(leaf.grad!);
            var g2 = TensorUtil.Values(packedLeaf.grad!);
            for (int k = 0; k < flat.Count; k++) Assert.Equal(g1[flat[k].I, flat[k].T], g2[k], 12);
        }
    }

    [Fact]
    public void From_the_log_prob_pass_padded_packed_and_fused_give_the_same_gradients_under_accumulation()
    {
        const int n = 4, t = 6, v = 11, h = 5;
        var gen = manual_seed(4);
        var hidden = randn(n, t, h, dtype: ScalarType.Float64);
        var weight = randn(v, h, dtype: ScalarType.Float64);
        var labels = randint(0, v, new long[] { n, t });
        var lengths = new long[] { 6, 3, 5, 2 };
        var mask = tensor(Enumerable.Range(0, n * t).Select(k => k % t < lengths[k / t]).ToArray(), new long[] { n, t });
        var adv = tensor(new[] { 1.0, -0.5, 0.3, -1.2 }, dtype: ScalarType.Float64);
        var loss = PolicyLosses.Create("dapo");

        // reference: logits materialised, the whole batch at once
        var w1 = weight.detach().requires_grad_(true);
        using (var lp = SequenceLogProbs.Compute(hidden.matmul(w1.t()), labels, mask, LabelAlignment.ShiftByOne))
        using (var r = loss.Compute(TokenBatch.FromLogProbs(lp, adv)))
            r.Backward();
        var expected = w1.grad!.clone();

        // fused from hidden states, in two micro-batches of the window (valid tokens counted as the shifted pass scores them)
        double windowTokens = lengths.Sum(x => x - 1);
        var w2 = weight.detach().requires_grad_(true);
        foreach (var rows in new[] { new long[] { 0, 1, 2 }, new long[] { 3 } })
        {
            var idx = tensor(rows);
            using var lp = FusedLinearLogProbs.Compute(hidden.index_select(0, idx), w2, null, labels.index_select(0, idx), mask.index_select(0, idx), LabelAlignment.ShiftByOne);
            using var r = loss.Compute(TokenBatch.FromLogProbs(lp, adv.index_select(0, idx)).WithWindow(new TokenWindow { Tokens = windowTokens }));
            r.Backward();
        }
        TensorUtil.AssertClose(expected, w2.grad!, 1e-10, "fused, two micro-batches vs materialised whole batch");

        // packed: the same sequences end to end in one row
        var packedIds = cat(Enumerable.Range(0, n).Select(i => labels[i].narrow(0, 0, lengths[i])).ToArray(), 0).unsqueeze(0);
        var packedHidden = cat(Enumerable.Range(0, n).Select(i => hidden[i].narrow(0, 0, lengths[i])).ToArray(), 0).unsqueeze(0);
        var w3 = weight.detach().requires_grad_(true);
        using (var lp = SequenceLogProbs.Compute(packedHidden.matmul(w3.t()), packedIds, null, SequenceBoundaries.FromLengths(lengths), LabelAlignment.ShiftByOne))
        using (var r = loss.Compute(TokenBatch.FromLogProbs(lp, adv)))
            r.Backward();
        TensorUtil.AssertClose(expected, w3.grad!, 1e-10, "packed vs padded");
    }
}

/// <summary>GAE (verl's convention) by hand.</summary>
public class GaeTests
{
    [Fact]
    public void Gae_matches_the_recursion_by_hand_and_carries_values_through_masked_tokens()
    {
        // one sequence of 4 positions, position 2 masked (tool output): gamma 0.9, lambda 0.8
        using var r = Pg.Row(0.0, 0.5, 99, 1.0);
        using var v = Pg.Row(0.2, 0.4, 99, 0.6);
        using var m = tensor(new[] { true, true, false, true }, new long[] { 1, 4 });
        using var res = Advantages.Gae(r, v, m, new GaeOptions { Gamma = 0.9, Lambda = 0.8, Whiten = false });
        double a3 = 1.0 - 0.6;                                    // last valid token: next value 0
        double a1 = 0.5 + 0.9 * 0.6 - 0.4 + 0.72 * a3;              // position 2 skipped: V_next = V_3, A_next = A_3
        double a0 = 0.0 + 0.9 * 0.4 - 0.2 + 0.72 * a1;
        var got = TensorUtil.Values(res.Values);
        Assert.Equal(a0, got[0], 12);
        Assert.Equal(a1, got[1], 12);
        Assert.Equal(0.0, got[2]);
        Assert.Equal(a3, got[3], 12);
        Assert.Equal(a0 + 0.2, TensorUtil.Values(res.Returns!)[0], 12);
        using var whitened = Advantages.Gae(r, v, m, new GaeOptions { Gamma = 0.9, Lambda = 0.8 });
        var w = TensorUtil.Values(whitened.Values);
        Assert.Equal(0.0, w[0] + w[1] + w[3], 9);                 // mean 0 over the valid tokens
        Assert.Equal("values", Assert.Throws<ArgumentException>(() => Advantages.Gae(r, Pg.Row(1, 2), m)).ParamName);
    }
}

/// <summary>On-policy distillation's advantages (spec §13) by hand, and its direction.</summary>
public class OnPolicyDistillationTests
{
    [Fact]
    public void The_advantage_is_the_teacher_student_gap_per_token_or_discounted_as_minillm()
    {
        using var student = Pg.Row(-1.0, -2.0, -0.5, -3.0);
        using var teacher = Pg.Row(-0.5, -2.5, -0.5, -1.0);
        using var mask = tensor(new[] { true, true, true, false }, new long[] { 1, 4 });
        using var plain = Advantages.OnPolicyDistillation(student, teacher, mask);
        Assert.Equal(new[] { 0.5, -0.5, 0.0, 0.0 }, TensorUtil.Values(plain.Values));
        using var discounted = Advantages.OnPolicyDistillation(student, teacher, mask, gamma: 0.5);
        Assert.Equal(new[] { 0.5 + 0.5 * (-0.5 + 0.5 * 0), -0.5, 0.0, 0.0 }, TensorUtil.Values(discounted.Values));
        // REINFORCE on these advantages raises the tokens the teacher likes more than the student, lowers the others
        var l = student.detach().clone().requires_grad_(true);
        using (var r = new ReinforceLoss().Compute(new TokenBatch(l, mask) { Advantages = plain.Values })) r.Backward();
        var g = TensorUtil.Values(l.grad!);
        Assert.True(g[0] < 0 && g[1] > 0 && g[2] == 0 && g[3] == 0);
        Assert.Equal("teacherLogProbs", Assert.Throws<ArgumentException>(() => Advantages.OnPolicyDistillation(student, Pg.Row(-1, -1), mask)).ParamName);
        Assert.Equal("gamma", Assert.Throws<ArgumentOutOfRangeException>(() => Advantages.OnPolicyDistillation(student, teacher, mask, 1.5)).ParamName);
    }
}
