using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// The loss and advantage fields of TRL's <c>GRPOConfig</c>, under the same names in C# casing, with TRL's defaults.
/// Build the objective with <see cref="TrlGrpo.Create(TrlGrpoConfig)"/>: porting a TRL configuration changes nothing but syntax.
/// </summary>
public sealed record TrlGrpoConfig
{
    /// <summary><c>loss_type</c>: grpo, bnpo, dr_grpo, dapo (TRL's default), cispo or sapo.</summary>
    public string LossType { get; init; } = "dapo";

    /// <summary><c>epsilon</c>: the lower clip (and the upper one unless <see cref="EpsilonHigh"/> is set). Default 0.2.</summary>
    public double Epsilon { get; init; } = 0.2;

    /// <summary><c>epsilon_high</c>: the upper clip (DAPO recommends 0.28); for cispo the absolute cap, required here (see <see cref="CispoOptions"/>). Default unset.</summary>
    public double? EpsilonHigh { get; init; }

    /// <summary><c>delta</c>: caps the unclipped ratio (INTELLECT-2). Default unset.</summary>
    public double? Delta { get; init; }

    /// <summary><c>beta</c>: the k3 KL coefficient. Default 0 (no reference model needed).</summary>
    public double Beta { get; init; }

    /// <summary><c>use_bias_correction_kl</c>: the KL times the importance ratio. Default false.</summary>
    public bool UseBiasCorrectionKl { get; init; }

    /// <summary><c>importance_sampling_level</c>: token (default) or sequence (GSPO).</summary>
    public string ImportanceSamplingLevel { get; init; } = "token";

    /// <summary><c>scale_rewards</c>: group (default), batch or none (also true = group, false = none).</summary>
    public string ScaleRewards { get; init; } = "group";

    /// <summary><c>num_generations</c>: completions per prompt, contiguous in the batch. Default 8.</summary>
    public int NumGenerations { get; init; } = 8;

    /// <summary><c>max_completion_length</c>: L_max of dr_grpo's normaliser. Default 512.</summary>
    public int MaxCompletionLength { get; init; } = 512;

    /// <summary><c>sapo_temperature_pos</c>. Default 1.0.</summary>
    public double SapoTemperaturePos { get; init; } = 1.0;

    /// <summary><c>sapo_temperature_neg</c>. Default 1.05.</summary>
    public double SapoTemperatureNeg { get; init; } = 1.05;

    /// <summary><c>entropy_coef</c>: the entropy bonus (needs a differentiable entropy). Default 0.</summary>
    public double EntropyCoef { get; init; }

    /// <summary><c>use_adaptive_entropy</c>: not supported (the controller is trainer state); must stay false.</summary>
    public bool UseAdaptiveEntropy { get; init; }

    /// <summary><c>top_entropy_quantile</c>: keep the top q of tokens by entropy in the policy term (needs the batch's entropy). Default 1.</summary>
    public double TopEntropyQuantile { get; init; } = 1.0;

    /// <summary><c>off_policy_mask_threshold</c>: not supported yet; must stay unset.</summary>
    public double? OffPolicyMaskThreshold { get; init; }

    /// <summary><c>use_vllm</c>: whether an inference engine sampled (the rollout correction applies only then). Default false.</summary>
    public bool UseVllm { get; init; }

    /// <summary><c>vllm_importance_sampling_correction</c>. Default true (used with <see cref="UseVllm"/>).</summary>
    public bool VllmImportanceSamplingCorrection { get; init; } = true;

    /// <summary><c>vllm_importance_sampling_mode</c>: token_truncate, token_mask, sequence_truncate, sequence_mask (default).</summary>
    public string VllmImportanceSamplingMode { get; init; } = "sequence_mask";

    /// <summary><c>vllm_importance_sampling_clip_max</c>. Default 3.</summary>
    public double? VllmImportanceSamplingClipMax { get; init; } = 3.0;

    /// <summary><c>vllm_importance_sampling_clip_min</c>. Default unset.</summary>
    public double? VllmImportanceSamplingClipMin { get; init; }

    /// <summary><c>multi_objective_aggregation</c>: sum_then_normalize (default) or normalize_then_sum (GDPO), for [N, K] rewards.</summary>
    public string MultiObjectiveAggregation { get; init; } = "sum_then_normalize";

    /// <summary><c>reward_weights</c>: one per reward function; null: 1 each.</summary>
    public IReadOnlyList<double>? RewardWeights { get; init; }
}

