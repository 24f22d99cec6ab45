using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>
/// The fused CPU pass of the margin-link losses (PreferenceLossOptions.FusedCpu, MarginLink): against the op-by-op path
/// (FusedCpu = false) in value, per-example losses, gradients and metrics, to 1e-12 in float64 and float32 rounding
/// otherwise; the same errors; the path is taken (fewer tensors); a user's link; memory.
/// </summary>
public class FusedMarginTests
{
    public static IEnumerable<object[]> Losses() => new[]
    {
        "dpo", "dpo_beta2", "cdpo", "robust", "hinge", "ipo", "exo_pair", "discopop",
        "dpo_js", "dpo_forward_kl", "cdpo_alpha", "hinge_js", "ipo_forward_kl", "exo_js", "discopop_alpha",
        "nca_pair", "nca_js", "bco_pair", "bco_forward_kl", "bco_alpha", "apo_zero", "apo_down",
        "sigmoid_norm", "sigmoid_norm_js", "ipo_mean", "ipo_mean_alpha",
    }.Select(n => new object[] { n });

    static IPreferenceLoss Make(string name, bool fused) => name switch
    {
        "dpo" => new DpoLoss(new DpoOptions { FusedCpu = fused }),
        "dpo_beta2" => new DpoLoss(new DpoOptions { Beta = 2, FusedCpu = fused }),
        "cdpo" => new ConservativeDpoLoss(new ConservativeDpoOptions { LabelSmoothing = 0.1, FusedCpu = fused }),
        "robust" => new RobustDpoLoss(new RobustDpoOptions { LabelSmoothing = 0.2, FusedCpu = fused }),
        "hinge" => new HingeLoss(new HingeOptions { Beta = 0.5, FusedCpu = fused }),
        "ipo" => new IpoLoss(new IpoOptions { Beta = 0.3, FusedCpu = fused }),
        "exo_pair" => new ExoPairLoss(new ExoPairOptions { LabelSmoothing = 0.01, FusedCpu = fused }),
        "discopop" => new DiscoPopLoss(new DiscoPopOptions { FusedCpu = fused }),
        "dpo_js" => new DpoLoss(new DpoOptions { ScoreMap = ScoreMap.JensenShannon, FusedCpu = fused }),
        "dpo_forward_kl" => new DpoLoss(new DpoOptions { ScoreMap = ScoreMap.ForwardKl, FusedCpu = fused }),
        "cdpo_alpha" => new ConservativeDpoLoss(new ConservativeDpoOptions { LabelSmoothing = 0.1, ScoreMap = ScoreMap.AlphaDivergence(0.5), FusedCpu = fused }),
        "hinge_js" => new HingeLoss(new HingeOptions { Beta = 2, ScoreMap = ScoreMap.JensenShannon, FusedCpu = fused }),
        "ipo_forward_kl" => new IpoLoss(new IpoOptions { ScoreMap = ScoreMap.ForwardKl, FusedCpu = fused }),
        "exo_js" => new ExoPairLoss(new ExoPairOptions { Beta = 1, ScoreMap = ScoreMap.JensenShannon, FusedCpu = fused }),
        "discopop_alpha" => new DiscoPopLoss(new DiscoPopOptions { ScoreMap = ScoreMap.AlphaDivergence(-0.5), FusedCpu = fused }),
        "nca_pair" => new NcaPairLoss(new NcaPairOptions { Beta = 0.3, FusedCpu = fused }),
        "nca_js" => new NcaPairLoss(new NcaPairOptions { Beta = 2, ScoreMap = ScoreMap.JensenShannon, FusedCpu = fused }),
        "bco_pair" => new BcoPairLoss(new BcoPairOptions { FusedCpu = fused }),
        "bco_forward_kl" => new BcoPairLoss(new BcoPairOptions { ScoreMap = ScoreMap.ForwardKl, FusedCpu = fused }),
        "bco_alpha" => new BcoPairLoss(new BcoPairOptions { ScoreMap = ScoreMap.AlphaDivergence(3), FusedCpu = fused }),
        "apo_zero" => new ApoLoss(new ApoOptions { Beta = 0.2, FusedCpu = fused }),
        "apo_down" => new ApoLoss(new ApoOptions { Anchor = ApoAnchor.Down, FusedCpu = fused }),
        "sigmoid_norm" => new SigmoidNormLoss(new SigmoidNormOptions { Beta = 2, FusedCpu = fused }),
        "sigmoid_norm_js" => new SigmoidNormLoss(new SigmoidNormOptions { ScoreMap = ScoreMap.JensenShannon, FusedCpu = fused }),
        "ipo_mean" => new IpoLoss(new IpoOptions { LogRatio = IpoLogRatio.PerTokenMean, FusedCpu = fused }),
        "ipo_mean_alpha" => new IpoLoss(new IpoOptions { LogRatio = IpoLogRatio.PerTokenMean, ScoreMap = ScoreMap.AlphaDivergence(0.5), FusedCpu = fused }),
        _ => throw new ArgumentException(name),
    };

