using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Options of <see cref="HingeLoss"/>: beta (the margin is 1 / beta in log-ratio units; default 0.1) and the score map.</summary>
public sealed record HingeOptions : PairwiseOptions;

/// <summary>
/// Hinge preference loss (SLiC, Zhao et al. 2023, arXiv 2305.10425; RSO, Liu et al. 2023, arXiv 2309.06657); TRL loss_type "hinge".
/// </summary>
/// <remarks>
/// <para>Per pair: L = max(0, 1 - beta * h).</para>
/// <para>Gradient: chosen up and rejected down while beta * h &lt; 1, exactly zero once beta * h &gt;= 1. Loss at initialisation: 1.</para>
/// </remarks>
public sealed class HingeLoss : PreferenceLoss<HingeOptions>
{
    /// <summary>Creates the loss; default beta 0.1.</summary>
    public HingeLoss(HingeOptions? options = null) : base(options ?? new HingeOptions()) { }

    /// <inheritdoc />
    public override string Name => "hinge" + Options.ScoreMap.NameSuffix;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override PairLink? Link => MarginLink.Hinge(Options.Beta).OnScores(Options.ScoreMap);

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch) =>
        new(nn.functional.relu(1 - terms.ScoreMargin(Options.ScoreMap) * Options.Beta));

    /// <summary>Hinge loss with default (or given) options.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, HingeOptions? options = null) =>
        new HingeLoss(options).Compute(new PreferenceBatch(policy, reference));
}
