using Alignment.Losses.Internal;

namespace Alignment.Losses;

/// <summary>The two APO variants.</summary>
public enum ApoAnchor
{
    /// <summary>apo_zero (Eq. 7): the chosen responses are better than the model's outputs; raise the chosen, lower the rejected.</summary>
    Zero,

    /// <summary>apo_down (Eq. 8): the chosen responses are worse than the model's outputs; lower the chosen, and the rejected more.</summary>
    Down,
}

/// <summary>Options of <see cref="ApoLoss"/>: beta, the score map (apo_down's margin term only) and the anchor.</summary>
public sealed record ApoOptions : PairwiseOptions
{
    /// <summary>Zero (default) or Down.</summary>
    public ApoAnchor Anchor { get; init => field = Guard.Defined(value, nameof(Anchor)); } = ApoAnchor.Zero;
}

/// <summary>
/// APO, anchored preference optimization (D'Oosterlinck et al. 2024, arXiv 2408.06266); TRL loss_type "apo_zero" and
/// "apo_down".
/// </summary>
/// <remarks>
/// <para>apo_zero: L = (1 - sigmoid(beta u_w)) + sigmoid(beta u_l), on the raw log-ratios (no score map, as in TRL): the
/// chosen response is pushed up and the rejected one down, each anchored at the reference (u = 0).</para>
/// <para>apo_down: L = sigmoid(beta u_w) + (1 - sigmoid(beta Delta)), the margin Delta = s_w - s_l with the score map. Use
/// it when the chosen responses are worse than what the model already produces. <b>Gradient-sign exception, by
/// design:</b> the rejected response is always pushed down, but the chosen response is pushed <i>down</i> wherever
/// sigmoid'(beta u_w) &gt; sigmoid'(beta Delta) * ds_w/du_w (for example at initialisation: both derivatives are 1/4 and
/// the two terms cancel exactly; any u_w &lt; Delta in magnitude tips it down).</para>
/// <para>Loss at initialisation: 1 for both variants.</para>
/// </remarks>
public sealed class ApoLoss : PreferenceLoss<ApoOptions>
{
    /// <summary>Creates the loss; default beta 0.1, apo_zero.</summary>
    public ApoLoss(ApoOptions? options = null) : base(options ?? new ApoOptions()) { }

    /// <inheritdoc />
    /// <remarks>"apo_zero", or "apo_down" with the score map's suffix.</remarks>
    public override string Name => Options.Anchor == ApoAnchor.Down ? "apo_down" + Options.ScoreMap.NameSuffix : "apo_zero";

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override PairLink? Link => Options.Anchor == ApoAnchor.Zero ? PairLink.ApoZero(Options.Beta)
        : Options.ScoreMap.Kind == ScoreMapKind.ReverseKl ? PairLink.ApoDown(Options.Beta) : null;   // APO-down maps only its margin's scores

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        double beta = Options.Beta;
        if (Options.Anchor == ApoAnchor.Zero)
            return new((terms.ChosenLogRatio * beta).neg().sigmoid() + (terms.RejectedLogRatio * beta).sigmoid());   // 1 - sigmoid(x) = sigmoid(-x)
        return new((terms.ChosenLogRatio * beta).sigmoid() + (terms.ScoreMargin(Options.ScoreMap) * beta).neg().sigmoid());
    }

    /// <summary>APO with default (or given) options.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, ApoOptions? options = null) =>
        new ApoLoss(options).Compute(new PreferenceBatch(policy, reference));
}
