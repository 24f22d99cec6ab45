using Alignment.Losses.Internal;

namespace Alignment.Losses;

/// <summary>Options of <see cref="DpoNllLoss"/>: beta and the score map of the DPO term, and the NLL weight.</summary>
public sealed record DpoNllOptions : PairwiseOptions
{
    /// <summary>alpha in [0, 1e12], the weight of the NLL term (TRL's <c>rpo_alpha</c>). Default 1, as in Pang et al.</summary>
    public double NllWeight { get; init => field = Guard.Weight(value, nameof(NllWeight)); } = 1.0;
}

/// <summary>
/// DPO plus a negative log-likelihood term on the chosen response (Pang et al. 2024, "Iterative Reasoning Preference
/// Optimization", arXiv 2404.19733). TRL exposes it as <c>rpo_alpha</c>; it is not Relative Preference Optimization
/// (<see cref="RpoLoss"/>).
/// </summary>
/// <remarks>
/// <para>Per pair: L = softplus(-beta * h) + alpha * NLL_w, with NLL_w = -l_pol(y_w) / n_w, the chosen response's
/// log-likelihood normalised by its length as in the paper. Needs chosen token counts.</para>
/// <para>TRL averages the NLL over all chosen tokens of the batch instead (a token-weighted mean); the two agree when
/// all chosen responses have the same length.</para>
/// </remarks>
public sealed class DpoNllLoss : PreferenceLoss<DpoNllOptions>
{
    /// <summary>Creates the loss; default beta 0.1, alpha 1.</summary>
    public DpoNllLoss(DpoNllOptions? options = null) : base(options ?? new DpoNllOptions()) { }

    /// <inheritdoc />
    public override string Name => "dpo_nll" + Options.ScoreMap.NameSuffix;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var (nw, _) = terms.TokenCounts(Name, needRejected: false);
        var nll = -terms.PolicyChosen / nw;
        var perExample = PreferenceMath.NegLogSigmoid(terms.ScoreMargin(Options.ScoreMap) * Options.Beta) + nll * Options.NllWeight;
        return new(perExample, new[] { (MetricNames.NllLoss, nll.mean()) });
    }

    /// <summary>DPO+NLL with default (or given) options. The policy log-probs must carry token counts.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, DpoNllOptions? options = null) =>
        new DpoNllLoss(options).Compute(new PreferenceBatch(policy, reference));
}
