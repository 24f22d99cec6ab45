using Alignment.Losses;
using TorchSharp.Modules;

namespace Alignment.Losses.Tests;

/// <summary>
/// The papers' theorems as tests: a tabular softmax policy over K responses, trained with the library's losses by
/// Adam on an exact Bradley-Terry population (every ordered pair (i, j) weighted by P(i beats j) = sigmoid(r_i - r_j)),
/// converges to the optimum each paper proves. Tolerances are tight enough that beta vs 1/beta, a missing 1/2 or a
/// sign error fails.
/// </summary>
public class ConvergenceTests
{
    static readonly double[] R = { 1, 0.3, -0.5 };

    /// <summary>All ordered pairs (i, j), i != j, with their Bradley-Terry weights (normalised to sum to 1).</summary>
    static (long[] I, long[] J, double[] W) Population(double[] r, Func<int, int, double>? prob = null)
    {
        prob ??= (i, j) => Oracle.Sigmoid(r[i] - r[j]);
        var pairs = (from i in Enumerable.Range(0, r.Length) from j in Enumerable.Range(0, r.Length) where i != j select (i, j)).ToArray();
        var w = pairs.Select(p => prob(p.i, p.j)).ToArray();
        double s = w.Sum();
        return (pairs.Select(p => (long)p.i).ToArray(), pairs.Select(p => (long)p.j).ToArray(), w.Select(v => v / s).ToArray());
    }

    /// <summary>Minimises objective(log pi) over the logits of a K-way softmax with Adam; returns pi.</summary>
    internal static double[] Train(int k, Func<Tensor, Tensor> objective, int steps = 1500, double lr = 0.05, double[]? initialLogits = null)
    {
        using var scope = NewDisposeScope();
        var theta = new Parameter(initialLogits is null ? zeros(k, dtype: ScalarType.Float64) : tensor(initialLogits, dtype: ScalarType.Float64), requires_grad: true);
        var opt = optim.Adam(new[] { theta }, lr);
        for (int s = 0; s < steps; s++)
        {
            using var step = NewDisposeScope();
            opt.zero_grad();
            objective(nn.functional.log_softmax(theta, 0)).backward();
            opt.step();
        }
        return TensorUtil.Values(nn.functional.softmax(theta.detach(), 0));
    }

    static Tensor Weighted(PreferenceLossResult r, double[] w)
    {
        var loss = (r.PerExample * tensor(w, dtype: ScalarType.Float64)).sum();
        r.Dispose();
        return loss;
    }

    static void AssertDistribution(double[] expected, double[] actual, double tol)
    {
        for (int i = 0; i < expected.Length; i++)
            Assert.True(Math.Abs(expected[i] - actual[i]) <= tol, $"pi[{i}] = {actual[i]:F5}, expected {expected[i]:F5} (all: {string.Join(", ", actual.Select(a => a.ToString("F4")))})");
    }

    static readonly double[] DpoOptimum = Softmax(R.Select(r => Math.Log(1.0 / 3) + r / 0.5).ToArray());

    static double[] Softmax(double[] z) { double m = z.Max(); var e = z.Select(v => Math.Exp(v - m)).ToArray(); return e.Select(v => v / e.Sum()).ToArray(); }

    [Fact]
    public void Dpo_converges_to_reference_times_exp_reward_over_beta()
    {
        var (i, j, w) = Population(R);
        var refLogp = TensorUtil.Const(Enumerable.Repeat(Math.Log(1.0 / 3), 3).ToArray(), ScalarType.Float64);
        var pi = Train(3, logp => Weighted(DpoLoss.Compute(
            new PreferenceLogps(logp[tensor(i)], logp[tensor(j)]), new PreferenceLogps(refLogp[tensor(i)], refLogp[tensor(j)]), new DpoOptions { Beta = 0.5 }), w));
        // softmax(log(1/3) + r / beta) = softmax(2, 0.6, -1) = (0.7714, 0.1902, 0.0384). An example figure in circulation
        // (0.8042, 0.1469, 0.0489) does not satisfy its own formula (its log-ratios are 1.70 and 1.10, not r/beta's 1.4 and
        // 1.6), so the test asserts the theorem, computed independently here.
        AssertDistribution(DpoOptimum, pi, 1e-3);
        AssertDistribution(new[] { 0.7714, 0.1902, 0.0384 }, pi, 1e-3);
    }