/// <summary>The fields of TRL's <c>RLOOConfig</c> that shape the objective, with TRL's defaults.</summary>
public sealed record TrlRlooConfig
{
    /// <summary><c>beta</c>: the k1 KL penalty subtracted from the rewards. Default 0.05.</summary>
    public double Beta { get; init; } = 0.05;

    /// <summary><c>epsilon</c>. Default 0.2.</summary>
    public double Epsilon { get; init; } = 0.2;

    /// <summary><c>epsilon_high</c>. Default unset (= epsilon).</summary>
    public double? EpsilonHigh { get; init; }

    /// <summary><c>num_generations</c>. Default 2.</summary>
    public int NumGenerations { get; init; } = 2;

    /// <summary><c>normalize_advantages</c>. Default false.</summary>
    public bool NormalizeAdvantages { get; init; }

    /// <summary><c>reward_clip_range</c>: (min, max) applied to the rewards before the KL; null: none.</summary>
    public (double Min, double Max)? RewardClipRange { get; init; }
}

/// <summary>What a TRL configuration becomes: the loss, and the advantages it trains on.</summary>
public sealed class TrlPolicySetup
{
    private readonly Func<Tensor, Tensor?, AdvantageResult> _advantages;

    internal TrlPolicySetup(ITokenLoss loss, GroupIds groups, Func<Tensor, Tensor?, AdvantageResult> advantages)
    {
        Loss = loss;
        Groups = groups;
        _advantages = advantages;
    }

    /// <summary>The objective (feed it <see cref="TokenBatch"/>es whose advantages come from <see cref="ComputeAdvantages"/>).</summary>
    public ITokenLoss Loss { get; }

    /// <summary>The groups: num_generations contiguous completions per prompt.</summary>
    public GroupIds Groups { get; }

    /// <summary>
    /// The advantages as TRL computes them over the whole generation batch (gathered across ranks, before slicing): [N]
    /// rewards, or [N, K] one column per reward function combined as multi_objective_aggregation and reward_weights say.
    /// For RLOO, <paramref name="sequenceKl"/> is sum_t m (l_old - l_ref) per completion (see <see cref="TrlRloo.SequenceKl"/>),
    /// required when beta is not 0.
    /// </summary>
    public AdvantageResult ComputeAdvantages(Tensor rewards, Tensor? sequenceKl = null) => _advantages(rewards, sequenceKl);
}

/// <summary>TRL's GRPOTrainer configuration as an adapter at the library's edge: TRL's fields in, the library's objects out.</summary>
/// <remarks>
/// <para>loss_type grpo → <see cref="ClippedPolicyLoss"/> with the sequence mean of token means over every row; bnpo → the local
/// token mean; dr_grpo → the constant normaliser rows * max_completion_length; dapo → the token mean (num_items_in_batch:
/// pass the window's token count as <see cref="TokenBatch.Window"/>); cispo → <see cref="CispoLoss"/> (cap); sapo →
/// <see cref="SapoLoss"/>. importance_sampling_level "sequence" gives GSPO's ratio. beta → a k3 <see cref="KlPenalty"/>. No
/// log-ratio clamp (TRL has none).</para>
/// <para>Two deliberate differences, both errors rather than different numbers: cispo without epsilon_high (TRL silently caps
/// at 0.2) and a sequence-level ratio with a token-summing loss type (dapo, bnpo, dr_grpo, cispo: TRL issue 3823). Fields that
/// need trainer state (use_adaptive_entropy) or are not built (off_policy_mask_threshold) are refused by name.</para>
/// </remarks>
public static class TrlGrpo
{
    /// <summary>The loss types supported.</summary>
    public static IReadOnlyList<string> LossTypes { get; } = new[] { "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo" };

