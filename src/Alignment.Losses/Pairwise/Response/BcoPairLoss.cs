namespace Alignment.Losses;

/// <summary>Options of <see cref="BcoPairLoss"/>: beta and the score map.</summary>
public sealed record BcoPairOptions : PairwiseOptions;

/// <summary>
/// BCO, binary classifier optimization, pairwise form without the running mean (Jung et al. 2024, arXiv 2404.04656);
/// TRL loss_type "bco_pair".
/// </summary>
/// <remarks>
/// <para>Per pair, with rewards r = beta * s: L = -log sigmoid(r_w) - log sigmoid(-r_l): the chosen response classified as
/// good and the rejected one as bad, each on its own reward.</para>
/// <para>Gradient: always chosen up and rejected down. Loss at initialisation: 2 ln 2.</para>
/// </remarks>
public sealed class BcoPairLoss : PreferenceLoss<BcoPairOptions>
{
    /// <summary>Creates the loss; default beta 0.1.</summary>
    public BcoPairLoss(BcoPairOptions? options = null) : base(options ?? new BcoPairOptions()) { }

    /// <inheritdoc />
    public override string Name => "bco_pair" + Options.ScoreMap.NameSuffix;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override PairLink? Link => PairLink.BcoPair(Options.Beta).OnScores(Options.ScoreMap);

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var (sw, sl) = terms.Scores(Options.ScoreMap);
        return new(PreferenceMath.NegLogSigmoid(sw * Options.Beta) + PreferenceMath.Softplus(sl * Options.Beta));
    }

    /// <summary>BCO (pairwise) with default (or given) options.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, BcoPairOptions? options = null) =>
        new BcoPairLoss(options).Compute(new PreferenceBatch(policy, reference));
}
