using Alignment.Losses;
using FsCheck;
using FsCheck.Fluent;

namespace Alignment.Losses.Tests;

/// <summary>
/// The standard metrics against a plain float64 computation for every loss (paired and unpaired), and the deferred value
/// checks: they are read back in the call's single synchronisation, run whether or not <c>CheckFinite</c> is on, and
/// take precedence over the non-finite result an invalid input causes.
/// </summary>
public class MetricsAndChecksTests
{
    public static IEnumerable<object[]> Names => LossCatalog.Names;

    static double Mean(double[] v) => v.Average();

    [Theory, MemberData(nameof(Names))]
    public void Standard_metrics_equal_a_float64_computation(string loss)
    {
        var c = LossCatalog.Get(loss);
        var prop = Prop.ForAll(Generators.Arb(minB: 2, maxB: 12), x =>
        {
            using var scope = NewDisposeScope();
            var batch = c.Batch(new BatchTensors(x, ScalarType.Float64));
            using var r = c.Make(x).Compute(batch);
            double[] pc = TensorUtil.Values(batch.Policy.Chosen), pr = TensorUtil.Values(batch.Policy.Rejected);
            if (!c.StandardMetrics)
            {
                AssertRewardModelMetrics(loss, r, pc, pr);
                return;
            }
            double[] uw = pc, ul = pr;
            if (batch.Reference is { } reference)
            {
                var rc = TensorUtil.Values(reference.Chosen);
                var rr = TensorUtil.Values(reference.Rejected);
                uw = pc.Select((v, i) => v - rc[i]).ToArray();
                ul = pr.Select((v, i) => v - rr[i]).ToArray();
            }
            double scale = loss switch { "spo" => x.Alpha, _ => x.Beta };
            if (c.Rewards is { } own) { (uw, ul) = own(x); scale = 1; }   // already scaled
            double accuracy = batch.Policy.IsPaired
                ? uw.Zip(ul).Count(p => p.First > p.Second) / (double)uw.Length
                : uw.Sum(w => ul.Count(l => w > l)) / (double)(uw.Length * ul.Length);
            if (c.Logps is { } logps) (pc, pr) = logps(x);
            var expected = new Dictionary<string, double>
            {
                [MetricNames.RewardsChosen] = scale * Mean(uw),
                [MetricNames.RewardsRejected] = scale * Mean(ul),
                [MetricNames.RewardsMargins] = scale * (Mean(uw) - Mean(ul)),
                [MetricNames.RewardsAccuracies] = accuracy,
                [MetricNames.LogpsChosen] = Mean(pc),
                [MetricNames.LogpsRejected] = Mean(pr),
            };
            foreach (var (name, want) in expected)
                Assert.True(Math.Abs(r[name] - want) <= 1e-10 * Math.Max(1, Math.Abs(want)), $"{loss} {name} = {r[name]:R}, expected {want:R}\n{x}");
            Assert.Equal(r.MetricNames.Count, r.Metrics.Count);
            Assert.Equal(expected.Keys, r.MetricNames.Take(6));
        });
        Check.One(PropertyConfig.Quick(15), prop);
    }

    /// <summary>The reward model's own metrics (TRL's RewardTrainer): accuracy, margin, and mean/min/max over all 2B rewards.</summary>
    static void AssertRewardModelMetrics(string loss, PreferenceLossResult r, double[] rw, double[] rl)
    {
        var all = rw.Concat(rl).ToArray();
        var expected = new Dictionary<string, double>
        {
            [MetricNames.Accuracy] = rw.Zip(rl).Count(p => p.First > p.Second) / (double)rw.Length,
            [MetricNames.Margin] = rw.Zip(rl).Average(p => p.First - p.Second),
            [MetricNames.MeanReward] = all.Average(),
            [MetricNames.MinReward] = all.Min(),
            [MetricNames.MaxReward] = all.Max(),
        };
        foreach (var (name, want) in expected)
            Assert.True(Math.Abs(r[name] - want) <= 1e-10 * Math.Max(1, Math.Abs(want)), $"{loss} {name} = {r[name]:R}, expected {want:R}");
        Assert.DoesNotContain(MetricNames.RewardsChosen, r.MetricNames);
    }

    [Fact]
    public void Accuracy_counts_ties_as_not_won()
    {
        var policy = new PreferenceLogps(tensor(new[] { -1.0, -2.0, -3.0, -4.0 }), tensor(new[] { -1.0, -3.0, -3.0, -1.0 }));
        using var r = DpoLoss.Compute(policy);
        Assert.Equal(0.25, r[MetricNames.RewardsAccuracies]);   // one win (row 1), two ties, one loss
    }

    [Fact]
    public void Unpaired_accuracy_counts_every_chosen_rejected_pair_and_ties_as_not_won()
    {
        static PreferenceLogps Zeros(long d, long u) => PreferenceLogps.Unpaired(zeros(d, dtype: ScalarType.Float64), zeros(u, dtype: ScalarType.Float64));
        var policy = PreferenceLogps.Unpaired(tensor(new[] { -1.0, -2.0, -2.0 }), tensor(new[] { -2.0, -3.0 }));
        using var r = new ApoZeroUnpairedLoss().Compute(new PreferenceBatch(policy, Zeros(3, 2)));
        Assert.Equal(4.0 / 6, r[MetricNames.RewardsAccuracies], 12);   // -1 beats both; each -2 ties -2 and beats -3
        var oneSided = PreferenceLogps.Unpaired(tensor(new[] { -1.0 }), zeros(0, dtype: ScalarType.Float64));
        using var e = new ApoZeroUnpairedLoss().Compute(new PreferenceBatch(oneSided, Zeros(1, 0)));
        Assert.Equal(0.0, e[MetricNames.RewardsAccuracies]);              // no pair to count: 0, not NaN
    }