    /// <summary>The objective and advantages of a GRPOConfig.</summary>
    /// <exception cref="ArgumentException">An unknown or unsupported field value, named by its TRL name.</exception>
    /// <exception cref="NotSupportedException">A TRL loss type or field not implemented here (luspo, vespo, adaptive entropy...).</exception>
    public static TrlPolicySetup Create(TrlGrpoConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        if (config.UseAdaptiveEntropy)
            throw new NotSupportedException("use_adaptive_entropy is trainer state (a controller over steps); set EntropyCoef per step yourself instead.");
        if (!(config.TopEntropyQuantile > 0 && config.TopEntropyQuantile <= 1))
            throw new ArgumentException($"top_entropy_quantile must be in (0, 1]; got {config.TopEntropyQuantile}.", "top_entropy_quantile");
        if (config.OffPolicyMaskThreshold is not null)
            throw new NotSupportedException("off_policy_mask_threshold is not supported yet.");
        if (config.NumGenerations < 1)
            throw new ArgumentException($"num_generations must be >= 1; got {config.NumGenerations}.", "num_generations");
        var level = config.ImportanceSamplingLevel switch
        {
            "token" => ImportanceRatio.Token,
            "sequence" => ImportanceRatio.SequenceMean,
            _ => throw new ArgumentException($"importance_sampling_level must be 'token' or 'sequence'; got '{config.ImportanceSamplingLevel}'.", "importance_sampling_level"),
        };
        var kl = config.Beta != 0
            ? new KlPenalty(config.Beta, KlEstimator.K3) { BiasCorrected = config.UseBiasCorrectionKl }
            : null;
        var correction = config.UseVllm && config.VllmImportanceSamplingCorrection
            ? RolloutCorrection.FromTrl(config.VllmImportanceSamplingMode, config.VllmImportanceSamplingClipMax, config.VllmImportanceSamplingClipMin)
            : null;
        double high = config.EpsilonHigh ?? config.Epsilon;
        var rows = new TokenReduction(TokenAggregation.SequenceMeanTokenMean, countEmptySequences: true);
        ClippedPolicyOptions Clipped(TokenReduction reduction) => new()
        {
            EpsilonLow = config.Epsilon, EpsilonHigh = high, Delta = config.Delta, Ratio = level, Reduction = reduction,
            LogRatioClamp = null, Kl = kl, EntropyCoefficient = config.EntropyCoef, RolloutCorrection = correction, TopEntropyQuantile = config.TopEntropyQuantile,
        };
        ITokenLoss loss = config.LossType switch
        {
            "grpo" => new ClippedPolicyLoss(Clipped(rows), "grpo"),
            "bnpo" => new ClippedPolicyLoss(Clipped(TokenReduction.LocalTokenMean), "bnpo"),
            "dr_grpo" => new ClippedPolicyLoss(Clipped(new TokenReduction(TokenAggregation.ConstantNormalizer, config.MaxCompletionLength, countEmptySequences: true)), "dr_grpo"),
            "dapo" => new ClippedPolicyLoss(Clipped(TokenReduction.TokenMean), "dapo"),
            "cispo" => new CispoLoss(new CispoOptions
            {
                EpsilonHigh = config.EpsilonHigh, Ratio = level == ImportanceRatio.Token ? ImportanceRatio.Token : ImportanceRatio.SequenceMean,
                LogRatioClamp = null, Kl = kl, EntropyCoefficient = config.EntropyCoef, RolloutCorrection = correction, TopEntropyQuantile = config.TopEntropyQuantile,
            }),
            "sapo" => new SapoLoss(new SapoOptions
            {
                TemperaturePositive = config.SapoTemperaturePos, TemperatureNegative = config.SapoTemperatureNeg, Ratio = level, Reduction = rows,
                LogRatioClamp = null, Kl = kl, EntropyCoefficient = config.EntropyCoef, RolloutCorrection = correction, TopEntropyQuantile = config.TopEntropyQuantile,
            }),
            "luspo" or "vespo" => throw new NotSupportedException($"loss_type '{config.LossType}' is not implemented yet; supported: {string.Join(", ", LossTypes)}."),
            _ => throw new ArgumentException($"loss_type '{config.LossType}' is not a GRPOTrainer loss type; supported: {string.Join(", ", LossTypes)}.", "loss_type"),
        };
        var scaling = config.ScaleRewards switch
        {
            "group" or "true" or "True" => RewardScaling.Group,
            "batch" => RewardScaling.Batch,
            "none" or "false" or "False" => RewardScaling.None,
            _ => throw new ArgumentException($"scale_rewards must be 'group', 'batch' or 'none'; got '{config.ScaleRewards}'.", "scale_rewards"),
        };
        if (config.MultiObjectiveAggregation is not ("sum_then_normalize" or "normalize_then_sum"))
            throw new ArgumentException($"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum'; got '{config.MultiObjectiveAggregation}'.",
                "multi_objective_aggregation");
        var groups = GroupIds.Contiguous(config.NumGenerations);
        var options = new GrpoAdvantageOptions { Scaling = scaling };
        return new TrlPolicySetup(loss, groups, (rewards, _) =>
        {
            Guard.Usable(rewards, nameof(rewards));
            if (rewards.dim() == 1) return Advantages.Grpo(rewards, groups, options);
            if (config.MultiObjectiveAggregation == "normalize_then_sum") return Advantages.Gdpo(rewards, groups, config.RewardWeights);
            using var combined = WeightedNanSum(rewards, config.RewardWeights);
            return Advantages.Grpo(combined, groups, options);
        });
    }

