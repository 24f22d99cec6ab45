namespace Alignment.Losses;

/// <summary>Options of <see cref="SigmoidNormLoss"/>: beta and the score map.</summary>
public sealed record SigmoidNormOptions : PairwiseOptions;

/// <summary>
/// Length-normalised DPO with the reference kept (TRL loss_type "sigmoid_norm").
/// </summary>
/// <remarks>
/// <para>Per pair: L = softplus(-beta * (s_w / n_w - s_l / n_l)), with n the completion-token counts (needs token counts:
/// <c>new PreferenceLogps(chosen, rejected, chosenTokenCounts, rejectedTokenCounts)</c>). TRL clamps the counts at 1; here a
/// count below or at 0 is an error.</para>
/// <para>Gradient: always chosen up, rejected down, by 1/n of DPO's per token. Loss at initialisation: ln 2.</para>
/// </remarks>
public sealed class SigmoidNormLoss : PreferenceLoss<SigmoidNormOptions>
{
    /// <summary>Creates the loss; default beta 0.1.</summary>
    public SigmoidNormLoss(SigmoidNormOptions? options = null) : base(options ?? new SigmoidNormOptions()) { }

    /// <inheritdoc />
    public override string Name => "sigmoid_norm" + Options.ScoreMap.NameSuffix;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override PairLink? Link => MarginLink.Logistic(Options.Beta).OnScores(Options.ScoreMap, perTokenMeans: true);

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var (nw, nl) = terms.TokenCounts(Name);
        var (sw, sl) = terms.Scores(Options.ScoreMap);
        return new(PreferenceMath.NegLogSigmoid((sw / nw - sl / nl) * Options.Beta));
    }

    /// <summary>sigmoid_norm with default (or given) options. The policy log-probs must carry token counts.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, SigmoidNormOptions? options = null) =>
        new SigmoidNormLoss(options).Compute(new PreferenceBatch(policy, reference));
}
