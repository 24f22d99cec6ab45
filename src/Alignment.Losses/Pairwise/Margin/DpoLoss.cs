namespace Alignment.Losses;

/// <summary>Options of <see cref="DpoLoss"/>: beta (default 0.1) and the score map (default reverse KL).</summary>
public sealed record DpoOptions : PairwiseOptions;

/// <summary>
/// DPO, Direct Preference Optimization (Rafailov et al., NeurIPS 2023, arXiv 2305.18290); TRL loss_type "sigmoid".
/// </summary>
/// <remarks>
/// <para>Per pair: L = softplus(-beta * Delta) = -log sigmoid(beta * Delta), Delta = s_w - s_l with s = f(u) the score map
/// (reverse KL: s = u, so Delta = h = u_w - u_l, u = l_pol - l_ref).</para>
/// <para>Gradient: always pushes the chosen log-prob up and the rejected one down (every score map is increasing). Under
/// Bradley-Terry preferences with rewards r the optimum is pi* proportional to pi_ref * exp(r / beta). Loss at
/// initialisation: ln 2.</para>
/// <para>Reference-free DPO: pass no reference (l_ref = 0).</para>
/// </remarks>
public sealed class DpoLoss : PreferenceLoss<DpoOptions>
{
    /// <summary>Creates the loss; <paramref name="options"/> defaults to <c>new DpoOptions()</c> (beta 0.1).</summary>
    public DpoLoss(DpoOptions? options = null) : base(options ?? new DpoOptions()) { }

    /// <inheritdoc />
    public override string Name => "dpo" + Options.ScoreMap.NameSuffix;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override PairLink? Link => MarginLink.Logistic(Options.Beta).OnScores(Options.ScoreMap);

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch) =>
        new(PreferenceMath.NegLogSigmoid(terms.ScoreMargin(Options.ScoreMap) * Options.Beta));

    /// <summary>DPO with default (or given) options: <c>DpoLoss.Compute(policyLogps, refLogps)</c>.</summary>
    /// <param name="policy">Policy log-probs (with grad).</param>
    /// <param name="reference">Reference log-probs; <see langword="null"/> for reference-free DPO.</param>
    /// <param name="options">Options; default beta 0.1.</param>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, DpoOptions? options = null) =>
        new DpoLoss(options).Compute(new PreferenceBatch(policy, reference));
}
