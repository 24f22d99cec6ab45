using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>TRL's GRPOConfig / RLOOConfig by syntax, the bad inputs of the token contract, and native memory.</summary>
public class PolicyGradientTrlAndInputTests
{
    public static IEnumerable<object[]> TrlCases => new[]
    {
        new object[] { "grpo", "token", 0.0 }, new object[] { "grpo", "sequence", 0.04 }, new object[] { "bnpo", "token", 0.04 },
        new object[] { "dr_grpo", "token", 0.0 }, new object[] { "dapo", "token", 0.04 }, new object[] { "cispo", "token", 0.0 },
        new object[] { "sapo", "token", 0.04 }, new object[] { "sapo", "sequence", 0.0 },
    };

    /// <summary>TRL's conventions: mean over every row (empty ones too), no log-ratio clamp, k3 KL, eps_high = epsilon when unset.</summary>
    [Theory, MemberData(nameof(TrlCases))]
    public void A_trl_grpo_config_gives_trl_s_objective(string lossType, string level, double beta)
    {
        var rng = new Random(lossType.Length * 31 + level.Length);
        var setup = TrlGrpo.Create(new TrlGrpoConfig
        {
            LossType = lossType, ImportanceSamplingLevel = level, Beta = beta, MaxCompletionLength = 6,
            EpsilonHigh = lossType == "cispo" ? 5 : null,
        });
        var kind = lossType switch { "cispo" => "cispo-cap", "sapo" => "sapo", _ => "clip" };
        var reduction = lossType switch { "bnpo" => "local", "dr_grpo" => "constant", "dapo" or "cispo" => "token-mean", _ => "seq-mean-token-mean" };
        var config = new PolicyOracle.Config(kind, 0.2, lossType == "cispo" ? 5 : 0.2, level == "token" ? "token" : "seq-mean",
            Reduction: reduction, CountEmpty: true, MaxLen: 6, KlBeta: beta, Clamp: 1e9);
        for (int trial = 0; trial < 10; trial++)
        {
            var x = PgCase.Random(rng, 5, 6, allowEmpty: true, withOld: trial % 3 != 0, drift: 0.2);
            var (batch, leaf) = Pg.Batch(x, ScalarType.Float64, reference: beta > 0);
            using var r = setup.Loss.Compute(batch);
            r.Backward();
            Assert.Equal(PolicyOracle.Loss(x, config, x.L, x.L), r.Loss.item<double>(), 10);
            Pg.AssertGridClose(PolicyOracle.Gradient(x, config), Pg.ToGrid(leaf.grad!), x, 1e-6, $"TRL {lossType}/{level}");
        }
    }

    [Fact]
    public void A_trl_config_refuses_what_trl_would_silently_get_wrong_and_what_is_not_built()
    {
        var e = Assert.Throws<ArgumentException>(() => TrlGrpo.Create(new TrlGrpoConfig { LossType = "cispo" }));
        Assert.Contains("EpsilonHigh", e.Message);
        var seq = Assert.Throws<ArgumentException>(() => TrlGrpo.Create(new TrlGrpoConfig { LossType = "dapo", ImportanceSamplingLevel = "sequence" }));
        Assert.Contains("3823", seq.Message);
        Assert.Equal("top_entropy_quantile", Assert.Throws<ArgumentException>(() => TrlGrpo.Create(new TrlGrpoConfig { TopEntropyQuantile = 0 })).ParamName);
        Assert.Throws<NotSupportedException>(() => TrlGrpo.Create(new TrlGrpoConfig { LossType = "vespo" }));
        Assert.Equal("loss_type", Assert.Throws<ArgumentException>(() => TrlGrpo.Create(new TrlGrpoConfig { LossType = "ppo" })).ParamName);
        Assert.Equal("scale_rewards", Assert.Throws<ArgumentException>(() => TrlGrpo.Create(new TrlGrpoConfig { ScaleRewards = "rank" })).ParamName);
    }

