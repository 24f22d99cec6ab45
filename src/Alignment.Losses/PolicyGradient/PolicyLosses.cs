namespace Alignment.Losses;

/// <summary>
/// The one registry of the policy-gradient objectives by name (the library's names; TRL's GRPOConfig is mapped by
/// <see cref="TrlGrpo"/>): tests, benchmarks and samples read it, so a new objective is one row here.
/// </summary>
/// <remarks>
/// Each name gives the objective with its paper's or anchor's defaults: grpo (clip 0.2, sequence mean of token means,
/// TRL "grpo"); dapo (clip-higher 0.2 / 0.28, token mean); dr_grpo (clip 0.2, constant normaliser S * L_max); bnpo
/// (local token mean); gspo (sequence-mean ratio, clip 3e-4 / 4e-4); gspo_token; cispo (cap 5, token mean); cispo_clip
/// (verl's clip 0.2 / 0.28); sapo (tau 1 / 1.05); gmpo (log clip 0.4); reinforce (GPG, token mean); rloo (TRL's RLOO:
/// sequence-sum ratio, clip 0.2, mean over sequences); dual_clip (PPO with c = 3, verl's).
/// </remarks>
public static class PolicyLosses
{
    /// <summary>Every name <see cref="Create"/> accepts.</summary>
    public static IReadOnlyList<string> Names { get; } = new[]
    {
        "grpo", "dapo", "dr_grpo", "bnpo", "gspo", "gspo_token", "cispo", "cispo_clip", "sapo", "gmpo", "reinforce", "rloo", "dual_clip",
    };

    /// <summary>The objective named <paramref name="name"/> with its defaults (see the remarks), and an optional KL term.</summary>
    /// <param name="name">One of <see cref="Names"/>.</param>
    /// <param name="maxCompletionLength">L_max of dr_grpo's constant normaliser (TRL max_completion_length, default 512).</param>
    /// <param name="kl">A KL-to-reference term for every objective; null: none.</param>
    /// <exception cref="ArgumentException">An unknown name (the message lists the known ones).</exception>
    public static ITokenLoss Create(string name, double maxCompletionLength = 512, KlPenalty? kl = null)
    {
        ArgumentNullException.ThrowIfNull(name);
        return name switch
        {
            "grpo" => new ClippedPolicyLoss(new() { Kl = kl }, "grpo"),
            "dapo" => new ClippedPolicyLoss(new() { EpsilonHigh = 0.28, Reduction = TokenReduction.TokenMean, Kl = kl }, "dapo"),
            "dr_grpo" => new ClippedPolicyLoss(new() { Reduction = TokenReduction.ConstantNormalizer(maxCompletionLength), Kl = kl }, "dr_grpo"),
            "bnpo" => new ClippedPolicyLoss(new() { Reduction = TokenReduction.LocalTokenMean, Kl = kl }, "bnpo"),
            "gspo" => new ClippedPolicyLoss(new() { EpsilonLow = 3e-4, EpsilonHigh = 4e-4, Ratio = ImportanceRatio.SequenceMean, Kl = kl }, "gspo"),
            "gspo_token" => new ClippedPolicyLoss(new() { EpsilonLow = 3e-4, EpsilonHigh = 4e-4, Ratio = ImportanceRatio.SequenceMeanToken, Kl = kl }, "gspo_token"),
            "cispo" => new CispoLoss(new() { EpsilonHigh = 5, Kl = kl }),
            "cispo_clip" => new CispoLoss(new() { Bound = CispoBound.Clip, EpsilonLow = 0.2, EpsilonHigh = 0.28, Kl = kl }),
            "sapo" => new SapoLoss(new() { Kl = kl }),
            "gmpo" => new GmpoLoss(new() { Kl = kl }),
            "reinforce" => new ReinforceLoss(new() { Kl = kl }),
            "rloo" => new ClippedPolicyLoss(new() { Ratio = ImportanceRatio.SequenceSum, Reduction = new TokenReduction(TokenAggregation.SequenceMeanTokenMean, countEmptySequences: true), Kl = kl }, "rloo"),
            "dual_clip" => new ClippedPolicyLoss(new() { DualClip = 3, Kl = kl }, "dual_clip"),
            _ => throw new ArgumentException($"Unknown policy-gradient loss '{name}'. Known: {string.Join(", ", Names)}.", nameof(name)),
        };
    }
}
