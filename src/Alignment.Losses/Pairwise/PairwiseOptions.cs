using Alignment.Losses.Internal;

namespace Alignment.Losses;

/// <summary>Options of the losses scaled by beta, the inverse temperature of the implicit reward beta * log(pi / pi_ref).</summary>
public abstract record BetaOptions : PreferenceLossOptions
{
    /// <summary>beta in [1e-12, 1e12]. Default 0.1 (TRL's and most papers').</summary>
    public double Beta { get; init => field = Guard.Scale(value, nameof(Beta)); } = 0.1;
}

/// <summary>
/// Options shared by the pairwise losses of the DPO family: beta, and the score map applied to the log-ratios before the
/// margin is formed (TRL's <c>f_divergence_type</c>).
/// </summary>
public abstract record PairwiseOptions : BetaOptions
{
    /// <summary>The f-divergence score map. Default <see cref="ScoreMap.ReverseKl"/> (plain DPO).</summary>
    public ScoreMap ScoreMap { get; init => field = value ?? throw new ArgumentNullException(nameof(ScoreMap)); } = ScoreMap.ReverseKl;
}