    [Fact]
    public void Trl_advantages_sum_then_normalize_several_rewards_and_rloo_puts_the_kl_in_the_reward()
    {
        var setup = TrlGrpo.Create(new TrlGrpoConfig { NumGenerations = 2, RewardWeights = new[] { 1.0, 2.0 } });
        using var rewards = tensor(new[] { 1.0, 0, double.NaN, 1, 0, double.NaN, double.NaN, double.NaN }, new long[] { 4, 2 });
        using var a = setup.ComputeAdvantages(rewards);
        // rows: 1, 2 (NaN dropped by nansum), 0, NaN (unscorable) -> groups [1, 2] and [0, NaN]
        var v = TensorUtil.Values(a.Values);
        double std = Math.Sqrt(0.5);
        Assert.Equal(-0.5 / (std + 1e-4), v[0], 6);
        Assert.Equal(0.5 / (std + 1e-4), v[1], 6);
        Assert.Equal(new double[] { 0, 0 }, v.Skip(2));

        var rloo = TrlRloo.Create(new TrlRlooConfig { Beta = 0.5 });
        using var r = tensor(new[] { 1.0, 0.0 });
        using var old = Pg.Row(-1, -1, -2, -2).reshape(2, 2);
        using var reference = Pg.Row(-1.5, -1, -2, -3).reshape(2, 2);
        using var kl = TrlRloo.SequenceKl(old, reference, ones(2, 2, dtype: ScalarType.Bool));
        Assert.Equal(new[] { 0.5, 1.0 }, TensorUtil.Values(kl));
        using var adv = rloo.ComputeAdvantages(r, kl);
        // rewards become 1 - 0.25 = 0.75 and 0 - 0.5 = -0.5: A = +-1.25
        Assert.Equal(new[] { 1.25, -1.25 }, TensorUtil.Values(adv.Values));
        Assert.Throws<ArgumentException>(() => rloo.ComputeAdvantages(r));
    }

    [Fact]
    public void Top_entropy_quantile_keeps_the_high_entropy_tokens_as_trl()
    {
        // entropies of the 5 valid tokens [0.1, 0.5, 0.9, 0.3, 0.7]; q = 0.4 keeps H >= quantile(0.6) = 0.58 (linear): 0.9, 0.7
        var l = Pg.Row(-1, -2, -3, -4, -5, -6).reshape(2, 3).requires_grad_(true);
        var mask = tensor(new[] { true, true, true, true, true, false }, new long[] { 2, 3 });
        var batch = new TokenBatch(l, mask)
        {
            Advantages = tensor(new[] { 1.0, 1.0 }, dtype: ScalarType.Float64),
            Entropy = Pg.Row(0.1, 0.5, 0.9, 0.3, 0.7, 5.0).reshape(2, 3),
        };
        var setup = TrlGrpo.Create(new TrlGrpoConfig { LossType = "dapo", TopEntropyQuantile = 0.4 });
        using var r = new ReinforceLoss(new() { TopEntropyQuantile = 0.4 }).Compute(batch);
        // -A l at the kept tokens: 3 (l = -3) and 5 (l = -5), over the 5 valid tokens
        Assert.Equal((3 + 5) / 5.0, r.Loss.item<double>(), 12);
        r.Backward();
        Assert.Equal(new[] { 0, 0, -0.2, 0, -0.2, 0 }, TensorUtil.Values(l.grad!).Select(v => Math.Round(v, 12)));
        Assert.Equal("batch.Entropy", Assert.Throws<ArgumentException>(() =>
            setup.Loss.Compute(new TokenBatch(l, mask) { Advantages = tensor(new[] { 1.0, 1.0 }, dtype: ScalarType.Float64) })).ParamName);
        using var trl = setup.Loss.Compute(batch);                       // TRL's dapo, ratio 1: -A per kept token, token mean
        Assert.Equal(-2 / 5.0, trl.Loss.item<double>(), 12);
    }