    /// <summary>TRL's sum_then_normalize: the weighted nansum of the reward columns, NaN where every column is NaN.</summary>
    private static Tensor WeightedNanSum(Tensor rewards, IReadOnlyList<double>? weights)
    {
        if (rewards.dim() != 2)
            throw new ArgumentException($"rewards must be [N] or [N, K] (one column per reward function); got {Guard.Shape(rewards)}.", nameof(rewards));
        Guard.Floating(rewards, nameof(rewards));
        long k = rewards.shape[1];
        if (weights is not null && weights.Count != k)
            throw new ArgumentException($"reward_weights has {weights.Count} entries but rewards has {k} columns.", "reward_weights");
        using var scope = NewDisposeScope();
        var r = rewards.detach().to(ScalarType.Float64, CPU);
        var w = tensor(weights?.ToArray() ?? Enumerable.Repeat(1.0, (int)k).ToArray(), dtype: ScalarType.Float64);
        var sum = (r.nan_to_num(0.0) * w.unsqueeze(0)).sum(1);
        var unscorable = r.isnan().all(1);
        var result = sum.masked_fill(unscorable, double.NaN);
        return result.MoveToOuterDisposeScope();
    }
}

/// <summary>TRL's RLOOTrainer configuration: the RLOO advantages (k1 KL in the reward) and the sequence-level clipped loss.</summary>
public static class TrlRloo
{
    /// <summary>
    /// The objective of an RLOOConfig: <see cref="ClippedPolicyLoss"/> on the product of token ratios (summed log-probs, as
    /// TRL), mean over sequences, and RLOO advantages with the KL penalty beta * sum_t (l_old - l_ref) in the reward.
    /// </summary>
    public static TrlPolicySetup Create(TrlRlooConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        if (config.NumGenerations < 2)
            throw new ArgumentException($"num_generations must be >= 2 for a leave-one-out baseline; got {config.NumGenerations}.", "num_generations");
        var loss = new ClippedPolicyLoss(new ClippedPolicyOptions
        {
            EpsilonLow = config.Epsilon, EpsilonHigh = config.EpsilonHigh ?? config.Epsilon, Ratio = ImportanceRatio.SequenceSum,
            Reduction = new TokenReduction(TokenAggregation.SequenceMeanTokenMean, countEmptySequences: true), LogRatioClamp = null,
        }, "rloo");
        var groups = GroupIds.Contiguous(config.NumGenerations);
        return new TrlPolicySetup(loss, groups, (rewards, kl) =>
        {
            Guard.Usable(rewards, nameof(rewards));
            using var scope = NewDisposeScope();
            var r = rewards;
            if (config.RewardClipRange is { } range) r = rewards.detach().clamp(range.Min, range.Max);
            if (config.Beta != 0 && kl is null)
                throw new ArgumentException($"RLOO with beta {config.Beta} needs sequenceKl = sum_t m (l_old - l_ref) per completion (TrlRloo.SequenceKl).", "sequenceKl");
            var result = Advantages.Rloo(r, groups, config.NormalizeAdvantages, config.Beta != 0 ? kl : null, config.Beta);
            scope.MoveToOuter(result.Values);
            return result;
        });
    }

    /// <summary>sum_t m (l_old - l_ref) per completion [N] (k1, TRL's RLOO penalty), from padded [N, T] log-probs and mask; detached.</summary>
    public static Tensor SequenceKl(Tensor oldLogProbs, Tensor referenceLogProbs, Tensor mask)
    {
        Guard.Usable(oldLogProbs, nameof(oldLogProbs));
        Guard.Usable(referenceLogProbs, nameof(referenceLogProbs));
        Guard.Usable(mask, nameof(mask));
        if (!oldLogProbs.shape.SequenceEqual(referenceLogProbs.shape) || !oldLogProbs.shape.SequenceEqual(mask.shape) || oldLogProbs.dim() != 2)
            throw new ArgumentException(
                $"oldLogProbs, referenceLogProbs and mask must all be [N, T]; got {Guard.Shape(oldLogProbs)}, {Guard.Shape(referenceLogProbs)}, {Guard.Shape(mask)}.", nameof(mask));
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var valid = mask != 0;
        var diff = (oldLogProbs.detach().to_type(ScalarType.Float64) - referenceLogProbs.detach().to_type(ScalarType.Float64))
            .where(valid, zeros(1, dtype: ScalarType.Float64, device: mask.device));
        return diff.sum(1).MoveToOuterDisposeScope();
    }
}
