using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Options of <see cref="ReinforceLoss"/>: the reduction (token mean by default, as GPG).</summary>
public sealed record ReinforceOptions : PolicyGradientOptions
{
    /// <inheritdoc />
    protected override TokenReduction DefaultReduction => TokenReduction.TokenMean;
}

/// <summary>
/// REINFORCE / GPG (Williams 1992; GPG, Chu et al. 2025, arXiv 2504.02546): L_t = -A_t l_t, the plain policy gradient
/// without a ratio. With token advantages A_t = sg(l_teacher - l_student) it is on-policy distillation; with a
/// <see cref="RolloutCorrection"/> it is importance-weighted by the detached rollout weights.
/// </summary>
public sealed class ReinforceLoss : PolicyGradientLoss<ReinforceOptions>
{
    /// <summary>Creates the loss.</summary>
    public ReinforceLoss(ReinforceOptions? options = null) : base(options ?? new()) { }

    /// <inheritdoc />
    public override string Name => "reinforce";

    /// <inheritdoc />
    private protected override (TokenLink Link, ImportanceRatio Ratio)? Fused =>
        (new Alignment.Losses.Internal.ReinforceLink(), ImportanceRatio.Token);

    /// <inheritdoc />
    protected override (Tensor PerToken, bool SequenceLevel) PolicyTerm(TokenTerms terms, Tensor logRatio, List<(string Name, Tensor Value)> metrics)
    {
        ArgumentNullException.ThrowIfNull(terms);
        return (-terms.Advantages! * terms.LogProbs, false);
    }
}
