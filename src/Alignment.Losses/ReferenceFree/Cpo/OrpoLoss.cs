using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Options of <see cref="OrpoLoss"/>.</summary>
public sealed record OrpoOptions : BetaOptions;

/// <summary>
/// ORPO, Odds Ratio Preference Optimization (Hong et al. 2024, arXiv 2403.07691; TRL's ORPOTrainer): supervised NLL on
/// the chosen responses plus a log-odds-ratio penalty, no reference model.
/// </summary>
/// <remarks>
/// <para>With per-token means a = l / n (a &lt; 0) and log odds(y) = a - log(1 - e^a):
/// log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l)); loss = NLL - beta * mean logsigmoid(log_odds), NLL the
/// chosen responses' token-weighted mean negative log-likelihood (TRL's cross-entropy). log1mexp(a) = log(1 - e^a) is
/// computed as log(-expm1(a)) for a &gt; -ln 2 and log1p(-exp(a)) otherwise: accurate over the whole range. a = 0 exactly
/// (probability 1, infinite odds) is an <see cref="ArgumentException"/>, never NaN. Reference-free.</para>
/// <para>Metrics (TRL's): log_odds_ratio = mean logsigmoid(log_odds), log_odds_chosen = mean log_odds, nll_loss; rewards are
/// beta * a.</para>
/// </remarks>
public sealed class OrpoLoss : PreferenceLoss<OrpoOptions>
{
    /// <summary>Creates the loss; default beta 0.1 (TRL's; the paper's lambda).</summary>
    public OrpoLoss(OrpoOptions? options = null) : base(options ?? new OrpoOptions()) { }

    /// <inheritdoc />
    public override string Name => "orpo";

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override ReferenceUse ReferenceUse => ReferenceUse.Refused;

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var (aw, al) = ReferenceFreeMath.Means(terms, Name);
        using (no_grad())
            terms.Checks.Add(((aw < 0) & (al < 0)).all(), () => new ArgumentException(
                "ORPO needs per-token mean log-probs below 0: a response with mean log-prob 0 (probability 1) has infinite odds. " +
                "policy.Chosen / policy.Rejected hold a sequence whose every token has probability 1 (or a positive 'log-prob').", "policy"));
        // a >= 0 would make log1mexp NaN before the check is read: evaluate it on a clamped copy (the check still fails)
        var logOdds = (aw - al) - (Log1mExp(aw.clamp_max(-1e-30)) - Log1mExp(al.clamp_max(-1e-30)));
        var ratio = -PreferenceMath.NegLogSigmoid(logOdds);
        var (nllPerPair, nll) = ReferenceFreeMath.TokenWeightedNll(terms, Name);
        var perExample = nllPerPair - ratio * Options.Beta;
        return new(perExample, new[] { (MetricNames.LogOddsRatio, ratio.mean()), (MetricNames.LogOddsChosen, logOdds.mean()), (MetricNames.NllLoss, nll) })
        {
            Rewards = (aw * Options.Beta, al * Options.Beta),
        };
    }

    /// <summary>log(1 - e^a) for a &lt; 0, accurate everywhere (Mächler 2012): log(-expm1(a)) near 0, log1p(-exp(a)) below -ln 2.</summary>
    internal static Tensor Log1mExp(Tensor a) => where(a > -Math.Log(2), (-a.expm1()).log(), (-a.exp()).log1p());

    /// <summary>ORPO with default (or given) options. The policy log-probs must carry token counts.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, OrpoOptions? options = null) =>
        new OrpoLoss(options).Compute(new PreferenceBatch(policy));
}