    [Fact]
    public void Robust_dpo_with_noisy_labels_converges_to_the_clean_dpo_optimum()
    {
        const double eps = 0.2, beta = 0.5;
        // labels flipped with probability eps: P_noisy(i beats j) = (1-eps) P(i beats j) + eps P(j beats i)
        var (i, j, w) = Population(R, (a, b) => (1 - eps) * Oracle.Sigmoid(R[a] - R[b]) + eps * Oracle.Sigmoid(R[b] - R[a]));
        var pi = Train(3, logp => Weighted(RobustDpoLoss.Compute(new PreferenceLogps(logp[tensor(i)], logp[tensor(j)]), null,
            new RobustDpoOptions { Beta = beta, LabelSmoothing = eps }), w), steps: 2500);
        AssertDistribution(DpoOptimum, pi, 2e-3);
    }

    [Fact]
    public void Spo_preference_term_converges_to_softmax_of_reward_over_alpha()
    {
        var (i, j, w) = Population(R);
        var pi = Train(3, logp => Weighted(SpoLoss.Compute(new PreferenceLogps(logp[tensor(i)], logp[tensor(j)]), null,
            new SpoOptions { Alpha = 0.7, KlWeight = 0 }), w));
        AssertDistribution(new[] { 0.6733, 0.2477, 0.0790 }, pi, 1e-3);
    }

    [Fact]
    public void Ipo_converges_to_the_optimum_of_its_paper()
    {
        // Azar et al. (Prop. / Eq. 17): with pairs drawn from a behaviour policy mu (here: all ordered pairs, uniform) the IPO
        // optimum satisfies log(pi(y)/pi(y')) - log(pi_ref(y)/pi_ref(y')) = (P(y beats mu) - P(y' beats mu)) / tau, where
        // P(y beats mu) is y's mean win probability against mu (itself included, at 1/2). With a uniform reference:
        // pi* = softmax(P / beta). r = (1, 0.3, -0.5), beta = 0.5 gives about (0.4445, 0.3262, 0.2293).
        const double beta = 0.5;
        var (i, j, w) = Population(R);
        var win = R.Select(a => R.Average(b => Oracle.Sigmoid(a - b))).ToArray();
        var expected = Softmax(win.Select(p => p / beta).ToArray());
        var pi = Train(3, logp => Weighted(IpoLoss.Compute(new PreferenceLogps(logp[tensor(i)], logp[tensor(j)]), null,
            new IpoOptions { Beta = beta }), w), steps: 3000);
        AssertDistribution(expected, pi, 1e-3);
        AssertDistribution(new[] { 0.4445, 0.3262, 0.2293 }, pi, 2e-3);
    }

    [Fact]
    public void Hinge_stops_exactly_at_its_margin_on_separable_preferences()
    {
        // SLiC / RSO's calibration loss: with the pair always preferred one way, training moves beta * h up to 1 and then
        // the gradient is exactly zero, so the margin stays at 1 / beta (within the last step) instead of growing as DPO's does.
        using var scope = NewDisposeScope();
        const double beta = 0.5;
        var h = new Parameter(zeros(1, dtype: ScalarType.Float64), requires_grad: true);
        var opt = optim.SGD(new[] { h }, 0.01);
        var rejected = full(1, -10.0, dtype: ScalarType.Float64);       // log-probs (at most 0): chosen h - 10, rejected -10
        int stoppedAt = -1;
        for (int s = 0; s < 2000; s++)
        {
            using var step = NewDisposeScope();
            opt.zero_grad();
            using var r = HingeLoss.Compute(new PreferenceLogps(h - 10, rejected), null, new HingeOptions { Beta = beta });
            r.Loss.backward();
            if (h.grad!.ToDouble() == 0 && stoppedAt < 0) stoppedAt = s;
            opt.step();
        }
        Assert.True(stoppedAt > 0, "the gradient never became exactly zero");
        Assert.InRange(beta * h.ToDouble(), 1.0, 1.0 + beta * 0.01 * beta + 1e-12);   // one SGD step of size lr * beta past the margin at most
    }

    [Fact]
    public void Cdpo_converges_to_its_stationary_margin()
    {
        using var scope = NewDisposeScope();
        var h = new Parameter(zeros(1, dtype: ScalarType.Float64), requires_grad: true);
        var opt = optim.Adam(new[] { h }, 0.05);
        var rejected = full(1, -10.0, dtype: ScalarType.Float64);       // log-probs (at most 0): chosen h - 10, rejected -10
        for (int s = 0; s < 2000; s++)
        {
            using var step = NewDisposeScope();
            opt.zero_grad();
            using var r = ConservativeDpoLoss.Compute(new PreferenceLogps(h - 10, rejected), null, new ConservativeDpoOptions { Beta = 0.5, LabelSmoothing = 0.2 });
            r.Loss.backward();
            opt.step();
        }
        Assert.Equal(Math.Log(0.8 / 0.2) / 0.5, h.ToDouble(), 3);   // 2.7726
    }

