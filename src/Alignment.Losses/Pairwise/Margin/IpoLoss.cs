using Alignment.Losses.Internal;

namespace Alignment.Losses;

/// <summary>How IPO forms its log-ratios.</summary>
public enum IpoLogRatio
{
    /// <summary>Summed sequence log-probs, as in the IPO paper and the reference implementations of its authors.</summary>
    Sum,

    /// <summary>Per-token mean log-probs (sum / token count), as TRL's loss_type "ipo" does. Needs token counts.</summary>
    PerTokenMean,
}

/// <summary>Options of <see cref="IpoLoss"/>: beta (the paper's tau; the target margin is 1 / (2 beta)), the score map, and the log-ratio form.</summary>
public sealed record IpoOptions : PairwiseOptions
{
    /// <summary>Sum (default, the paper) or per-token mean (TRL) log-probs.</summary>
    public IpoLogRatio LogRatio { get; init => field = Guard.Defined(value, nameof(LogRatio)); } = IpoLogRatio.Sum;
}

/// <summary>
/// IPO, Identity Preference Optimisation (Azar et al., AISTATS 2024, arXiv 2310.12036); TRL loss_type "ipo".
/// </summary>
/// <remarks>
/// <para>Per pair: L = (h~ - 1 / (2 beta))^2, where h~ = h with summed log-probs (default) or
/// h~ = u_w / n_w - u_l / n_l with per-token means (TRL's choice; needs token counts).</para>
/// <para>Gradient: regresses the margin onto 1 / (2 beta); past it the sign reverses (chosen pushed down).
/// Loss at initialisation: 1 / (4 beta^2).</para>
/// </remarks>
public sealed class IpoLoss : PreferenceLoss<IpoOptions>
{
    /// <summary>Creates the loss; default beta 0.1, summed log-probs.</summary>
    public IpoLoss(IpoOptions? options = null) : base(options ?? new IpoOptions()) { }

    /// <inheritdoc />
    /// <remarks>"ipo" with summed log-probs, "ipo_per_token" with per-token means.</remarks>
    public override string Name => (Options.LogRatio == IpoLogRatio.PerTokenMean ? "ipo_per_token" : "ipo") + Options.ScoreMap.NameSuffix;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override PairLink? Link => MarginLink.Square(TargetMargin).OnScores(Options.ScoreMap, perTokenMeans: Options.LogRatio == IpoLogRatio.PerTokenMean);

    /// <summary>The margin 1 / (2 beta) that IPO regresses h~ onto.</summary>
    public double TargetMargin => 1 / (2 * Options.Beta);

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var margin = terms.ScoreMargin(Options.ScoreMap);
        if (Options.LogRatio == IpoLogRatio.PerTokenMean)
        {
            var (nw, nl) = terms.TokenCounts(Name);
            var (sw, sl) = terms.Scores(Options.ScoreMap);             // TRL maps the scores, then averages per token
            margin = sw / nw - sl / nl;
        }
        return new((margin - TargetMargin).square());
    }

    /// <summary>IPO with default (or given) options.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, IpoOptions? options = null) =>
        new IpoLoss(options).Compute(new PreferenceBatch(policy, reference));
}
