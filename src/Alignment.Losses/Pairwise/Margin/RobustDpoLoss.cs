using Alignment.Losses.Internal;

namespace Alignment.Losses;

/// <summary>Options of <see cref="RobustDpoLoss"/>: beta, the score map, and the label-flip rate.</summary>
public sealed record RobustDpoOptions : PairwiseOptions
{
    /// <summary>Label-flip rate eps in [0, 0.5) (the estimator divides by 1 - 2 eps). Default 0.1. eps = 0 is DPO.</summary>
    public double LabelSmoothing { get; init => field = Guard.InRange(value, 0, 0.5, nameof(LabelSmoothing)); } = 0.1;
}

/// <summary>
/// Robust DPO (Chowdhury et al., ICML 2024, arXiv 2403.00409, "Provably Robust DPO"); TRL loss_type "robust".
/// </summary>
/// <remarks>
/// <para>Per pair: L = [(1 - eps) * softplus(-beta * h) - eps * softplus(beta * h)] / (1 - 2 eps), computed in the equal form
/// softplus(-beta * h) - eps * beta * h / (1 - 2 eps), which does not cancel as eps approaches 1/2.</para>
/// <para>Unbiased under label noise: the expectation over labels flipped with probability eps equals clean DPO at every h.
/// Its gradient has DPO's sign everywhere (chosen up, rejected down). The loss can be negative for large margins.</para>
/// </remarks>
public sealed class RobustDpoLoss : PreferenceLoss<RobustDpoOptions>
{
    /// <summary>Creates the loss; default beta 0.1, eps 0.1.</summary>
    public RobustDpoLoss(RobustDpoOptions? options = null) : base(options ?? new RobustDpoOptions()) { }

    /// <inheritdoc />
    public override string Name => "robust_dpo" + Options.ScoreMap.NameSuffix;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override PairLink? Link =>
        MarginLink.Logistic(Options.Beta, -Options.LabelSmoothing / (1 - 2 * Options.LabelSmoothing)).OnScores(Options.ScoreMap);

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        // [(1 - eps) softplus(-z) - eps softplus(z)] / (1 - 2 eps) = softplus(-z) - eps z / (1 - 2 eps), since
        // softplus(z) = softplus(-z) + z: the written form subtracts two nearly equal terms as eps -> 1/2 and loses
        // float32 precision (7.9e-5 at eps 0.4999); this one does not
        var z = terms.ScoreMargin(Options.ScoreMap) * Options.Beta;
        var eps = Options.LabelSmoothing;
        return new(PreferenceMath.NegLogSigmoid(z) - z * (eps / (1 - 2 * eps)));
    }

    /// <summary>Robust DPO with default (or given) options.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, RobustDpoOptions? options = null) =>
        new RobustDpoLoss(options).Compute(new PreferenceBatch(policy, reference));
}
