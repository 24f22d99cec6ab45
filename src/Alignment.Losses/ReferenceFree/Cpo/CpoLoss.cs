using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>CPO's preference term (TRL's CPOConfig <c>loss_type</c>).</summary>
public enum CpoLossType
{
    /// <summary>(1 - eps) softplus(-beta x) + eps softplus(beta x), x = l_w - l_l (summed log-probs).</summary>
    Sigmoid,

    /// <summary>relu(1 - beta x), x = l_w - l_l.</summary>
    Hinge,

    /// <summary>(x - 1/(2 beta))^2 with x = a_w - a_l from per-token means (TRL averages for this type).</summary>
    Ipo,
}

/// <summary>Options of <see cref="CpoLoss"/>.</summary>
public sealed record CpoOptions : BetaOptions
{
    /// <summary>The preference term. Default <see cref="CpoLossType.Sigmoid"/>.</summary>
    public CpoLossType LossType { get => field; init => field = Guard.Defined(value, nameof(LossType)); } = CpoLossType.Sigmoid;

    /// <summary>Label smoothing eps in [0, 0.5) of the sigmoid term. Default 0.</summary>
    public double LabelSmoothing { get; init => field = Guard.InRange(value, 0, 0.5, nameof(LabelSmoothing)); }

    /// <summary>cpo_alpha in [0, 1e12], the weight of the chosen responses' NLL. Default 1 (TRL's and the paper's).</summary>
    public double CpoAlpha { get; init => field = Guard.Weight(value, nameof(CpoAlpha)); } = 1.0;
}

/// <summary>
/// CPO, Contrastive Preference Optimization (Xu et al. 2024, arXiv 2401.08417; TRL's CPOTrainer): DPO without the
/// reference model plus a behaviour-cloning NLL on the chosen responses.
/// </summary>
/// <remarks>
/// <para>Loss = mean_i pref(x_i) + cpo_alpha * NLL, with pref from <see cref="CpoLossType"/> and NLL the chosen responses'
/// token-weighted mean negative log-likelihood over the batch, -sum l_w / sum n_w (as TRL's cross-entropy; spread over
/// the pairs so that <see cref="PreferenceLossResult.PerExample"/> averages to the loss). Needs chosen token counts
/// (and rejected ones for the ipo type). Reference-free: passing reference log-probs is an error.</para>
/// <para>Metrics: the standard ones with rewards beta * l (beta * a for ipo), and nll_loss. Gradient: chosen up,
/// rejected down (sigmoid without smoothing, hinge below its margin, ipo below its target).</para>
/// </remarks>
public sealed class CpoLoss : PreferenceLoss<CpoOptions>
{
    /// <summary>Creates the loss; default sigmoid, beta 0.1, cpo_alpha 1.</summary>
    public CpoLoss(CpoOptions? options = null) : base(options ?? new CpoOptions()) { }

    /// <inheritdoc />
    public override string Name => Options.LossType switch { CpoLossType.Hinge => "cpo_hinge", CpoLossType.Ipo => "cpo_ipo", _ => "cpo" };

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override ReferenceUse ReferenceUse => ReferenceUse.Refused;

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var (chosen, rejected) = Options.LossType == CpoLossType.Ipo ? ReferenceFreeMath.Means(terms, Name) : (terms.PolicyChosen, terms.PolicyRejected);
        var x = chosen - rejected;
        double beta = Options.Beta;
        var preference = Options.LossType switch
        {
            CpoLossType.Hinge => nn.functional.relu(1 - x * beta),
            CpoLossType.Ipo => (x - 1 / (2 * beta)).square(),
            _ => PreferenceMath.LabelSmoothed(x * beta, Options.LabelSmoothing),
        };
        var metrics = new List<(string, Tensor)>();
        if (Options.CpoAlpha > 0 || batch.Policy.ChosenTokenCounts is not null)   // cpo_alpha = 0 needs no counts (TRL: nll 0)
        {
            var (nllPerPair, nll) = ReferenceFreeMath.TokenWeightedNll(terms, Name);
            if (Options.CpoAlpha > 0) preference = preference + nllPerPair * Options.CpoAlpha;
            metrics.Add((MetricNames.NllLoss, nll));
        }
        return new(preference, metrics) { Rewards = (chosen * beta, rejected * beta) };
    }

    /// <summary>CPO with default (or given) options. The policy log-probs must carry token counts.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, CpoOptions? options = null) =>
        new CpoLoss(options).Compute(new PreferenceBatch(policy));
}