    [Fact]
    public void Odpo_converges_to_the_offset_shifted_stationary_point()
    {
        // One pair of responses, labelled (0 beats 1) with probability p and (1 beats 0) otherwise, both with score gap g.
        // DPO's optimum: beta h = logit(p). ODPO's: the root of p sigmoid(D - x) = (1 - p) sigmoid(D + x), x = beta h, D = alpha ln g,
        // found here by bisection in float64 (an independent computation).
        const double p = 0.8, beta = 0.5, alpha = 1.0, gap = 2.0;
        double delta = alpha * Math.Log(gap);
        Func<double, double> f = x => -p * Oracle.Sigmoid(delta - x) + (1 - p) * Oracle.Sigmoid(delta + x);
        double lo = -20, hi = 20;
        for (int it = 0; it < 200; it++) { double mid = (lo + hi) / 2; if (f(mid) > 0) hi = mid; else lo = mid; }
        double expectedX = (lo + hi) / 2;

        var scores = new ResponseScores(tensor(new[] { gap + 1, gap + 1 }, dtype: ScalarType.Float64), tensor(new[] { 1.0, 1.0 }, dtype: ScalarType.Float64));
        var pi = Train(2, logp => Weighted(OdpoLoss.Compute(
            new PreferenceLogps(logp[tensor(new long[] { 0, 1 })], logp[tensor(new long[] { 1, 0 })]), null, scores,
            new OdpoOptions { Beta = beta, Alpha = alpha }), new[] { p, 1 - p }), steps: 3000);
        double x = beta * (Math.Log(pi[0]) - Math.Log(pi[1]));
        Assert.Equal(expectedX, x, 3);
        Assert.True(x > Math.Log(p / (1 - p)) + 0.1, $"the offset must widen the margin beyond DPO's logit(p): x = {x}");
    }

    [Fact]
    public void Rpo_with_distinct_prompts_and_small_tau_converges_to_the_dpo_optimum()
    {
        var (i, j, w) = Population(R);
        var embeddings = eye(i.Length, dtype: ScalarType.Float64);   // every pair has its own, orthogonal prompt
        var pi = Train(3, logp => Weighted(RpoLoss.Compute(new PreferenceLogps(logp[tensor(i)], logp[tensor(j)]), null, embeddings,
            new RpoOptions { Beta = 0.5, Temperature = 1e-3 }), w), steps: 3000, lr: 0.05);
        AssertDistribution(DpoOptimum, pi, 2e-3);
    }

    [Fact]
    public void Rpo_with_one_shared_prompt_converges_to_a_sharper_policy_than_dpo()
    {
        // All pairs share one prompt: W = 1/N and each chosen is contrasted with every rejected of the batch. The
        // stationary point is no longer DPO's; docs/testing.md records the measured optimum. Here: it still ranks the
        // responses by reward, and it is sharper than DPO's because of the cross-pair contrasts.
        var (i, j, w) = Population(R);
        var embeddings = ones(i.Length, 4, dtype: ScalarType.Float64);
        var pi = Train(3, logp => Weighted(RpoLoss.Compute(new PreferenceLogps(logp[tensor(i)], logp[tensor(j)]), null, embeddings,
            new RpoOptions { Beta = 0.5, Temperature = 0.5 }), w), steps: 3000);
        Assert.True(pi[0] > pi[1] && pi[1] > pi[2], string.Join(", ", pi));
        Assert.True(pi[0] > DpoOptimum[0] + 0.1, $"expected a sharper policy than DPO's {DpoOptimum[0]:F4}: {string.Join(", ", pi)}");   // measured: 0.9889
    }

    [Fact]
    public void Sppo_self_play_concentrates_on_the_best_response_under_bradley_terry()
    {
        var pi = SelfPlay((a, b) => Oracle.Sigmoid(R[a] - R[b]), rounds: 12, eta: 2.0, new[] { 1.0, 1, 1 }.Select(v => v / 3).ToArray(), out _);
        Assert.True(pi[0] > 0.9, $"pi = {string.Join(", ", pi)}");
    }

