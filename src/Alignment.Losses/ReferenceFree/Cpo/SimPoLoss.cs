using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Options of <see cref="SimPoLoss"/>.</summary>
public record SimPoOptions : BetaOptions
{
    /// <summary>
    /// gamma in [0, 1e12], the target reward margin (TRL's <c>simpo_gamma</c>): the logit is beta (a_w - a_l) - gamma. Default
    /// 0.5 (TRL). The paper's recipes use beta 2-10 with gamma/beta 0.3-1.6 (e.g. Llama-3-Instruct: beta 2.5, gamma/beta 0.55).
    /// </summary>
    public double Gamma { get; init => field = Guard.Weight(value, nameof(Gamma)); } = 0.5;

    /// <summary>Label smoothing eps in [0, 0.5). Default 0.</summary>
    public double LabelSmoothing { get; init => field = Guard.InRange(value, 0, 0.5, nameof(LabelSmoothing)); }
}

/// <summary>
/// SimPO, Simple Preference Optimization (Meng et al. 2024, arXiv 2405.14734; TRL CPOTrainer <c>loss_type="simpo"</c>,
/// <c>cpo_alpha=0</c>): a reference-free, length-normalised margin loss with a target margin.
/// </summary>
/// <remarks>
/// <para>Per pair, with per-token means a = l / n: z = beta (a_w - a_l) - gamma and L = (1 - eps) softplus(-z) + eps softplus(z).
/// With eps = 0 the gradient is always chosen up and rejected down, and its magnitude sigmoid(-z) halves where the
/// per-token margin a_w - a_l reaches gamma / beta (the target margin). Needs both token counts; reference-free.
/// Rewards are reported as beta * a and logps/* as the per-token means, as TRL logs them. This is the paper's SimPO
/// (TRL's CPOConfig with loss_type simpo and cpo_alpha 0); TRL's default cpo_alpha 1 adds the NLL (CPO-SimPO:
/// <see cref="CpoLoss"/> with <see cref="CpoLossType.Simpo"/>).</para>
/// </remarks>
public class SimPoLoss : PreferenceLoss<SimPoOptions>
{
    /// <summary>Creates the loss; default beta 0.1, gamma 0.5 (TRL's defaults).</summary>
    public SimPoLoss(SimPoOptions? options = null) : base(options ?? new SimPoOptions()) { }

    /// <inheritdoc />
    public override string Name => "simpo";

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override ReferenceUse ReferenceUse => ReferenceUse.Refused;

    /// <summary>The per-response reward before beta: the per-token mean log-prob a (AlphaPO transforms it).</summary>
    private protected virtual Tensor Reward(Tensor meanLogp) => meanLogp;

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var (aw, al) = ReferenceFreeMath.Means(terms, Name);
        var (rw, rl) = (Reward(aw), Reward(al));
        var z = (rw - rl) * Options.Beta - Options.Gamma;
        return new(PreferenceMath.LabelSmoothed(z, Options.LabelSmoothing)) { Rewards = (rw * Options.Beta, rl * Options.Beta), Logps = (aw, al) };
    }

    /// <summary>SimPO with default (or given) options. The policy log-probs must carry token counts.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, SimPoOptions? options = null) =>
        new SimPoLoss(options).Compute(new PreferenceBatch(policy));
}

/// <summary>Options of <see cref="AlphaPoLoss"/>: SimPO's, plus alpha.</summary>
public sealed record AlphaPoOptions : SimPoOptions
{
    /// <summary>
    /// alpha in [-1e3, 1e3], the reward shape (TRL's CPOConfig <c>alpha</c>): r = (1 - p^(-alpha)) / alpha with p = exp(a);
    /// alpha = 0 is SimPO's r = a. Default 0.25 (the paper's range is about 0.1-1).
    /// </summary>
    public double Alpha { get; init => field = Guard.InClosedRange(value, -1e3, 1e3, nameof(Alpha)); } = 0.25;
}

/// <summary>
/// AlphaPO (Gupta et al. 2025, arXiv 2501.03884; TRL CPOTrainer with <c>alpha</c>): SimPO with the reward
/// r = (1 - p^(-alpha)) / alpha, p = exp(a), computed as -expm1(-alpha a) / alpha (exact as alpha → 0, where r → a).
/// </summary>
/// <remarks>
/// Positive alpha bends the reward so that already-unlikely responses move less (the paper's fix for likelihood
/// displacement). The gradient keeps SimPO's signs: dr/da = p^(-alpha) &gt; 0. Very negative a with large alpha overflows
/// exp(-alpha a): an <see cref="ArithmeticException"/> names the options.
/// </remarks>
public sealed class AlphaPoLoss : SimPoLoss
{
    /// <summary>Creates the loss; default beta 0.1, gamma 0.5, alpha 0.25.</summary>
    public AlphaPoLoss(AlphaPoOptions? options = null) : base(options ?? new AlphaPoOptions()) { }

    private double Alpha => ((AlphaPoOptions)Options).Alpha;

    /// <inheritdoc />
    public override string Name => "alphapo";

    private protected override Tensor Reward(Tensor meanLogp) => ReferenceFreeMath.AlphaReward(meanLogp, Alpha);

    /// <summary>AlphaPO with default (or given) options. The policy log-probs must carry token counts.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, AlphaPoOptions? options) =>
        new AlphaPoLoss(options).Compute(new PreferenceBatch(policy));
}
