using Alignment.Losses.Internal;
using TorchSharp;

namespace Alignment.Losses;

/// <summary>Options of <see cref="DiscoPopLoss"/>: beta, the score map, and the modulation temperature tau.</summary>
public sealed record DiscoPopOptions : PairwiseOptions
{
    /// <summary>tau in [1e-12, 1e12], the temperature of the mixing coefficient. Default 0.05 (the paper's and TRL's).</summary>
    public double Tau { get; init => field = Guard.Scale(value, nameof(Tau)); } = 0.05;
}

/// <summary>
/// DiscoPOP, the log-ratio modulated loss discovered by LLM-driven search (Lu et al. 2024, arXiv 2406.08414, Eq. 5);
/// TRL loss_type "discopop".
/// </summary>
/// <remarks>
/// <para>Per pair, with z = beta * Delta and m = sigmoid(z / tau): L = (1 - m) softplus(-z) + m exp(-z), a blend of DPO's
/// logistic loss and an exponential loss. m exp(-z) is computed as exp(log sigmoid(z / tau) - z), which stays finite where
/// exp(-z) alone overflows (TRL's literal form gives NaN there).</para>
/// <para>Gradient: non-convex and not of one sign. With the default tau it is positive in a band around z = 0 (at z = 0,
/// dL/dz = -3/4 + (1 - ln 2) / (4 tau) ≈ +0.78), so there the chosen response is pushed down; for |z| away from that band
/// the chosen is pushed up and the rejected down.</para>
/// </remarks>
public sealed class DiscoPopLoss : PreferenceLoss<DiscoPopOptions>
{
    /// <summary>Creates the loss; default beta 0.1, tau 0.05.</summary>
    public DiscoPopLoss(DiscoPopOptions? options = null) : base(options ?? new DiscoPopOptions()) { }

    /// <inheritdoc />
    public override string Name => "discopop" + Options.ScoreMap.NameSuffix;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override PairLink? Link => MarginLink.DiscoPop(Options.Beta, Options.Tau).OnScores(Options.ScoreMap);

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var z = terms.ScoreMargin(Options.ScoreMap) * Options.Beta;
        var zt = z / Options.Tau;
        var logistic = zt.neg().sigmoid() * PreferenceMath.NegLogSigmoid(z);             // (1 - m) softplus(-z)
        var exponential = (PreferenceMath.NegLogSigmoid(zt).neg() - z).exp();            // m exp(-z)
        return new(logistic + exponential);
    }

    /// <summary>DiscoPOP with default (or given) options.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, DiscoPopOptions? options = null) =>
        new DiscoPopLoss(options).Compute(new PreferenceBatch(policy, reference));
}
