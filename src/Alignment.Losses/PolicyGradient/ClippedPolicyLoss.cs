using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Options of <see cref="ClippedPolicyLoss"/>: clip range, importance ratio, TRL's delta, dual-clip, reduction.
/// Defaults are TRL GRPOTrainer's "grpo" loss type: eps 0.2 / 0.2, token ratio, sequence mean of token means.
/// </summary>
public sealed record ClippedPolicyOptions : PolicyGradientOptions
{
    private double _epsilonLow = 0.2, _epsilonHigh = 0.2;
    private double? _delta, _dualClip;
    private ImportanceRatio _ratio = ImportanceRatio.Token;

    /// <summary>eps_low: the ratio is clipped below at 1 - eps_low. Default 0.2 (TRL epsilon); GSPO uses 3e-4.</summary>
    public double EpsilonLow { get => _epsilonLow; init => _epsilonLow = Guard.InRange(value, 0, 1, nameof(EpsilonLow)); }

    /// <summary>eps_high: clipped above at 1 + eps_high. Default 0.2; DAPO's clip-higher 0.28; GSPO 4e-4.</summary>
    public double EpsilonHigh
    {
        get => _epsilonHigh;
        init => _epsilonHigh = value >= 0 && double.IsFinite(value) ? value
            : throw new ArgumentOutOfRangeException(nameof(EpsilonHigh), value, "eps_high must be finite and >= 0.");
    }

    /// <summary>TRL's delta (INTELLECT-2): the unclipped ratio is capped at delta (&gt; 1 + eps_high). Null (default): off.</summary>
    public double? Delta
    {
        get => _delta;
        init => _delta = value is { } d && !(d > 1 && double.IsFinite(d))
            ? throw new ArgumentOutOfRangeException(nameof(Delta), d, "delta caps the ratio: it must be finite and > 1.")
            : value;
    }

    /// <summary>Dual-clip c (Ye et al. 2020): for A &lt; 0, L_t = min(L_t, -c A). Null (default): off; verl uses 3.</summary>
    public double? DualClip
    {
        get => _dualClip;
        init => _dualClip = value is { } c && !(c > 1 && double.IsFinite(c))
            ? throw new ArgumentOutOfRangeException(nameof(DualClip), c, "the dual-clip constant c must be finite and > 1.")
            : value;
    }

    /// <summary>The importance ratio. Default per token; GSPO: <see cref="ImportanceRatio.SequenceMean"/>.</summary>
    public ImportanceRatio Ratio { get => _ratio; init => _ratio = Guard.Defined(value, nameof(Ratio)); }

    /// <inheritdoc />
    protected override TokenReduction DefaultReduction => TokenReduction.SequenceMeanTokenMean;
}

/// <summary>
/// The clipped-ratio policy loss of PPO (Schulman et al. 2017, arXiv 1707.06347) and GRPO (Shao et al. 2024, arXiv
/// 2402.03300), with DAPO's clip-higher (Yu et al. 2025, arXiv 2503.14476), GSPO's sequence ratio (Zheng et al. 2025,
/// arXiv 2507.18071), dual-clip (Ye et al. 2020, arXiv 1912.09729) and TRL's delta. TRL loss_type grpo, bnpo, dr_grpo,
/// dapo (by reduction), RLOO (sequence-sum ratio).
/// </summary>
/// <remarks>
/// <para>Per token, with rho the importance ratio (<see cref="ClippedPolicyOptions.Ratio"/>) and A the advantage:
/// L_t = -min(rho' A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho' = min(rho, delta) with TRL's delta, else rho; with
/// dual-clip, for A &lt; 0, L_t = min(L_t, -c A). Example: A = 1, log rho = 0.3, eps 0.2: -1.2; eps_high 0.28: -1.28.</para>
/// <para>Gradient: inside the trust region it is -A grad(rho) (at rho = 1, the REINFORCE gradient -A grad l); a clipped
/// token (rho &gt; 1 + eps_high with A &gt; 0, or rho &lt; 1 - eps_low with A &lt; 0) gets exactly 0.</para>
/// <para>Metrics (TRL's): clip_ratio/low_mean, clip_ratio/low_min, clip_ratio/high_mean, clip_ratio/high_max,
/// clip_ratio/region_mean, and those of <see cref="PolicyGradientLoss{TOptions}"/>.</para>
/// </remarks>
public sealed class ClippedPolicyLoss : PolicyGradientLoss<ClippedPolicyOptions>
{
    private readonly string _name;