    [Fact]
    public void The_rollout_correction_weighs_tokens_and_sequences_as_trl()
    {
        // l_old - l_beh per token: [0.5, 0.7] and [0.1, -0.2]; sequence weights exp(1.2) = 3.32 (masked: > 3) and exp(-0.1)
        var l = Pg.Row(-1, -1, -1, -1).reshape(2, 2).requires_grad_(true);
        var beh = Pg.Row(-1.5, -1.7, -1.1, -0.8).reshape(2, 2);
        var batch = new TokenBatch(l, ones(2, 2, dtype: ScalarType.Bool)) { BehaviourLogProbs = beh, Advantages = tensor(new[] { 1.0, 1.0 }, dtype: ScalarType.Float64) };
        double V(RolloutCorrection c)
        {
            using var r = new ReinforceLoss(new() { RolloutCorrection = c, Reduction = TokenReduction.TokenMean }).Compute(batch);
            return r.Loss.item<double>();
        }
        // REINFORCE per token -A l = 1, so the loss is the mean weight
        Assert.Equal(Math.Exp(-0.1) * 2 / 4, V(RolloutCorrection.FromTrl("sequence_mask")), 9);
        Assert.Equal((3 * 2 + Math.Exp(-0.1) * 2) / 4, V(RolloutCorrection.FromTrl("sequence_truncate")), 9);
        Assert.Equal((Math.Exp(0.5) + Math.Exp(0.7) + Math.Exp(0.1) + Math.Exp(-0.2)) / 4, V(RolloutCorrection.FromTrl("token_truncate")), 9);
        Assert.Equal((Math.Exp(0.5) + Math.Exp(0.1)) / 4, V(RolloutCorrection.FromTrl("token_mask", 1.7, 1.0)), 9);
    }

    static TokenBatch Good(int n = 2, int t = 3) => new(zeros(n, t, dtype: ScalarType.Float32) - 1, ones(n, t, dtype: ScalarType.Bool))
    {
        Advantages = ones(n),
    };

    public static IEnumerable<object[]> BadInputs => new (string Case, string Param, Func<TokenBatch> Batch, Func<ITokenLoss>? Loss)[]
    {
        ("1-D log-probs", "batch.LogProbs", () => new TokenBatch(zeros(3) - 1, ones(3)) { Advantages = ones(3) }, null),
        ("integer log-probs", "batch.LogProbs", () => new TokenBatch(zeros(2, 3, dtype: ScalarType.Int64), ones(2, 3)) { Advantages = ones(2) }, null),
        ("empty", "batch.LogProbs", () => new TokenBatch(zeros(0, 3), ones(0, 3)) { Advantages = ones(0) }, null),
        ("mask shape", "batch.Mask", () => new TokenBatch(zeros(2, 3) - 1, ones(2, 4)) { Advantages = ones(2) }, null),
        ("NaN mask", "batch.Mask", () => new TokenBatch(zeros(2, 3) - 1, full(2, 3, double.NaN)) { Advantages = ones(2) }, null),
        ("advantages shape", "batch.Advantages", () => Good().WithWindow(null) is var g ? new TokenBatch(g.LogProbs, g.Mask) { Advantages = ones(3) } : g, null),
        ("NaN advantage", "batch.Advantages", () => new TokenBatch(zeros(2, 3) - 1, ones(2, 3)) { Advantages = tensor(new[] { 1f, float.NaN }) }, null),
        ("no advantages", "batch.Advantages", () => new TokenBatch(zeros(2, 3) - 1, ones(2, 3)), null),
        ("positive log-probs", "batch.LogProbs", () => new TokenBatch(zeros(2, 3) + 2, ones(2, 3)) { Advantages = ones(2) }, null),
        ("positive old log-probs", "batch.OldLogProbs", () => new TokenBatch(zeros(2, 3) - 1, ones(2, 3)) { Advantages = ones(2), OldLogProbs = zeros(2, 3) + 3 }, null),
        ("NaN log-prob at a valid token", "batch.LogProbs", () => new TokenBatch(full(2, 3, double.NaN), ones(2, 3)) { Advantages = ones(2) }, null),
        ("old shape", "batch.OldLogProbs", () => new TokenBatch(zeros(2, 3) - 1, ones(2, 3)) { Advantages = ones(2), OldLogProbs = zeros(2, 2) }, null),
        ("KL without reference", "batch.ReferenceLogProbs", () => Good(), () => new ClippedPolicyLoss(new() { Kl = new KlPenalty(0.1) })),
        ("correction without behaviour", "batch.BehaviourLogProbs", () => Good(), () => new ClippedPolicyLoss(new() { RolloutCorrection = RolloutCorrection.FromTrl("token_mask") })),
        ("detached entropy bonus", "batch.Entropy", () => new TokenBatch((zeros(2, 3) - 1).requires_grad_(true), ones(2, 3)) { Advantages = ones(2), Entropy = ones(2, 3) },
            () => new ClippedPolicyLoss(new() { EntropyCoefficient = 0.01 })),
        ("bad window", "window", () => Good().WithWindow(new TokenWindow { Tokens = -4 }), null),
        ("packed with two rows", "batch.Boundaries", () => new TokenBatch(zeros(2, 3) - 1, ones(2, 3)) { Advantages = ones(2), Boundaries = SequenceBoundaries.FromLengths(new long[] { 2, 1 }) }, null),
        ("packed past the row", "batch.Boundaries", () => new TokenBatch(zeros(1, 3) - 1, ones(1, 3)) { Advantages = ones(2), Boundaries = SequenceBoundaries.FromLengths(new long[] { 2, 2 }) }, null),
    }.Select(c => new object[] { c.Case, c.Param, c.Batch, c.Loss! });

