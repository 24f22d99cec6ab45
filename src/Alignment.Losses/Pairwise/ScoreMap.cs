using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>The f-divergence behind a <see cref="ScoreMap"/> (TRL's <c>f_divergence_type</c>).</summary>
public enum ScoreMapKind
{
    /// <summary>Reverse KL, s = u: plain DPO (TRL <c>reverse_kl</c>, the default).</summary>
    ReverseKl,

    /// <summary>Forward KL, s = -exp(-u) (TRL <c>forward_kl</c>).</summary>
    ForwardKl,

    /// <summary>Jensen-Shannon, s = log sigmoid(u) (TRL <c>js_divergence</c>).</summary>
    JensenShannon,

    /// <summary>alpha-divergence, s = exp((alpha - 1) u) / (alpha - 1) (TRL <c>alpha_divergence</c>).</summary>
    AlphaDivergence,
}

/// <summary>
/// The score map of f-DPO (Wang et al. 2024, arXiv 2309.16240; TRL's <c>f_divergence_type</c>): each log-ratio u = l_pol - l_ref
/// becomes a score s = f(u) before a pairwise loss forms its margin Delta = s_w - s_l. Reward metrics keep the raw u.
/// </summary>
/// <remarks>
/// <para>Every pairwise loss of the library's DPO family takes one (<see cref="PairwiseOptions.ScoreMap"/>), so the map is
/// a part that composes with any link, not a flag inside each loss. Reverse KL (s = u) is the identity: the losses are
/// then exactly their usual form.</para>
/// <para>Overflow: the exponentials of forward KL and the alpha-divergence are taken with their exponent clamped at 80,
/// as TRL does for the alpha-divergence in float32 and bfloat16 (e^80 ≈ 5.5e34 stays representable after the loss's own
/// arithmetic); past the clamp the score is constant and its gradient 0. TRL's forward KL does not clamp and overflows to
/// Inf there; here it clamps like the alpha-divergence. alpha within 1e-6 of 1 is reverse KL (the limit), as in TRL.</para>
/// </remarks>
public sealed record ScoreMap
{
    /// <summary>The largest exponent the exponential maps evaluate (TRL's clamp for float32 and bfloat16).</summary>
    public const double ExponentClamp = 80;

    private ScoreMap(ScoreMapKind kind, double alpha)
    {
        Kind = kind;
        Alpha = alpha;
    }

    /// <summary>Which divergence.</summary>
    public ScoreMapKind Kind { get; }

    /// <summary>alpha of the alpha-divergence (NaN for the other kinds).</summary>
    public double Alpha { get; }

    /// <summary>s = u (plain DPO; the default).</summary>
    public static ScoreMap ReverseKl { get; } = new(ScoreMapKind.ReverseKl, double.NaN);

    /// <summary>s = -exp(-u), exponent clamped at <see cref="ExponentClamp"/>.</summary>
    public static ScoreMap ForwardKl { get; } = new(ScoreMapKind.ForwardKl, double.NaN);

    /// <summary>s = log sigmoid(u) = -softplus(-u).</summary>
    public static ScoreMap JensenShannon { get; } = new(ScoreMapKind.JensenShannon, double.NaN);

    /// <summary>
    /// s = exp((alpha - 1) u) / (alpha - 1), exponent clamped at <see cref="ExponentClamp"/>; alpha within 1e-6 of 1 gives
    /// <see cref="ReverseKl"/> (the limit). TRL's default <c>f_alpha_divergence_coef</c> is 0.5; alpha = 0 is forward KL.
    /// </summary>
    /// <param name="alpha">alpha in [-1e6, 1e6].</param>
    /// <exception cref="ArgumentOutOfRangeException">alpha is not finite or outside [-1e6, 1e6].</exception>
    public static ScoreMap AlphaDivergence(double alpha)
    {
        Guard.InClosedRange(alpha, -1e6, 1e6, nameof(alpha));
        return Math.Abs(alpha - 1) < 1e-6 ? ReverseKl : new ScoreMap(ScoreMapKind.AlphaDivergence, alpha);
    }

    /// <summary>Appended to a loss's name: "", "_forward_kl", "_js" or "_alpha{alpha}".</summary>
    public string NameSuffix => Kind switch
    {
        ScoreMapKind.ForwardKl => "_forward_kl",
        ScoreMapKind.JensenShannon => "_js",
        ScoreMapKind.AlphaDivergence => "_alpha" + Alpha.ToString("G6", System.Globalization.CultureInfo.InvariantCulture),
        _ => "",
    };

    /// <summary>The scores s = f(u) of the log-ratios <paramref name="logRatio"/> (differentiable).</summary>
    public Tensor Apply(Tensor logRatio)
    {
        ArgumentNullException.ThrowIfNull(logRatio);
        return Kind switch
        {
            ScoreMapKind.ForwardKl => (-logRatio).clamp_max(ExponentClamp).exp().neg(),
            ScoreMapKind.JensenShannon => PreferenceMath.NegLogSigmoid(logRatio).neg(),
            ScoreMapKind.AlphaDivergence => (logRatio * (Alpha - 1)).clamp_max(ExponentClamp).exp().div(Alpha - 1),
            _ => logRatio.alias(),
        };
    }

    /// <inheritdoc />
    public override string ToString() => Kind == ScoreMapKind.AlphaDivergence ? $"AlphaDivergence({Alpha:G})" : Kind.ToString();
}
