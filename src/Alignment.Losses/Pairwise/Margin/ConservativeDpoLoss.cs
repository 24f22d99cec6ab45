using Alignment.Losses.Internal;

namespace Alignment.Losses;

/// <summary>Options of <see cref="ConservativeDpoLoss"/>: beta, the score map, and the label smoothing.</summary>
public sealed record ConservativeDpoOptions : PairwiseOptions
{
    /// <summary>Label smoothing eps in [0, 0.5): the assumed probability that a label is flipped. Default 0.1. eps = 0 is DPO.</summary>
    public double LabelSmoothing { get; init => field = Guard.InRange(value, 0, 0.5, nameof(LabelSmoothing)); } = 0.1;
}

/// <summary>
/// cDPO, conservative DPO with label smoothing (Mitchell 2023, "A note on DPO with noisy preferences"); TRL "sigmoid" with label_smoothing.
/// </summary>
/// <remarks>
/// <para>Per pair: L = (1 - eps) * softplus(-beta * h) + eps * softplus(beta * h), computed as softplus(-beta * h) + eps * beta * h
/// (the same function, one softplus and no cancellation; see <see cref="PreferenceMath.LabelSmoothed"/>).</para>
/// <para>Gradient: stationary at h* = ln((1 - eps) / eps) / beta; below it the chosen log-prob is pushed up, past it the
/// gradient reverses (the chosen is pushed down), which keeps the margin bounded.</para>
/// </remarks>
public sealed class ConservativeDpoLoss : PreferenceLoss<ConservativeDpoOptions>
{
    /// <summary>Creates the loss; default beta 0.1, label smoothing 0.1.</summary>
    public ConservativeDpoLoss(ConservativeDpoOptions? options = null) : base(options ?? new ConservativeDpoOptions()) { }

    /// <inheritdoc />
    public override string Name => "cdpo" + Options.ScoreMap.NameSuffix;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override PairLink? Link => MarginLink.Logistic(Options.Beta, Options.LabelSmoothing).OnScores(Options.ScoreMap);

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        return new(PreferenceMath.LabelSmoothed(terms.ScoreMargin(Options.ScoreMap) * Options.Beta, Options.LabelSmoothing));
    }

    /// <summary>The margin h* = ln((1 - eps) / eps) / beta at which the loss is stationary (infinite for eps = 0).</summary>
    public double StationaryMargin => Math.Log((1 - Options.LabelSmoothing) / Options.LabelSmoothing) / Options.Beta;

    /// <summary>cDPO with default (or given) options.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, ConservativeDpoOptions? options = null) =>
        new ConservativeDpoLoss(options).Compute(new PreferenceBatch(policy, reference));
}