    [Theory, MemberData(nameof(BadInputs))]
    public void A_bad_input_is_a_clear_error_naming_the_argument(string @case, string param, Func<TokenBatch> batch, Func<ITokenLoss>? loss)
    {
        var l = loss?.Invoke() ?? new ClippedPolicyLoss();
        var e = Assert.ThrowsAny<ArgumentException>(() => l.Compute(batch()));
        Assert.True(e.ParamName == param, $"{@case}: ParamName {e.ParamName}, expected {param}: {e.Message}");
    }

    [Fact]
    public void Bad_options_and_estimator_inputs_are_refused_when_they_are_made()
    {
        Assert.Throws<ArgumentException>(() => new CispoLoss(new CispoOptions()));
        Assert.Throws<ArgumentException>(() => new ClippedPolicyLoss(new() { Ratio = ImportanceRatio.SequenceMean, Reduction = TokenReduction.TokenMean }));
        Assert.Throws<ArgumentException>(() => new TokenReduction(TokenAggregation.ConstantNormalizer));
        Assert.Throws<ArgumentOutOfRangeException>(() => new ClippedPolicyOptions { EpsilonLow = 1.5 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new ClippedPolicyOptions { LogRatioClamp = 0 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new KlPenalty(-1));
        Assert.Throws<ArgumentException>(() => new RolloutCorrection(RolloutCorrectionLevel.Token, RolloutCorrectionMode.Mask, max: 1, min: 2));
        var groups = Assert.Throws<ArgumentException>(() => Advantages.Grpo(ones(5), GroupIds.Contiguous(2)));
        Assert.Contains("multiple of the group size", groups.Message);
        Assert.Equal("rewards", Assert.Throws<ArgumentException>(() => Advantages.Grpo(tensor(new[] { 1.0, double.PositiveInfinity }), GroupIds.Contiguous(2))).ParamName);
        Assert.Equal("rewards", Assert.Throws<ArgumentException>(() => Advantages.Grpo(ones(2, 2), GroupIds.Contiguous(2))).ParamName);
        Assert.Equal("groups", Assert.Throws<ArgumentException>(() => Advantages.Grpo(ones(3), GroupIds.FromIds(new long[] { 1, 2 }))).ParamName);
    }

    [Fact]
    public void A_loss_that_overflows_finite_inputs_says_so()
    {
        // log-ratio 100 without a clamp: exp overflows float32
        var batch = new TokenBatch(zeros(1, 2) - 1, ones(1, 2)) { OldLogProbs = zeros(1, 2) - 101, Advantages = -ones(1) };
        var e = Assert.Throws<ArithmeticException>(() => new ClippedPolicyLoss(new() { LogRatioClamp = null }).Compute(batch));
        Assert.Contains("overflowed", e.Message);
        using var clamped = new ClippedPolicyLoss().Compute(batch);                 // the default clamp keeps it finite
        Assert.True(double.IsFinite(clamped.Loss.item<float>()));
    }
}

[Collection("Memory")]
public class PolicyGradientMemoryTests
{
    [Fact]
    public void Every_policy_loss_and_estimator_leaks_nothing_with_or_without_a_scope()
    {
        foreach (var name in PolicyLosses.Names)
            NoScopeMemoryTests.AssertFlat(name, () =>
            {
                var x = PgCase.Random(new Random(1), 4, 5, withOld: true);
                var loss = PolicyLosses.Create(name, kl: new KlPenalty(0.02));
                var (batch, _) = Pg.Batch(x, ScalarType.Float32, reference: true);
                return () =>
                {
                    using var r = loss.Compute(batch);
                    r.Backward();
                    _ = r.Metrics;
                };
            }, iterations: 100);
        NoScopeMemoryTests.AssertFlat("advantages", () =>
        {
            var rewards = tensor(new[] { 1.0f, 0, 2, float.NaN });
            var mask = ones(4, 3, dtype: ScalarType.Bool);
            var scorable = rewards.nan_to_num(0);
            var tokenRewards = mask.to_type(ScalarType.Float32);
            var values = tokenRewards * 0.5;
            var multi = tensor(new[] { 1.0f, 0, 2, float.NaN, 0, 1, 3, 1 }, new long[] { 4, 2 });
            var old = -ones(4, 3);  // [N, T] like the mask
            var reference = -2 * ones(4, 3);
            var grpoSetup = TrlGrpo.Create(new TrlGrpoConfig { NumGenerations = 2 });
            return () =>
            {
                using var a = Advantages.Grpo(rewards, GroupIds.Contiguous(2));
                using var b = Advantages.ReinforcePlusPlus(scorable, mask);
                using var c = Advantages.Rloo(rewards, GroupIds.Contiguous(2));
                using var d = Advantages.Gae(tokenRewards, values, mask);
                using var e = Advantages.Gdpo(multi, GroupIds.Contiguous(2));
                using var kl = TrlRloo.SequenceKl(old, reference, mask);
                using var k3 = new KlPenalty(0.1).PerToken(old, reference);
                using var trl = grpoSetup.ComputeAdvantages(multi);
                using var opd = Advantages.OnPolicyDistillation(old, reference, mask, gamma: 0.9);
            };
        }, iterations: 100);
    }
}

/// <summary>The getting-started example of a user's own token loss: first-class, as the library's own.</summary>
public class CustomTokenLossTests
{
    public sealed record ClippedReinforceOptions : TokenLossOptions { public double Cap { get; init; } = 2; }

    public sealed class ClippedReinforce(ClippedReinforceOptions? o = null) : TokenLoss<ClippedReinforceOptions>(o ?? new())
    {
        public override string Name => "clipped_reinforce";
        public override TokenReduction Reduction => TokenReduction.TokenMean;
        protected override void Validate(TokenBatch batch, TokenTerms terms) =>
            Require(batch.Advantages, "batch.Advantages", "the advantages of the sampled completions");
        protected override TokenLossOutput Evaluate(TokenTerms t) =>
            new(-t.Advantages!.clamp(-Options.Cap, Options.Cap) * t.LogProbs,
                new[] { ("advantage/mean", t.TokenMean(t.Advantages!)) });
    }

    [Fact]
    public void A_users_token_loss_gets_the_validation_reduction_window_and_metrics()
    {
        var l = Pg.Row(-1, -2, -3, -4).reshape(2, 2).requires_grad_(true);
        var mask = tensor(new[] { true, true, true, false }, new long[] { 2, 2 });
        using var r = new ClippedReinforce().Compute(new TokenBatch(l, mask) { Advantages = tensor(new[] { 5.0, -1.0 }, dtype: ScalarType.Float64) });
        // per token: -clamp(A) l = [2, 4, -3, .]; token mean over 3 tokens = 1; the metric reads the unclamped A
        Assert.Equal(1.0, r.Loss.item<double>(), 12);
        Assert.Equal((5 + 5 - 1) / 3.0, r["advantage/mean"], 12);
        r.Backward();
        var grad = TensorUtil.Values(l.grad!);
        foreach (var (e, a) in new[] { -2 / 3.0, -2 / 3.0, 1 / 3.0, 0 }.Zip(grad)) Assert.Equal(e, a, 12);
        Assert.Equal("batch.Advantages", Assert.Throws<ArgumentException>(() => new ClippedReinforce().Compute(new TokenBatch(l, mask))).ParamName);
        using var w = new ClippedReinforce().Compute(new TokenBatch(l, mask) { Advantages = ones(2, dtype: ScalarType.Float64), Window = new TokenWindow { Tokens = 6, DataParallelSize = 2 } });
        Assert.Equal(2 * (1 + 2 + 3) / 6.0, w.Loss.item<double>(), 12);
    }
}