    static (Tensor Loss, Tensor PerExample, Tensor GradChosen, Tensor GradRejected, IReadOnlyDictionary<string, double> Metrics) Run(
        IPreferenceLoss loss, Tensor chosen, Tensor rejected, Tensor? refChosen, Tensor? refRejected, (Tensor Chosen, Tensor Rejected)? counts = null)
    {
        var c = chosen.detach().clone().requires_grad_(true);
        var r = rejected.detach().clone().requires_grad_(true);
        using var result = loss.Compute(new PreferenceBatch(new PreferenceLogps(c, r, counts?.Chosen, counts?.Rejected),
            refChosen is null ? null : new PreferenceLogps(refChosen, refRejected!)));
        result.Backward();
        return (result.Loss.detach().to_type(ScalarType.Float64).clone(), result.PerExample.detach().to_type(ScalarType.Float64).clone(),
            c.grad!.to_type(ScalarType.Float64).clone(), r.grad!.to_type(ScalarType.Float64).clone(), result.Metrics);
    }

    [Theory, MemberData(nameof(Losses))]
    public void The_fused_pass_equals_the_op_by_op_path_in_every_dtype_with_and_without_a_reference(string name)
    {
        using var scope = NewDisposeScope();
        var g = new Generator(17);
        foreach (var dtype in new[] { ScalarType.Float64, ScalarType.Float32, ScalarType.BFloat16 })
            foreach (bool withReference in new[] { true, false })
            {
                // margins from tiny to far past the softplus threshold, both signs; the exponential score maps on log ratios
                // within +-8 (e^60 squared overflows float32 in IPO, as it should, and float32's own rounding of such
                // scores is past the tolerance), but BCO on alpha = 3 scores past the exponent clamp (2u > 80)
                double spread = (name.EndsWith("forward_kl") || name.EndsWith("alpha")) && name != "bco_alpha" ? 8 : 60;
                Tensor L(long n) => (-(0.5 + spread * rand(new[] { n }, generator: g, dtype: ScalarType.Float64).pow(3))).to_type(dtype);
                var (c, r) = (L(41), L(41));
                var (rc, rr) = withReference ? (L(41), L(41)) : ((Tensor?)null, (Tensor?)null);
                // token counts for the per-token losses (integers, as a collator gives them; the others ignore them)
                var counts = (randint(1, 300, new long[] { 41 }, generator: g), randint(1, 300, new long[] { 41 }, generator: g));
                var fused = Run(Make(name, true), c, r, rc, rr, counts);
                var plain = Run(Make(name, false), c, r, rc, rr, counts);
                double tol = dtype == ScalarType.Float64 ? 1e-12 : 2e-6;
                void Close(Tensor a, Tensor b, string what)
                {
                    double err = ((a - b).abs() / (b.abs() + 1)).max().ToDouble();
                    Assert.True(err <= tol, $"{name} {dtype} reference={withReference}: {what} differs by {err:E2}");
                }
                Close(fused.Loss, plain.Loss, "loss");
                Close(fused.PerExample, plain.PerExample, "per-example");
                Close(fused.GradChosen, plain.GradChosen, "gradient of chosen");
                Close(fused.GradRejected, plain.GradRejected, "gradient of rejected");
                Assert.Equal(plain.Metrics.Keys, fused.Metrics.Keys);
                foreach (var (key, value) in plain.Metrics)
                    Assert.True(Math.Abs(fused.Metrics[key] - value) <= tol * (1 + Math.Abs(value)), $"{name} {dtype}: {key} {fused.Metrics[key]} vs {value}");
            }
    }