    static Tensor F(params float[] v) => tensor(v);
    static PreferenceLogps Ok() => new(F(-10, -12, -9), F(-11, -13, -10));

    public static IEnumerable<object[]> ValueChecks()
    {
        yield return Case("sppo win-rate > 1", o => new SppoLoss(new SppoOptions { CheckFinite = o }).Compute(
            new PreferenceBatch(Ok(), Ok()) { WinRates = SppoWinRates.Individual(F(0.5f, 1.5f, 0.3f), F(0.1f, 0.2f, 0.3f)) }), "winRates.Chosen");
        yield return Case("odpo zero gap", o => new OdpoLoss(new OdpoOptions { CheckFinite = o }).Compute(
            new PreferenceBatch(Ok(), Ok()) { Scores = new ResponseScores(F(1, 2, 3), F(0, 2, 1)) }), "scores");
        yield return Case("ipo per-token zero count", o => new IpoLoss(new IpoOptions { CheckFinite = o, LogRatio = IpoLogRatio.PerTokenMean }).Compute(
            new PreferenceBatch(new PreferenceLogps(F(-10, -12, -9), F(-11, -13, -10), F(3, 0, 2), F(2, 2, 2)), Ok())), "policy");
        yield return Case("rpo negative weight", o => new RpoLoss(new RpoOptions { CheckFinite = o }).Compute(
            new PreferenceBatch(Ok(), Ok()) { RpoWeights = ones(3, 3) - 2 * eye(3) }), "batch.RpoWeights");
        yield return Case("rpo zero-norm embedding", o => new RpoLoss(new RpoOptions { CheckFinite = o }).Compute(
            new PreferenceBatch(Ok(), Ok()) { PromptEmbeddings = PromptEmbeddings.Paired(tensor(new float[,] { { 1, 0 }, { 0, 0 }, { 0, 1 } })) }), "chosen embeddings");
        yield return Case("spo negative example weight", o => new SpoLoss(new SpoOptions { CheckFinite = o, KlWeight = 0 }).Compute(
            new PreferenceBatch(Ok()) { ExampleWeights = F(1, -1, 1) }), "batch.ExampleWeights");

        static object[] Case(string name, Action<bool> act, string param) => new object[] { name, act, param };
    }

    /// <summary>
    /// The value checks are not optional: with CheckFinite off they still throw; with it on, the input error wins over the
    /// non-finite loss that the invalid input produces (a zero gap gives ln 0, a zero count a division by zero).
    /// </summary>
    [Theory, MemberData(nameof(ValueChecks))]
    public void Value_checks_run_with_or_without_CheckFinite_and_name_the_input(string name, Action<bool> compute, string param)
    {
        foreach (var checkFinite in new[] { true, false })
        {
            var e = Assert.ThrowsAny<ArgumentException>(() => compute(checkFinite));
            Assert.True(e.ParamName == param, $"{name} (CheckFinite {checkFinite}): ParamName {e.ParamName}, expected {param}: {e.Message}");
        }
    }

    [Fact]
    public void With_CheckFinite_off_a_NaN_input_reaches_the_loss_instead_of_an_exception()
    {
        var policy = new PreferenceLogps(F(-10, float.NaN, -9), F(-11, -13, -10));
        using var r = new DpoLoss(new DpoOptions { CheckFinite = false }).Compute(new PreferenceBatch(policy));
        Assert.True(double.IsNaN(r.Loss.ToDouble()));
        Assert.Throws<ArgumentException>(() => DpoLoss.Compute(policy));   // the default names it instead
    }

    sealed class Negative : IRpoWeighting
    {
        public Tensor ComputeWeights(Tensor chosen, Tensor rejected, ScalarType dtype) =>
            -ones(chosen.shape[0], rejected.shape[0], dtype: dtype);
    }

    sealed class WrongShape : IRpoWeighting
    {
        public Tensor ComputeWeights(Tensor chosen, Tensor rejected, ScalarType dtype) => ones(2, 2, dtype: dtype);
    }

    [Fact]
    public void A_custom_weighting_that_breaks_its_contract_is_named()
    {
        var emb = PromptEmbeddings.Paired(randn(3, 4));
        var neg = Assert.Throws<InvalidOperationException>(() =>
            RpoLoss.Compute(Ok(), Ok(), emb, new RpoOptions { Weighting = new Negative() }));
        Assert.Contains("Negative.ComputeWeights returned negative", neg.Message);
        var shape = Assert.Throws<InvalidOperationException>(() =>
            RpoLoss.Compute(Ok(), Ok(), emb, new RpoOptions { Weighting = new WrongShape() }));
        Assert.Contains("[3, 3]", shape.Message);
    }

    [Fact]
    public void The_public_cosine_weighting_still_checks_zero_norm_rows_on_its_own()
    {
        var e = Assert.Throws<ArgumentException>(() =>
            new CosineSoftmaxWeighting(0.5).ComputeWeights(tensor(new float[,] { { 1, 0 }, { 0, 0 } }), tensor(new float[,] { { 1, 0 } }), ScalarType.Float32));
        Assert.Contains("rows 1 have zero norm", e.Message);
    }
}