    [Fact]
    public void Sppo_self_play_tracks_hedge_and_its_time_average_approaches_uniform_on_rock_paper_scissors()
    {
        // rock beats scissors, scissors beat paper, paper beats rock; the Nash equilibrium is uniform
        double Beats(int a, int b) => a == b ? 0.5 : ((a - b + 3) % 3 == 2 ? 1.0 : 0.0);
        var start = new[] { 0.6, 0.3, 0.1 };
        const int rounds = 30;
        const double eta = 1.0;
        SelfPlay(Beats, rounds, eta, start, out var average);

        // the exact multiplicative-weights (Hedge) update SPPO approximates (its squared loss ignores the normaliser, so the
        // two drift apart slowly over rounds; one round is compared tightly below): pi_{t+1} ∝ pi_t exp(eta (P(y beats pi_t) - 1/2))
        var pi = start; var hedge = new double[3];
        for (int t = 0; t < rounds; t++)
        {
            var cur = pi;
            var q = Enumerable.Range(0, 3).Select(y => cur[y] * Math.Exp(eta * (Enumerable.Range(0, 3).Sum(z => cur[z] * Beats(y, z)) - 0.5))).ToArray();
            pi = q.Select(v => v / q.Sum()).ToArray();
            for (int y = 0; y < 3; y++) hedge[y] += pi[y] / rounds;
        }
        for (int k = 0; k < 3; k++)
        {
            Assert.True(Math.Abs(average[k] - hedge[k]) < 0.04, $"SPPO time average {string.Join(", ", average)} vs Hedge {string.Join(", ", hedge)}");
            Assert.True(Math.Abs(average[k] - 1.0 / 3) < 0.06, $"time average = {string.Join(", ", average)}");
        }
        Assert.True(Math.Abs(start[0] - 1.0 / 3) > 0.25);   // while the start is far from the equilibrium
    }

    [Theory]
    [InlineData(0.5)]
    [InlineData(2.0)]
    public void One_sppo_round_approximates_one_hedge_step(double eta)
    {
        double Beats(int a, int b) => a == b ? 0.5 : ((a - b + 3) % 3 == 2 ? 1.0 : 0.0);
        var start = new[] { 0.6, 0.3, 0.1 };
        var pi = SelfPlay(Beats, rounds: 1, eta, start, out _);
        var q = Enumerable.Range(0, 3).Select(y => start[y] * Math.Exp(eta * (Enumerable.Range(0, 3).Sum(z => start[z] * Beats(y, z)) - 0.5))).ToArray();
        var hedge = q.Select(v => v / q.Sum()).ToArray();
        AssertDistribution(hedge, pi, 0.02);
    }

    /// <summary>
    /// SPPO's outer loop: each round the reference is the current policy, win-rates P(y beats pi_t) are exact, and the
    /// policy is regressed onto the targets with the SPPO loss over all ordered pairs.
    /// </summary>
    static double[] SelfPlay(Func<int, int, double> beats, int rounds, double eta, double[] start, out double[] timeAverage)
    {
        int k = start.Length;
        var pi = start;
        var sum = new double[k];
        var pairs = (from a in Enumerable.Range(0, k) from b in Enumerable.Range(0, k) where a != b select (a, b)).ToArray();
        var i = pairs.Select(p => (long)p.a).ToArray();
        var j = pairs.Select(p => (long)p.b).ToArray();
        for (int round = 0; round < rounds; round++)
        {
            var current = pi;
            var win = Enumerable.Range(0, k).Select(y => Enumerable.Range(0, k).Sum(z => current[z] * beats(y, z))).ToArray();
            var refLogp = TensorUtil.Const(current.Select(v => Math.Log(v)).ToArray(), ScalarType.Float64);
            var pw = TensorUtil.Const(i.Select(a => win[a]).ToArray(), ScalarType.Float64);
            var pl = TensorUtil.Const(j.Select(b => win[b]).ToArray(), ScalarType.Float64);
            pi = Train(k, logp => SppoLoss.Compute(new PreferenceLogps(logp[tensor(i)], logp[tensor(j)]),
                new PreferenceLogps(refLogp[tensor(i)], refLogp[tensor(j)]), SppoWinRates.Individual(pw, pl),
                new SppoOptions { Beta = 1 / eta }).Loss, steps: 300, lr: 0.05, initialLogits: current.Select(v => Math.Log(v)).ToArray());
            for (int y = 0; y < k; y++) sum[y] += pi[y];
        }
        timeAverage = sum.Select(s => s / rounds).ToArray();
        return pi;
    }
}