    [Theory, MemberData(nameof(Losses))]
    public void A_failed_check_reruns_op_by_op_and_throws_the_same_error(string name)
    {
        using var scope = NewDisposeScope();
        var cases = new (Tensor Chosen, Tensor Rejected)[]
        {
            (tensor(new[] { -1.0, double.NaN, -2.0 }), tensor(new[] { -1.5, -1.0, -3.0 })),
            (tensor(new[] { -1.0, -2.0, 0.5 }), tensor(new[] { -1.5, -1.0, -3.0 })),             // a positive log-prob
            (tensor(new[] { -1.0, -2.0, -1.0 }), tensor(new[] { double.NegativeInfinity, -1.0, -3.0 })),
        };
        var good = tensor(new[] { 3.0, 5, 7 });
        foreach (var (c, r) in cases)
        {
            var a = Assert.ThrowsAny<Exception>(() => Make(name, true).Compute(new PreferenceBatch(new PreferenceLogps(c, r, good, good))));
            var b = Assert.ThrowsAny<Exception>(() => Make(name, false).Compute(new PreferenceBatch(new PreferenceLogps(c, r, good, good))));
            Assert.Equal(b.GetType(), a.GetType());
            Assert.Equal(b.Message, a.Message);
        }
        if (!name.StartsWith("sigmoid_norm") && !name.StartsWith("ipo_mean")) return;
        // the per-token losses: counts missing, zero, NaN or infinite
        var (pc, pr) = (tensor(new[] { -1.0, -2.0, -1.0 }), tensor(new[] { -1.5, -1.0, -3.0 }));
        foreach (var (nw, nl) in new (Tensor?, Tensor?)[]
        {
            (null, null), (good, null), (tensor(new[] { 3.0, 0, 7 }), good), (good, tensor(new[] { 3.0, double.NaN, 7 })),
            (good, tensor(new[] { double.PositiveInfinity, 2, 7 })), (tensor(new long[] { 3, -1, 7 }), good),
        })
        {
            var a = Assert.ThrowsAny<Exception>(() => Make(name, true).Compute(new PreferenceBatch(new PreferenceLogps(pc, pr, nw, nl))));
            var b = Assert.ThrowsAny<Exception>(() => Make(name, false).Compute(new PreferenceBatch(new PreferenceLogps(pc, pr, nw, nl))));
            Assert.Equal(b.GetType(), a.GetType());
            Assert.Equal(b.Message, a.Message);
        }
    }

    [Theory, MemberData(nameof(Losses))]
    public void The_fused_pass_is_taken_and_creates_far_fewer_tensors(string name)
    {
        long Created(bool fused)
        {
            using var scope = NewDisposeScope();
            var c = (-rand(64) - 1).requires_grad_(true);
            var r = (-rand(64) - 1).requires_grad_(true);
            var (pc, pr) = (-rand(64) - 1, -rand(64) - 1);
            var n = randint(1, 300, new long[] { 64 });
            var batch = new PreferenceBatch(new PreferenceLogps(c, r, n, n), new PreferenceLogps(pc, pr));
            var stats = DisposeScopeManager.Statistics;
            long before = stats.CreatedInScopeCount;
            using (var result = Make(name, fused).Compute(batch)) { }
            return stats.CreatedInScopeCount - before;
        }
        long fusedCount = Created(true), plainCount = Created(false);
        Assert.True(fusedCount * 2 <= plainCount, $"{name}: fused {fusedCount} tensors, op by op {plainCount}");
    }

