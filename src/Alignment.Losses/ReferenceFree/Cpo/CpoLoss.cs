using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>CPO's preference term (TRL's CPOConfig <c>loss_type</c>).</summary>
public enum CpoLossType
{
    /// <summary>(1 - eps) softplus(-beta x) + eps softplus(beta x), x = r_w - r_l from summed log-probs.</summary>
    Sigmoid,

    /// <summary>relu(1 - beta x), x = r_w - r_l from summed log-probs.</summary>
    Hinge,

    /// <summary>(x - 1/(2 beta))^2 with x = r_w - r_l from per-token means (TRL averages for this type).</summary>
    Ipo,

    /// <summary>
    /// SimPO's term inside CPO: (1 - eps) softplus(-beta x) + eps softplus(beta x), x = r_w - r_l - gamma / beta from
    /// per-token means. With cpo_alpha &gt; 0 (TRL's default 1) this is CPO-SimPO; with cpo_alpha = 0 it is
    /// <see cref="SimPoLoss"/>.
    /// </summary>
    Simpo,
}

/// <summary>Options of <see cref="CpoLoss"/>: the fields of TRL's CPOConfig that shape the loss.</summary>
public sealed record CpoOptions : BetaOptions
{
    /// <summary>The preference term. Default <see cref="CpoLossType.Sigmoid"/>.</summary>
    public CpoLossType LossType { get => field; init => field = Guard.Defined(value, nameof(LossType)); } = CpoLossType.Sigmoid;

    /// <summary>Label smoothing eps in [0, 0.5) of the sigmoid and simpo terms. Default 0.</summary>
    public double LabelSmoothing { get; init => field = Guard.InRange(value, 0, 0.5, nameof(LabelSmoothing)); }

    /// <summary>cpo_alpha in [0, 1e12], the weight of the chosen responses' NLL. Default 1 (TRL's and the paper's).</summary>
    public double CpoAlpha { get; init => field = Guard.Weight(value, nameof(CpoAlpha)); } = 1.0;

    /// <summary>simpo_gamma in [0, 1e12], SimPO's target margin, read by <see cref="CpoLossType.Simpo"/> only. Default 0.5 (TRL's).</summary>
    public double SimpoGamma { get; init => field = Guard.Weight(value, nameof(SimpoGamma)); } = 0.5;

    /// <summary>
    /// alpha in [-1e3, 1e3], AlphaPO's reward shape for every loss type (TRL's CPOConfig <c>alpha</c>): r = (1 - p^(-alpha)) /
    /// alpha with p = exp(l) (summed log-probs for sigmoid and hinge, per-token means for ipo and simpo); alpha = 0 (default,
    /// TRL's) is r = l.
    /// </summary>
    public double Alpha { get; init => field = Guard.InClosedRange(value, -1e3, 1e3, nameof(Alpha)); }
}

/// <summary>
/// CPO, Contrastive Preference Optimization (Xu et al. 2024, arXiv 2401.08417), as TRL's CPOTrainer computes it for every
/// <c>loss_type</c>: DPO without the reference model plus a behaviour-cloning NLL on the chosen responses; with the simpo
/// type it is CPO-SimPO, with alpha the AlphaPO reward shape.
/// </summary>
/// <remarks>
/// <para>Per pair, with x_w, x_l the summed log-probs (sigmoid, hinge) or per-token means (ipo, simpo) and the reward
/// r = x (alpha = 0) or -expm1(-alpha x) / alpha (= (1 - p^(-alpha)) / alpha, TRL's form, written so that it stays exact as
/// alpha → 0): z = r_w - r_l (minus simpo_gamma / beta for simpo), and pref(z) from <see cref="CpoLossType"/>.
/// Loss = mean_i pref_i + cpo_alpha * NLL, NLL the chosen responses' token-weighted mean negative log-likelihood over the
/// batch, -sum l_w / sum n_w (TRL's cross-entropy; spread over the pairs so that <see cref="PreferenceLossResult.PerExample"/>
/// averages to the loss). Needs chosen token counts (and rejected ones for ipo and simpo). Reference-free: passing
/// reference log-probs is an error.</para>
/// <para>Metrics as TRL logs them: rewards beta * r; logps/chosen and logps/rejected of the log-probs the loss uses (per-token
/// means for ipo and simpo); nll_loss (0 when cpo_alpha = 0, as TRL reports it). Gradient: chosen up, rejected down
/// (sigmoid and simpo without smoothing, hinge below its margin, ipo below its target); the AlphaPO shape keeps the signs
/// (dr/dx = p^(-alpha) &gt; 0). A large alpha on summed log-probs overflows exp(-alpha l): an
/// <see cref="ArithmeticException"/> names the options.</para>
/// </remarks>
public sealed class CpoLoss : PreferenceLoss<CpoOptions>
{
    /// <summary>Creates the loss; default sigmoid, beta 0.1, cpo_alpha 1.</summary>
    public CpoLoss(CpoOptions? options = null) : base(options ?? new CpoOptions()) { }

    /// <inheritdoc />
    /// <remarks>cpo, cpo_hinge, cpo_ipo, cpo_simpo; for the simpo type without NLL, simpo (alpha = 0) or alphapo.</remarks>
    public override string Name => Options.LossType switch
    {
        CpoLossType.Hinge => "cpo_hinge",
        CpoLossType.Ipo => "cpo_ipo",
        CpoLossType.Simpo when Options.CpoAlpha == 0 => Options.Alpha == 0 ? "simpo" : "alphapo",
        CpoLossType.Simpo => "cpo_simpo",
        _ => "cpo",
    };

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override ReferenceUse ReferenceUse => ReferenceUse.Refused;

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        bool means = Options.LossType is CpoLossType.Ipo or CpoLossType.Simpo;
        var (chosen, rejected) = means ? ReferenceFreeMath.Means(terms, Name) : (terms.PolicyChosen, terms.PolicyRejected);
        var (rw, rl) = (ReferenceFreeMath.AlphaReward(chosen, Options.Alpha), ReferenceFreeMath.AlphaReward(rejected, Options.Alpha));
        double beta = Options.Beta;
        var z = Options.LossType == CpoLossType.Simpo ? rw - rl - Options.SimpoGamma / beta : rw - rl;
        var preference = Options.LossType switch
        {
            CpoLossType.Hinge => nn.functional.relu(1 - z * beta),
            CpoLossType.Ipo => (z - 1 / (2 * beta)).square(),
            _ => PreferenceMath.LabelSmoothed(z * beta, Options.LabelSmoothing),
        };
        Tensor nll;
        if (Options.CpoAlpha > 0)
        {
            (var nllPerPair, nll) = ReferenceFreeMath.TokenWeightedNll(terms, Name);
            preference = preference + nllPerPair * Options.CpoAlpha;
        }
        else nll = zeros(1, dtype: terms.DType, device: preference.device).squeeze();   // TRL: nll_loss = 0 when cpo_alpha = 0
        return new(preference, new[] { (MetricNames.NllLoss, nll) }) { Rewards = (rw * beta, rl * beta), Logps = means ? (chosen, rejected) : null };
    }

    /// <summary>CPO with default (or given) options. The policy log-probs must carry token counts.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, CpoOptions? options = null) =>
        new CpoLoss(options).Compute(new PreferenceBatch(policy));
}
