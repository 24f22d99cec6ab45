using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>The two conventions of CISPO's importance-weight bound.</summary>
public enum CispoBound
{
    /// <summary>w = min(rho, eps_high) with eps_high an absolute cap (TRL, Liger; MiniMax recommends 5). TRL "cispo".</summary>
    Cap,

    /// <summary>w = clip(rho, 1 - eps_low, 1 + eps_high) (verl, NeMo-RL).</summary>
    Clip,
}

/// <summary>
/// Options of <see cref="CispoLoss"/>. <see cref="EpsilonHigh"/> is required: TRL falls back to epsilon (0.2) when it is
/// unset, which under the cap convention silently caps every weight at 0.2; here the caller must choose.
/// </summary>
public sealed record CispoOptions : PolicyGradientOptions
{
    private double _epsilonLow = 0.2;
    private double? _epsilonHigh;
    private CispoBound _bound = CispoBound.Cap;
    private ImportanceRatio _ratio = ImportanceRatio.Token;

    /// <summary>The bound's convention. Default <see cref="CispoBound.Cap"/> (TRL's).</summary>
    public CispoBound Bound { get => _bound; init => _bound = Guard.Defined(value, nameof(Bound)); }

    /// <summary>eps_high: the absolute cap (<see cref="CispoBound.Cap"/>, e.g. 5) or the upper clip offset (<see cref="CispoBound.Clip"/>). Required.</summary>
    public double? EpsilonHigh
    {
        get => _epsilonHigh;
        init => _epsilonHigh = value is { } e && !(e > 0 && double.IsFinite(e))
            ? throw new ArgumentOutOfRangeException(nameof(EpsilonHigh), e, "eps_high must be positive and finite.")
            : value;
    }

    /// <summary>eps_low of <see cref="CispoBound.Clip"/> (unused by the cap). Default 0.2.</summary>
    public double EpsilonLow { get => _epsilonLow; init => _epsilonLow = Guard.InRange(value, 0, 1, nameof(EpsilonLow)); }

    /// <summary>The importance ratio the weight is taken from (token by default; TRL allows sequence).</summary>
    public ImportanceRatio Ratio { get => _ratio; init => _ratio = Guard.Defined(value, nameof(Ratio)); }

    /// <inheritdoc />
    protected override TokenReduction DefaultReduction => TokenReduction.TokenMean;
}

/// <summary>
/// CISPO, clipped importance-sampling-weight policy optimisation (MiniMax-M1, arXiv 2506.13585); TRL loss_type "cispo".
/// </summary>
/// <remarks>
/// <para>Per token: L_t = -sg(w_t) A_t l_t with w the bounded importance ratio (<see cref="CispoBound"/>): every token keeps a
/// gradient (REINFORCE weighted by w), unlike PPO's clip, which zeroes clipped tokens. Example at log rho = 0.3, A = 1:
/// w = 1.3498588 with cap 5, 1.2 with clip 0.2 / 0.2. Reduction: token mean by default (TRL). Metric cispo_clip_ratio:
/// the fraction of tokens whose weight was bounded above with A &gt; 0.</para>
/// </remarks>
public sealed class CispoLoss : PolicyGradientLoss<CispoOptions>
{
    /// <summary>Creates the loss.</summary>
    /// <exception cref="ArgumentException">EpsilonHigh is not set (no silent default).</exception>
    public CispoLoss(CispoOptions options) : base(options)
    {
        if (Options.EpsilonHigh is null)
            throw new ArgumentException(
                "CISPO needs options.EpsilonHigh: the absolute cap of the importance weight (CispoBound.Cap; MiniMax and TRL recommend 5) or the upper " +
                "clip offset (CispoBound.Clip). There is no default: TRL's fallback to epsilon 0.2 caps every weight at 0.2 under the cap convention.",
                "options.EpsilonHigh");
    }

    /// <inheritdoc />
    public override string Name => Options.Bound == CispoBound.Cap ? "cispo" : "cispo_clip";

    /// <inheritdoc />
    private protected override (TokenLink Link, ImportanceRatio Ratio)? Fused =>
        (new CispoLink(Options.Bound == CispoBound.Cap, Options.EpsilonLow, Options.EpsilonHigh!.Value), Options.Ratio);

    /// <inheritdoc />
    protected override (Tensor PerToken, bool SequenceLevel) PolicyTerm(TokenTerms terms, Tensor logRatio, List<(string Name, Tensor Value)> metrics)
    {
        ArgumentNullException.ThrowIfNull(terms);
        ArgumentNullException.ThrowIfNull(metrics);
        var a = terms.Advantages!;
        double high = Options.EpsilonHigh!.Value;
        Tensor w;
        Tensor bounded;
        using (no_grad())
        {
            var rho = Ratio(terms, logRatio.detach(), Options.Ratio).detach();
            if (Options.Bound == CispoBound.Cap)
            {
                w = rho.clamp_max(high);
                bounded = rho > high;
            }
            else
            {
                w = rho.clamp(1 - Options.EpsilonLow, 1 + high);
                bounded = rho > 1 + high;
            }
            metrics.Add((MetricNames.CispoClipRatio, Fraction(terms, bounded & (a > 0), perSequence: false)));
        }
        return (-(w * a) * terms.LogProbs, false);
    }
}
