using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Options of <see cref="GmpoLoss"/>: the log-space clip range (paper: 0.4 each side).</summary>
public sealed record GmpoOptions : PolicyGradientOptions
{
    private double _epsilonLow = 0.4, _epsilonHigh = 0.4;

    /// <summary>The lower clip of l - l_old in log space. Default 0.4.</summary>
    public double EpsilonLow { get => _epsilonLow; init => _epsilonLow = Guard.Scale(value, nameof(EpsilonLow)); }

    /// <summary>The upper clip of l - l_old in log space. Default 0.4.</summary>
    public double EpsilonHigh { get => _epsilonHigh; init => _epsilonHigh = Guard.Scale(value, nameof(EpsilonHigh)); }

    /// <inheritdoc />
    protected override TokenReduction DefaultReduction => TokenReduction.SequenceMeanTokenMean;
}

/// <summary>GMPO, geometric-mean policy optimisation (Zhao et al. 2025, arXiv 2507.20673; verl "geo_mean").</summary>
/// <remarks>
/// Per token, in log space: c_t = sign(A) * min(sign(A) delta_t, sign(A) clamp(delta_t, -eps_low, eps_high)), delta = l -
/// l_old (the pessimistic side: min(delta, clipped) for A &gt; 0, max for A &lt; 0); per sequence coef_i = exp(sum_t m c_t /
/// |o_i|), A_i the sequence's mean advantage, L_i = -coef_i A_i. One value per sequence, reduced as the sequence mean.
/// </remarks>
public sealed class GmpoLoss : PolicyGradientLoss<GmpoOptions>
{
    /// <summary>Creates the loss (the paper's 0.4 / 0.4 without options).</summary>
    public GmpoLoss(GmpoOptions? options = null) : base(options ?? new())
    {
        RefuseTokenSumming(ImportanceRatio.SequenceMean, Options.Reduction, Name);
    }

    /// <inheritdoc />
    public override string Name => "gmpo";

    /// <inheritdoc />
    protected override (Tensor PerToken, bool SequenceLevel) PolicyTerm(TokenTerms terms, Tensor logRatio, List<(string Name, Tensor Value)> metrics)
    {
        ArgumentNullException.ThrowIfNull(terms);
        var a = terms.Advantages!;
        var sign = a.sign();
        var clamped = logRatio.clamp(-Options.EpsilonLow, Options.EpsilonHigh);
        var c = sign * minimum(sign * logRatio, sign * clamped);
        var coef = terms.SequenceMean(c).exp();
        var advantage = terms.AdvantagesPerSequence ? terms.SequenceAdvantages! : terms.SequenceMean(a);
        return (terms.Expand(-coef * advantage), true);
    }
}
