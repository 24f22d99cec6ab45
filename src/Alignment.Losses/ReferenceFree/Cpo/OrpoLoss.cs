using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Which tokens ORPO's NLL term averages over.</summary>
public enum OrpoNllTokens
{
    /// <summary>
    /// The chosen sequences' prompt and completion tokens (TRL's ORPOTrainer, and the ORPO authors' default): needs
    /// <see cref="PreferenceBatch.Prompt"/>.
    /// </summary>
    PromptAndCompletion,

    /// <summary>The chosen completions only (the authors' <c>--disable_prompt_loss</c>).</summary>
    Completion,
}

/// <summary>Options of <see cref="OrpoLoss"/>.</summary>
public sealed record OrpoOptions : BetaOptions
{
    /// <summary>The tokens of the NLL term. Default <see cref="OrpoNllTokens.PromptAndCompletion"/> (TRL's and the authors').</summary>
    public OrpoNllTokens NllTokens { get => field; init => field = Internal.Guard.Defined(value, nameof(NllTokens)); } = OrpoNllTokens.PromptAndCompletion;
}

/// <summary>
/// ORPO, Odds Ratio Preference Optimization (Hong et al. 2024, arXiv 2403.07691; TRL's ORPOTrainer): supervised NLL on
/// the chosen responses plus a log-odds-ratio penalty, no reference model.
/// </summary>
/// <remarks>
/// <para>With per-token means a = l / n over the completion tokens (a &lt; 0) and log odds(y) = a - log(1 - e^a):
/// log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l)); loss = NLL - beta * mean logsigmoid(log_odds). The NLL is the
/// chosen sequences' token-weighted mean negative log-likelihood, TRL's cross-entropy: by default over prompt and
/// completion tokens, -(sum_i (p_i + l_w,i)) / (sum_i (m_i + n_w,i)) with p, m from <see cref="PreferenceBatch.Prompt"/>
/// (TRL's ORPOTrainer and the authors' default); over the completions only with <see cref="OrpoNllTokens.Completion"/>.
/// log1mexp(a) = log(1 - e^a) is computed as log(-expm1(a)) for a &gt; -ln 2 and log1p(-exp(a)) otherwise, each branch
/// evaluated only on inputs where it is finite (so neither the value nor the gradient of the unused branch can be
/// infinite): accurate, with a finite gradient, over the whole range. a = 0 exactly (probability 1, infinite odds) is an
/// <see cref="ArgumentException"/>, never NaN. Reference-free.</para>
/// <para>Metrics (TRL's): log_odds_ratio = mean logsigmoid(log_odds), log_odds_chosen = mean log_odds, nll_loss; rewards are
/// beta * a and logps/* the per-token means a, as TRL logs them.</para>
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
    protected override IEnumerable<(Tensor? Tensor, string Name)> Validate(PreferenceBatch batch, ValueChecks checks)
    {
        if (Options.NllTokens == OrpoNllTokens.Completion) return Array.Empty<(Tensor?, string)>();
        if (batch.Prompt is not { } prompt)
            throw new ArgumentException(
                "ORPO averages its NLL over the chosen sequences' prompt and completion tokens (TRL's ORPOTrainer and the authors' default), " +
                "so it needs batch.Prompt: the prompt tokens' log-probs, e.g. all.Within(collated.PromptMask).ToPromptLogps() from log-probs " +
                "over collated.SequenceLabels. For the NLL over the completions only (the authors' --disable_prompt_loss) set " +
                "OrpoOptions.NllTokens = OrpoNllTokens.Completion.", "batch.Prompt");
        CheckPerExample(prompt.Sum, batch, "batch.Prompt.Sum", "the prompt tokens' summed log-probs");
        CheckPerExample(prompt.TokenCounts, batch, "batch.Prompt.TokenCounts", "the number of scored prompt tokens");
        using (no_grad())
        {
            checks.Add((prompt.TokenCounts >= 0).all(), () => new ArgumentException(
                "batch.Prompt.TokenCounts must be finite and >= 0 (the number of scored prompt tokens of each chosen sequence).", "batch.Prompt.TokenCounts"));
            checks.Add((prompt.Sum <= 0).all(), () => new ArgumentException(
                "batch.Prompt.Sum must be summed log-probs (<= 0); a positive value is not a log-probability (logits passed by mistake?).", "batch.Prompt.Sum"));
        }
        return new (Tensor?, string)[] { (prompt.Sum, "batch.Prompt.Sum"), (prompt.TokenCounts, "batch.Prompt.TokenCounts") };
    }

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var (aw, al) = ReferenceFreeMath.Means(terms, Name);
        using (no_grad())
            terms.Checks.Add(((aw < 0) & (al < 0)).all(), () => new ArgumentException(
                "ORPO needs per-token mean log-probs below 0: a response with mean log-prob 0 (probability 1) has infinite odds. " +
                "policy.Chosen / policy.Rejected hold a sequence whose every token has probability 1 (or a positive 'log-prob').", "policy"));
        var logOdds = (aw - al) - (Log1mExp(aw) - Log1mExp(al));
        var ratio = -PreferenceMath.NegLogSigmoid(logOdds);
        var (nllPerPair, nll) = Options.NllTokens == OrpoNllTokens.Completion
            ? ReferenceFreeMath.TokenWeightedNll(terms, Name)
            : ReferenceFreeMath.TokenWeightedNll(terms, Name, terms.Upcast(batch.Prompt!.TokenCounts), Numerics.As(batch.Prompt.Sum, terms.DType));
        var perExample = nllPerPair - ratio * Options.Beta;
        return new(perExample, new[] { (MetricNames.LogOddsRatio, ratio.mean()), (MetricNames.LogOddsChosen, logOdds.mean()), (MetricNames.NllLoss, nll) })
        {
            Rewards = (aw * Options.Beta, al * Options.Beta),
            Logps = (aw, al),
        };
    }

    /// <summary>
    /// log(1 - e^a) for a &lt; 0, accurate everywhere (Mächler 2012): log(-expm1(a)) near 0, log1p(-exp(a)) below -ln 2.
    /// Each branch sees only inputs where it is finite (the other side's inputs are replaced by -1 before it is evaluated):
    /// under <c>where</c> an unselected branch's infinite derivative would otherwise turn the gradient into NaN. a &gt;= 0
    /// (rejected by the loss's check) gives a finite stand-in, never NaN, until that check is read.
    /// </summary>
    internal static Tensor Log1mExp(Tensor a)
    {
        var nearZero = a > -Math.Log(2);
        var safeNear = where(nearZero, a.clamp_max(-double.Epsilon), full_like(a, -1.0));    // in [-ln 2, 0): -expm1 > 0
        var safeFar = where(nearZero, full_like(a, -1.0), a);                               // below -ln 2: 1 - e^a > 1/2
        return where(nearZero, (-safeNear.expm1()).log(), (-safeFar.exp()).log1p());
    }

    /// <summary>
    /// ORPO with default (or given) options. The policy log-probs must carry token counts; <paramref name="prompt"/> is
    /// required unless <see cref="OrpoOptions.NllTokens"/> is <see cref="OrpoNllTokens.Completion"/>.
    /// </summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PromptLogps? prompt, OrpoOptions? options = null) =>
        new OrpoLoss(options).Compute(new PreferenceBatch(policy) { Prompt = prompt });
}
