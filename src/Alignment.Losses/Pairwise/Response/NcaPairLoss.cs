namespace Alignment.Losses;

/// <summary>Options of <see cref="NcaPairLoss"/>: beta and the score map.</summary>
public sealed record NcaPairOptions : PairwiseOptions;

/// <summary>
/// NCA, noise-contrastive alignment, pairwise form (Chen et al. 2024, arXiv 2402.05369); TRL loss_type "nca_pair".
/// </summary>
/// <remarks>
/// <para>Per pair, with rewards r = beta * s: L = -log sigmoid(r_w) - 1/2 log sigmoid(-r_w) - 1/2 log sigmoid(-r_l).
/// The terms are absolute, not relative: each response is judged on its own reward, not on the margin.</para>
/// <para>Gradient: the rejected response is always pushed down. The chosen response is pushed up only while its reward is
/// below ln 2 (dL/dr_w = -sigmoid(-r_w) + sigmoid(r_w) / 2 vanishes at sigmoid(r_w) = 2/3), and pushed down past it, which
/// keeps NCA from driving the chosen likelihood down as DPO can. Loss at initialisation: 2 ln 2.</para>
/// </remarks>
public sealed class NcaPairLoss : PreferenceLoss<NcaPairOptions>
{
    /// <summary>Creates the loss; default beta 0.1.</summary>
    public NcaPairLoss(NcaPairOptions? options = null) : base(options ?? new NcaPairOptions()) { }

    /// <inheritdoc />
    public override string Name => "nca_pair" + Options.ScoreMap.NameSuffix;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <summary>The chosen reward r_w = ln 2 at which the chosen response's gradient changes sign.</summary>
    public static double ChosenStationaryReward => Math.Log(2);

    /// <inheritdoc />
    protected override PairLink? Link => PairLink.Nca(Options.Beta).OnScores(Options.ScoreMap);

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var (sw, sl) = terms.Scores(Options.ScoreMap);
        var rw = sw * Options.Beta;
        var rl = sl * Options.Beta;
        // -log sigmoid(r_w) - 1/2 log sigmoid(-r_w) - 1/2 log sigmoid(-r_l) = softplus(-r_w) + softplus(r_w) / 2 + softplus(r_l) / 2
        return new(PreferenceMath.Softplus(-rw) + (PreferenceMath.Softplus(rw) + PreferenceMath.Softplus(rl)) * 0.5);
    }

    /// <summary>NCA (pairwise) with default (or given) options.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, NcaPairOptions? options = null) =>
        new NcaPairLoss(options).Compute(new PreferenceBatch(policy, reference));
}