    /// <summary>Creates the loss (GRPO's defaults without options).</summary>
    /// <param name="options">The options.</param>
    /// <param name="name">The name reported (default "grpo"; the factories pass dapo, gspo, rloo...).</param>
    /// <exception cref="ArgumentException">A sequence-level ratio with a token-summing reduction; delta not above 1 + eps_high.</exception>
    public ClippedPolicyLoss(ClippedPolicyOptions? options = null, string name = "grpo") : base(options ?? new())
    {
        _name = string.IsNullOrWhiteSpace(name) ? throw new ArgumentException("name must not be empty.", nameof(name)) : name;
        RefuseTokenSumming(Options.Ratio, Options.Reduction, _name);
        if (Options.Delta is { } d && d <= 1 + Options.EpsilonHigh)
            throw new ArgumentException($"delta ({d}) must exceed 1 + eps_high ({1 + Options.EpsilonHigh}): it caps the ratio above the clip range.", "options");
    }

    /// <inheritdoc />
    public override string Name => _name;

    /// <inheritdoc />
    private protected override (TokenLink Link, ImportanceRatio Ratio)? Fused =>
        (new ClippedLink(Options.EpsilonLow, Options.EpsilonHigh, Options.Delta, Options.DualClip), Options.Ratio);

    /// <inheritdoc />
    protected override (Tensor PerToken, bool SequenceLevel) PolicyTerm(TokenTerms terms, Tensor logRatio, List<(string Name, Tensor Value)> metrics)
    {
        ArgumentNullException.ThrowIfNull(terms);
        ArgumentNullException.ThrowIfNull(metrics);
        var a = terms.Advantages!;
        var rho = Ratio(terms, logRatio, Options.Ratio);
        var clipped = rho.clamp(1 - Options.EpsilonLow, 1 + Options.EpsilonHigh);
        var capped = Options.Delta is { } delta ? rho.clamp_max(delta) : rho;
        var loss = -minimum(capped * a, clipped * a);
        if (Options.DualClip is { } c)
            loss = loss.where(a >= 0, minimum(loss, a * -c));
        bool perSequence = IsSequenceLevel(Options.Ratio);
        using (no_grad())
        {
            var r = rho.detach();
            var low = (r < 1 - Options.EpsilonLow) & (a < 0);
            var high = (r > 1 + Options.EpsilonHigh) & (a > 0);
            var nonEmpty = terms.TokenCounts > 0;
            var lowPerSeq = terms.SequenceMean(low.to_type(terms.DType));
            var highPerSeq = terms.SequenceMean(high.to_type(terms.DType));
            var inf = full_like(lowPerSeq, double.PositiveInfinity);
            metrics.Add((MetricNames.ClipRatioLowMean, Fraction(terms, low, perSequence)));
            metrics.Add((MetricNames.ClipRatioLowMin, MinOrZero(lowPerSeq.where(nonEmpty, inf))));
            metrics.Add((MetricNames.ClipRatioHighMean, Fraction(terms, high, perSequence)));
            metrics.Add((MetricNames.ClipRatioHighMax, MinOrZero(-highPerSeq.where(nonEmpty, -inf)) * -1));
            metrics.Add((MetricNames.ClipRatioRegionMean, Fraction(terms, low | high, perSequence)));
        }
        return (loss, perSequence);
    }

    /// <summary>The minimum of per-sequence values where non-empty ones are finite, 0 when every sequence is empty.</summary>
    private static Tensor MinOrZero(Tensor values)
    {
        var m = values.min();
        return m.where(isfinite(m), zeros_like(m));
    }
}