    [Fact]
    public void Evaluation_calls_views_and_one_sided_gradients_work()
    {
        using var scope = NewDisposeScope();
        var wide = -rand(8, 3, dtype: ScalarType.Float64) - 0.5;
        var (c, r) = (wide[.., 0], wide[.., 2]);                           // strided views
        using (var eval = DpoLoss.Compute(new PreferenceLogps(c, r)))
        using (var plain = DpoLoss.Compute(new PreferenceLogps(c, r), options: new DpoOptions { FusedCpu = false }))
        {
            Assert.False(eval.RequiresGrad);
            Assert.Equal(plain.Loss.ToDouble(), eval.Loss.ToDouble(), 12);
        }
        var leaf = c.clone().requires_grad_(true);
        using var one = DpoLoss.Compute(new PreferenceLogps(leaf, r));
        one.Backward();
        var expected = -0.1 * torch.sigmoid(-0.1 * (leaf.detach() - r)) / 8;
        Assert.True((leaf.grad! - expected).abs().max().ToDouble() < 1e-15);
    }

    sealed record MyOptions : PreferenceLossOptions;

    /// <summary>A user's loss with a link: softplus(-h)^2 / 2, written both ways.</summary>
    sealed class SquaredLogistic(MyOptions options) : PreferenceLoss<MyOptions>(options)
    {
        public override string Name => "squared_logistic";
        protected override double RewardScale => 1;
        protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch) =>
            new(PreferenceMath.NegLogSigmoid(terms.Margin).square() / 2);
        protected override MarginLink? Link => MarginLink.FromFunction(h =>
        {
            double s = MarginLink.Softplus(-h);
            return (s * s / 2, -s * MarginLink.Sigmoid(-h));
        });
    }

    [Fact]
    public void A_users_loss_with_a_link_takes_the_fused_pass_and_matches_its_formula()
    {
        using var scope = NewDisposeScope();
        var (c, r) = (-rand(20, dtype: ScalarType.Float64) * 5, -rand(20, dtype: ScalarType.Float64) * 5);
        var fused = Run(new SquaredLogistic(new MyOptions()), c, r, null, null);
        var plain = Run(new SquaredLogistic(new MyOptions { FusedCpu = false }), c, r, null, null);
        Assert.True((fused.GradChosen - plain.GradChosen).abs().max().ToDouble() < 1e-15);
        Assert.Equal(plain.Loss.ToDouble(), fused.Loss.ToDouble(), 14);
    }

    /// <summary>A user's loss with a pair link: softplus(-s_w) + s_l^2 / 2, written both ways, on Jensen-Shannon scores.</summary>
    sealed class LogisticSquare(MyOptions options) : PreferenceLoss<MyOptions>(options)
    {
        public override string Name => "logistic_square";
        protected override double RewardScale => 1;
        protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
        {
            var (sw, sl) = terms.Scores(ScoreMap.JensenShannon);
            return new(PreferenceMath.Softplus(-sw) + sl.square() / 2);
        }
        protected override PairLink? Link => PairLink.FromFunction((w, l) =>
            (MarginLink.Softplus(-w) + l * l / 2, -MarginLink.Sigmoid(-w), l)).OnScores(ScoreMap.JensenShannon);
    }

    [Fact]
    public void A_users_loss_with_a_pair_link_on_scores_takes_the_fused_pass_and_matches_its_formula()
    {
        using var scope = NewDisposeScope();
        var (c, r) = (-rand(20, dtype: ScalarType.Float64) * 5, -rand(20, dtype: ScalarType.Float64) * 5);
        var (rc, rr) = (-rand(20, dtype: ScalarType.Float64) * 5, -rand(20, dtype: ScalarType.Float64) * 5);
        var fused = Run(new LogisticSquare(new MyOptions()), c, r, rc, rr);
        var plain = Run(new LogisticSquare(new MyOptions { FusedCpu = false }), c, r, rc, rr);
        Assert.True((fused.GradChosen - plain.GradChosen).abs().max().ToDouble() < 1e-14);
        Assert.True((fused.GradRejected - plain.GradRejected).abs().max().ToDouble() < 1e-14);
        Assert.True((fused.PerExample - plain.PerExample).abs().max().ToDouble() < 1e-14);
        // and the gradient is the formula's: d/dx_l of s_l^2 / 2 with s_l = log sigmoid(u_l) is s_l sigmoid(-u_l) / B
        var ul = r - rr;
        var expected = torch.nn.functional.logsigmoid(ul) * torch.sigmoid(-ul) / 20;
        Assert.True((fused.GradRejected - expected).abs().max().ToDouble() < 1e-14);
    }

    [Fact]
    public void OnScores_of_reverse_kl_is_the_link_itself_and_does_not_nest()
    {
        var link = PairLink.FromFunction((w, l) => (w - l, 1, -1));
        Assert.Same(link, link.OnScores(ScoreMap.ReverseKl));
        Assert.Throws<ArgumentNullException>(() => link.OnScores(null!));
        Assert.Throws<ArgumentNullException>(() => PairLink.FromFunction(null!));
        // phi of phi is not meant: a second map replaces the first
        using var scope = NewDisposeScope();
        var twice = link.OnScores(ScoreMap.ForwardKl).OnScores(ScoreMap.JensenShannon);
        var once = link.OnScores(ScoreMap.JensenShannon);
        double[] w = { -0.3, 2 }, l = { 1, -4 };
        double[] a = new double[2], ga = new double[2], gb = new double[2], b = new double[2], ha = new double[2], hb = new double[2];
        twice.Evaluate(w, l, a, ga, gb);
        once.Evaluate(w, l, b, ha, hb);
        Assert.Equal(b, a);
        Assert.Equal(ha, ga);
        // a per-token link needs the batch's counts: evaluated alone it says so
        var perToken = link.OnScores(ScoreMap.ReverseKl, perTokenMeans: true);
        Assert.NotSame(link, perToken);
        var error = Assert.Throws<InvalidOperationException>(() => perToken.Evaluate(w, l, a, ga, gb));
        Assert.Contains("token counts", error.Message);
        Assert.Same(link, perToken.OnScores(ScoreMap.ReverseKl));          // and a second call replaces the averaging too
    }

    [Fact]
    public void The_fused_pass_leaks_nothing_with_or_without_a_scope() =>
        NoScopeMemoryTests.AssertFlat("fused DPO", () =>
        {
            var c = (-rand(32) - 1).requires_grad_(true);
            var r = (-rand(32) - 1).requires_grad_(true);
            var batch = new PreferenceBatch(new PreferenceLogps(c, r), new PreferenceLogps(-rand(32) - 1, -rand(32) - 1));
            var loss = new DpoLoss();
            return () =>
            {
                using (var result = loss.Compute(batch)) result.Backward();
                c.grad = null;
                r.grad = null;
            };
        }, iterations: 300);
}

