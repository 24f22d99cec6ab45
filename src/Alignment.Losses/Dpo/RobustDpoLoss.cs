using Alignment.Losses.Internal;

namespace Alignment.Losses;

/// <summary>Options of <see cref="RobustDpoLoss"/>.</summary>
public sealed record RobustDpoOptions : PreferenceLossOptions
{
    /// <summary>beta &gt; 0. Default 0.1.</summary>
    public double Beta { get; init => field = Guard.Positive(value, nameof(Beta)); } = 0.1;

    /// <summary>Label-flip rate eps in [0, 0.5) (the estimator divides by 1 - 2 eps). Default 0.1. eps = 0 is DPO.</summary>
    public double LabelSmoothing { get; init => field = Guard.InRange(value, 0, 0.5, nameof(LabelSmoothing)); } = 0.1;
}

/// <summary>
/// Robust DPO (Chowdhury et al., ICML 2024, arXiv 2403.00409, "Provably Robust DPO"); TRL loss_type "robust".
/// </summary>
/// <remarks>
/// <para>Per pair: L = [(1 - eps) * softplus(-beta * h) - eps * softplus(beta * h)] / (1 - 2 eps).</para>
/// <para>Unbiased under label noise: the expectation over labels flipped with probability eps equals clean DPO at every h.
/// Its gradient has DPO's sign everywhere (chosen up, rejected down). The loss can be negative for large margins.</para>
/// </remarks>
public sealed class RobustDpoLoss : PreferenceLoss<RobustDpoOptions>
{
    /// <summary>Creates the loss; default beta 0.1, eps 0.1.</summary>
    public RobustDpoLoss(RobustDpoOptions? options = null) : base(options ?? new RobustDpoOptions()) { }

    /// <inheritdoc />
    public override string Name => "robust_dpo";

    private protected override double RewardScale => Options.Beta;

    private protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var z = terms.Margin * Options.Beta;
        var eps = Options.LabelSmoothing;
        return new((Numerics.NegLogSigmoid(z) * (1 - eps) - Numerics.NegLogSigmoid(-z) * eps) / (1 - 2 * eps));
    }

    /// <summary>Robust DPO with default (or given) options.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, RobustDpoOptions? options = null) =>
        new RobustDpoLoss(options).Compute(new PreferenceBatch(policy, reference));
}
