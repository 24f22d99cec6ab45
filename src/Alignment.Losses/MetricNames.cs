namespace Alignment.Losses;

/// <summary>Names of the metrics in <see cref="LossResult.Metrics"/> (TRL's names where TRL has one).</summary>
public static class MetricNames
{
    /// <summary>mean(beta * u_w), u_w = policy minus reference log-prob of the chosen response.</summary>
    public const string RewardsChosen = "rewards/chosen";
    /// <summary>mean(beta * u_l), u_l = policy minus reference log-prob of the rejected response.</summary>
    public const string RewardsRejected = "rewards/rejected";
    /// <summary>rewards/chosen - rewards/rejected (paired: mean(beta * (u_w - u_l))).</summary>
    public const string RewardsMargins = "rewards/margins";
    /// <summary>Fraction of pairs with u_w &gt; u_l (strict, so 0 at initialisation); unpaired: over all (chosen, rejected) pairs.</summary>
    public const string RewardsAccuracies = "rewards/accuracies";
    /// <summary>Batch mean of the summed policy log-probs of the chosen responses.</summary>
    public const string LogpsChosen = "logps/chosen";
    /// <summary>Batch mean of the summed policy log-probs of the rejected responses.</summary>
    public const string LogpsRejected = "logps/rejected";

    /// <summary>DPO+NLL: the mean length-normalised negative log-likelihood of the chosen responses.</summary>
    public const string NllLoss = "nll_loss";
    /// <summary>RPO: mean of the diagonal of the weight matrix (paired batches): how much each chosen row attends to its own rejected.</summary>
    public const string RpoDiagonalWeight = "rpo/diagonal_weight";
    /// <summary>RPO: mean Shannon entropy (nats) of the weight matrix's rows; ln N means uniform weights (the weighting does nothing).</summary>
    public const string RpoRowEntropy = "rpo/row_entropy";
    /// <summary>SPO: the mean (weighted) preference term.</summary>
    public const string SpoPreference = "spo/preference";
    /// <summary>SPO: the KL(policy || reference) estimate the regulariser uses (0 when none was given).</summary>
    public const string SpoKl = "spo/kl";
    /// <summary>ODPO: the mean offset alpha * ln(score gap).</summary>
    public const string OdpoOffset = "odpo/offset";
    /// <summary>SPPO: mean target of the chosen log-ratio, eta * (p_w - 1/2).</summary>
    public const string SppoTargetChosen = "sppo/target_chosen";
    /// <summary>SPPO: mean target of the rejected log-ratio.</summary>
    public const string SppoTargetRejected = "sppo/target_rejected";

    /// <summary>Log-prob step: mean token entropy over all completion tokens (<see cref="LogProbStatistics.Entropy"/>).</summary>
    public const string Entropy = "entropy";
    /// <summary>Log-prob step: fraction of chosen completion tokens whose argmax is the label.</summary>
    public const string MeanTokenAccuracy = "mean_token_accuracy";
    /// <summary>Log-prob step: mean logit over the chosen completion tokens and the vocabulary.</summary>
    public const string LogitsChosen = "logits/chosen";
    /// <summary>Log-prob step: mean logit over the rejected completion tokens and the vocabulary.</summary>
    public const string LogitsRejected = "logits/rejected";
    /// <summary>The mean training loss (the metrics accumulator's name for it).</summary>
    public const string Loss = "loss";

    /// <summary>ORPO: mean logsigmoid(log odds ratio) of the pairs (TRL's ORPOTrainer name).</summary>
    public const string LogOddsRatio = "log_odds_ratio";
    /// <summary>ORPO: mean log odds ratio, log odds(y_w) - log odds(y_l), of the per-token means.</summary>
    public const string LogOddsChosen = "log_odds_chosen";
    /// <summary>KTO: the reference point z0 = max(0, KL estimate) the batch used (TRL's KTOTrainer name). Policy-gradient losses:
    /// the token mean of the KL estimate to the reference (TRL GRPOTrainer's name).</summary>
    public const string Kl = "kl";
    /// <summary>BCO: the running reward mean delta the batch used (TRL's BCOTrainer name).</summary>
    public const string Delta = "delta";
    /// <summary>Reward model: fraction of pairs with r_w &gt; r_l (strict), TRL's RewardTrainer name.</summary>
    public const string Accuracy = "accuracy";
    /// <summary>Reward model: mean(r_w - r_l).</summary>
    public const string Margin = "margin";
    /// <summary>Reward model: mean of all 2B rewards.</summary>
    public const string MeanReward = "mean_reward";
    /// <summary>Reward model: smallest of all 2B rewards.</summary>
    public const string MinReward = "min_reward";
    /// <summary>Reward model: largest of all 2B rewards.</summary>
    public const string MaxReward = "max_reward";
    /// <summary>Clipped-ratio losses: fraction of valid tokens with rho &lt; 1 - eps_low and A &lt; 0 (TRL).</summary>
    public const string ClipRatioLowMean = "clip_ratio/low_mean";
    /// <summary>Clipped-ratio losses: the smallest per-sequence fraction of low-clipped tokens (TRL).</summary>
    public const string ClipRatioLowMin = "clip_ratio/low_min";
    /// <summary>Clipped-ratio losses: fraction of valid tokens with rho &gt; 1 + eps_high and A &gt; 0 (TRL).</summary>
    public const string ClipRatioHighMean = "clip_ratio/high_mean";
    /// <summary>Clipped-ratio losses: the largest per-sequence fraction of high-clipped tokens (TRL).</summary>
    public const string ClipRatioHighMax = "clip_ratio/high_max";
    /// <summary>Clipped-ratio losses: fraction of valid tokens clipped on either side (TRL).</summary>
    public const string ClipRatioRegionMean = "clip_ratio/region_mean";
    /// <summary>CISPO: fraction of valid tokens whose weight was capped with A &gt; 0 (TRL).</summary>
    public const string CispoClipRatio = "cispo_clip_ratio";
    /// <summary>Rollout correction: smallest token weight (TRL sampling/importance_sampling_ratio/min).</summary>
    public const string ImportanceSamplingRatioMin = "sampling/importance_sampling_ratio/min";
    /// <summary>Rollout correction: mean token weight.</summary>
    public const string ImportanceSamplingRatioMean = "sampling/importance_sampling_ratio/mean";
    /// <summary>Rollout correction: largest token weight.</summary>
    public const string ImportanceSamplingRatioMax = "sampling/importance_sampling_ratio/max";
    /// <summary>Advantage estimators: mean reward of the scorable completions (TRL "reward").</summary>
    public const string Reward = "reward";
    /// <summary>Advantage estimators: mean over groups of the reward's standard deviation (TRL "reward_std").</summary>
    public const string RewardStd = "reward_std";
    /// <summary>Advantage estimators: fraction of completions whose group's rewards are all equal (TRL "frac_reward_zero_std").</summary>
    public const string FracRewardZeroStd = "frac_reward_zero_std";

    /// <summary>Distillation: the token mean of the per-token divergence (the soft loss; Liger's soft_loss).</summary>
    public const string DistillationDivergence = "distillation/divergence";

    /// <summary>Distillation: the token mean of the student's cross-entropy on the labels (the hard loss; Liger's hard_loss).</summary>
    public const string DistillationCrossEntropy = "distillation/cross_entropy";
}