/// <summary>The fused passes' lane functions against the BCL's scalar ones, over the whole double range that reaches them.</summary>
public class LaneFunctionTests
{
    static IEnumerable<double> Points()
    {
        var rng = new Random(5);
        foreach (double x in new[] { 0.0, -0.0, 1e-300, -1e-300, 1e-17, -1e-17, 1e-8, 0.5, -0.5, 1, -1, 36.7, -36.7, 708, -708, 745, -745, 800, -800, 1e6, -1e6 })
            yield return x;
        for (int i = 0; i < 4000; i++) yield return (rng.NextDouble() * 2 - 1) * Math.Pow(10, rng.NextDouble() * 6 - 4);
    }

    static double Rel(double a, double b) => a == b ? 0 : Math.Abs(a - b) / Math.Max(Math.Abs(b), 1e-300);

    [Fact]
    public void Log1p_of_a_unit_value_is_within_a_few_ulp_of_the_exact_one()
    {
        var rng = new Random(3);
        var es = new[] { 0.0, 1e-300, 5e-324, 1e-17, 1e-9, 0.25, 0.5, 1.0 }.Concat(Enumerable.Range(0, 4000).Select(_ => Math.Pow(rng.NextDouble(), 8))).ToArray();
        foreach (var e in es)
        {
            double got = Alignment.Losses.Internal.Lane.Log1pUnit(System.Runtime.Intrinsics.Vector256.Create(e))[2];
            double want = Log1pReference(e);
            Assert.True(Math.Abs(got - want) <= 4 * Math.BitIncrement(want) - 4 * want || want == 0 && got == 0, $"log1p({e:R}) = {got:R}, want {want:R}: more than 4 ulp");
        }
    }

    /// <summary>
    /// log(1 + e) to within half an ulp and a little: in decimal, whose fixed 28 places hold 24+ significant digits from
    /// e = 1e-4 up; below, e times 1 - e/2 + e^2/3 - ... (that factor in decimal), rounded once.
    /// </summary>
    static double Log1pReference(double e)
    {
        var inv = System.Globalization.CultureInfo.InvariantCulture;
        if (e == 0) return 0;
        decimal d = e < 1e-28 ? 0 : decimal.Parse(e.ToString("G17", inv), System.Globalization.NumberStyles.Float, inv);   // (decimal)e keeps 15 digits only
        if (e >= 1e-4) return (double)Log1pDecimal(d);
        decimal factor = 0, power = 1;
        for (int j = 0; j < 8; j++, power *= -d) factor += power / (j + 1);
        return e * (double)factor;
    }

    /// <summary>log(1 + e) to 28 places: 2 atanh(e / (2 + e)) summed in decimal.</summary>
    static decimal Log1pDecimal(decimal e)
    {
        decimal s = e / (2 + e), w = s * s, term = s, sum = 0;
        for (int k = 0; term > 1e-29m; k++, term *= w) sum += term / (2 * k + 1);
        return 2 * sum;
    }

    [Fact]
    public void The_logistic_lanes_equal_the_scalar_softplus_and_sigmoid()
    {
        foreach (var x in Points())
        {
            var g = Alignment.Losses.Internal.Lane.Logistic(System.Runtime.Intrinsics.Vector256.Create(x));
            double sp = MarginLink.Softplus(x), spn = MarginLink.Softplus(-x), s = MarginLink.Sigmoid(x), sn = MarginLink.Sigmoid(-x);
            Assert.True(Rel(g.Softplus[1], sp) <= 1e-15, $"softplus({x:R}): {g.Softplus[1]:R} vs {sp:R}");
            Assert.True(Rel(g.SoftplusOfNegative[3], spn) <= 1e-15, $"softplus(-{x:R})");
            Assert.True(Rel(g.Sigmoid[0], s) <= 1e-15, $"sigmoid({x:R}): {g.Sigmoid[0]:R} vs {s:R}");
            Assert.True(Rel(g.SigmoidOfNegative[0], sn) <= 1e-15, $"sigmoid(-{x:R})");
            Assert.True(Rel(g.SigmoidSlope[0], s * sn) <= 1e-15 || s * sn < 1e-300, $"sigmoid'({x:R}): {g.SigmoidSlope[0]:R} vs {s * sn:R}");
        }
    }
}

/// <summary>The host's unpaired accuracy count: the radix sort against Array.Sort, the merge count against all pairs.</summary>
public class PairCountTests
{
    [Theory]
    [InlineData(1)]
    [InlineData(511)]
    [InlineData(512)]
    [InlineData(4096)]
    [InlineData(20000)]
    public void The_sort_and_the_count_equal_the_plain_ones(int n)
    {
        var rng = new Random(n);
        double Draw() => rng.Next(6) switch
        {
            0 => 0.0, 1 => -0.0, 2 => Math.Round(rng.NextDouble() * 10 - 5),              // ties, signed zeros
            3 => -Math.Pow(10, rng.NextDouble() * 600 - 300),                             // every exponent, both signs
            4 => Math.Pow(10, rng.NextDouble() * 600 - 300),
            _ => rng.NextDouble() * 400 - 200,
        };
        double[] c = Enumerable.Range(0, n).Select(_ => Draw()).ToArray(), r = Enumerable.Range(0, n / 2 + 1).Select(_ => Draw()).ToArray();
        var sorted = new double[n];
        Alignment.Losses.Internal.PairCount.Sort(c, sorted);
        var expected = (double[])c.Clone();
        Array.Sort(expected);
        for (int i = 0; i < n; i++) Assert.True(sorted[i] == expected[i], $"position {i}: {sorted[i]:R} vs {expected[i]:R}");
        if (n > 4096) return;                                                             // the brute force below is n^2
        double pairs = c.Sum(w => (double)r.Count(l => w > l));
        Assert.Equal(pairs, Alignment.Losses.Internal.PairCount.Above(c, r));
    }
}
