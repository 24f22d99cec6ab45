using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Which importance ratio a policy-gradient loss uses, from the log-ratios l - l_old.</summary>
public enum ImportanceRatio
{
    /// <summary>rho_t = exp(l_t - l_old,t), one per token (PPO, GRPO, DAPO; TRL importance_sampling_level "token").</summary>
    Token,

    /// <summary>
    /// s_i = exp(sum_t m (l - l_old) / |o_i|), one per sequence: the geometric mean of the token ratios (GSPO; TRL
    /// importance_sampling_level "sequence").
    /// </summary>
    SequenceMean,

    /// <summary>GSPO-token: log s_it = sg(log s_i) + l_t - sg(l_t): s_i's value with a per-token gradient (allows token advantages).</summary>
    SequenceMeanToken,

    /// <summary>exp(sum_t m (l - l_old)), one per sequence: the product of the token ratios (TRL's RLOO on summed log-probs).</summary>
    SequenceSum,
}

/// <summary>Options shared by the policy-gradient losses: reduction, log-ratio clamp, KL term, entropy bonus, rollout correction.</summary>
public abstract record PolicyGradientOptions : TokenLossOptions
{
    private double? _logRatioClamp = 20;
    private double _entropyCoefficient;

    private TokenReduction? _reduction;

    /// <summary>The reduction of the per-token losses; by default the anchor's (<see cref="DefaultReduction"/>).</summary>
    /// <exception cref="ArgumentNullException">Set to null.</exception>
    public TokenReduction Reduction
    {
        get => _reduction ?? DefaultReduction;
        init => _reduction = value ?? throw new ArgumentNullException(nameof(Reduction));
    }

    /// <summary>The reduction of the objective's paper or anchor, used unless <see cref="Reduction"/> is set.</summary>
    protected abstract TokenReduction DefaultReduction { get; }

    /// <summary>
    /// Clamps l - l_old to [-c, c] before exp, as verl and NeMo-RL do (c = 20), so that one stale token cannot overflow the
    /// ratio. Default 20; null turns it off (TRL clamps nothing; its factory sets null). Inside the clamp the loss is unchanged.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">Not positive and finite.</exception>
    public double? LogRatioClamp
    {
        get => _logRatioClamp;
        init => _logRatioClamp = value is { } c && !(c > 0 && double.IsFinite(c))
            ? throw new ArgumentOutOfRangeException(nameof(LogRatioClamp), c, "the log-ratio clamp must be positive and finite (or null for none).")
            : value;
    }

    /// <summary>The KL-to-reference term + beta * KL_t; null (default) for none (TRL's GRPO default, beta 0).</summary>
    public KlPenalty? Kl { get; init; }

    /// <summary>
    /// c of the entropy bonus - c * mean_t H_t (a token mean over the window, whatever the reduction; TRL entropy_coef).
    /// Default 0. Needs <see cref="TokenBatch.Entropy"/> with grad.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">NaN or infinite.</exception>
    public double EntropyCoefficient
    {
        get => _entropyCoefficient;
        init => _entropyCoefficient = double.IsFinite(value)
            ? value
            : throw new ArgumentOutOfRangeException(nameof(EntropyCoefficient), value, "the entropy coefficient must be finite.");
    }

    /// <summary>The rollout/trainer mismatch correction (needs <see cref="TokenBatch.BehaviourLogProbs"/>); null (default) for none.</summary>
    public RolloutCorrection? RolloutCorrection { get; init; }

    private double _topEntropyQuantile = 1.0;

    /// <summary>
    /// When true (the default), GRPO, DAPO, Dr. GRPO, BNPO, GSPO, GSPO-token, RLOO, dual-clip, CISPO, SAPO and REINFORCE run on
    /// the CPU in one managed pass over [N, T] (padded batches), in float32 lanes (float64 for float64 inputs), each sequence up
    /// to its last valid token: the clamped log-ratio, the ratio, the policy term and its derivative,
    /// the top-entropy mask, the rollout weights, the KL term, the entropy bonus, every metric and every value check from
    /// one read of each input, returned through a surrogate (per-token loss L + (l - sg(l)) dL/dl) whose value is the
    /// per-token loss and whose gradient is the saved one; the per-sequence means and the reduction are native ops on it.
    /// It agrees with the op-by-op path to float64 rounding (float64 inputs) or float32 rounding (float32, bfloat16 and
    /// float16 inputs; its k3 KL is then more accurate than the op-by-op path's, whose e^u - u - 1 cancels for small u),
    /// errors included (a failed check reruns op by op, which names the input).
    /// A sequence-level ratio (GSPO, RLOO) adds its rank-one coupling of a sequence's tokens to the surrogate. The surrogate
    /// has no second derivative: set false for double backward (or to compare the two paths). CUDA tensors, packed batches
    /// and GMPO always run op by op.
    /// </summary>
    public bool FusedCpu { get; init; } = true;

    /// <summary>
    /// TRL's top_entropy_quantile (Wang et al. 2025, "Beyond the 80/20 rule", arXiv 2506.01939): the policy term keeps only
    /// the tokens whose entropy is at least the (1 - q) quantile of the micro-batch's valid tokens' entropies (linear
    /// interpolation, torch.quantile's), and the entropy bonus acts on the same tokens. Default 1 (every token). Needs
    /// <see cref="TokenBatch.Entropy"/> (the log-prob pass's detached <see cref="SequenceLogProbsResult.TokenEntropy"/> will
    /// do). The quantile is of this micro-batch's tokens unless its window carries the global threshold
    /// (<see cref="TokenWindow.EntropyThreshold"/>, from <see cref="GlobalBatch.EntropyThreshold(ICollectives?, IEnumerable{TokenBatch}, double)"/>):
    /// TRL gathers the entropies across ranks first, so with several ranks set it.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">Not in (0, 1].</exception>
    public double TopEntropyQuantile
    {
        get => _topEntropyQuantile;
        init => _topEntropyQuantile = value > 0 && value <= 1 ? value
            : throw new ArgumentOutOfRangeException(nameof(TopEntropyQuantile), value, "top_entropy_quantile must be in (0, 1].");
    }
}

/// <summary>
/// Base of the policy-gradient losses (GRPO, DAPO, Dr. GRPO, GSPO, CISPO, SAPO, GMPO, REINFORCE, RLOO): the derived loss
/// gives the policy term per token; this base multiplies it by the rollout correction, adds beta * KL, the entropy bonus,
/// and reports TRL's metrics (kl, entropy, sampling/importance_sampling_ratio/*).
/// </summary>
/// <typeparam name="TOptions">The loss's options.</typeparam>
/// <remarks>Per token: L_t = w_t * policy_t + beta * KL_t, loss = reduce(L) - c * tokenmean(H), with w the rollout weight.</remarks>
public abstract class PolicyGradientLoss<TOptions> : TokenLoss<TOptions> where TOptions : PolicyGradientOptions
{
    /// <summary>Creates the loss with validated options.</summary>
    protected PolicyGradientLoss(TOptions options) : base(options) { }

    /// <inheritdoc />
    public override TokenReduction Reduction => Options.Reduction;

    /// <summary>The policy term per token from the terms and the (clamped) log-ratios l - l_old, with its metrics.</summary>
    /// <param name="terms">The upcast, masked batch (advantages required).</param>
    /// <param name="logRatio">l - l_old [N, T] with grad, clamped to <see cref="PolicyGradientOptions.LogRatioClamp"/>.</param>
    /// <param name="metrics">Where the loss adds its own metrics.</param>
    /// <returns>The per-token policy loss, and whether it is one value per sequence.</returns>
    protected abstract (Tensor PerToken, bool SequenceLevel) PolicyTerm(TokenTerms terms, Tensor logRatio, List<(string Name, Tensor Value)> metrics);

    /// <summary>
    /// The policy term as a <see cref="TokenLink"/> (<see cref="TokenLink.FromFunction"/>), when it is one for these options:
    /// the loss then runs on the CPU in one fused pass (<see cref="PolicyGradientOptions.FusedCpu"/>). Null (the default):
    /// op by op. <see cref="PolicyTerm"/> stays the definition, run everywhere else, and the two must agree.
    /// </summary>
    protected virtual TokenLink? Link => null;

    /// <summary>The term for the fused pass with the ratio it reads: the library's losses give their own; others, <see cref="Link"/>'s.</summary>
    private protected virtual (TokenLink Link, ImportanceRatio Ratio)? Fused => Link is { Ratio: { } ratio } link ? (link, ratio) : null;

    /// <inheritdoc />
    private protected sealed override TokenLossResult? ComputeFused(TokenBatch batch)
    {
        if (!Options.FusedCpu || Fused is not { } fused || !FusedPolicyPass.Applies(batch)) return null;
        RequireInputs(batch);
        return FusedPolicyPass.TryCompute(batch, new FusedPolicyPass.Setup(fused.Link, fused.Ratio, Options, Reduction, Name));
    }

    /// <inheritdoc />
    protected override void Validate(TokenBatch batch, TokenTerms terms)
    {
        RequireInputs(batch);
        CheckAdvantagesFinite(terms);
    }

    /// <summary>The structural checks of the inputs the options need (both paths).</summary>
    private void RequireInputs(TokenBatch batch)
    {
        ArgumentNullException.ThrowIfNull(batch);
        Require(batch.Advantages, "batch.Advantages", "the advantages of the sampled completions (see Advantages.Grpo and the other estimators)");
        if (Options.Kl is { Beta: > 0 })
            Require(batch.ReferenceLogProbs, "batch.ReferenceLogProbs", $"its KL term (beta {Options.Kl.Beta}) compares the policy with the reference model");
        if (Options.RolloutCorrection is not null)
            Require(batch.BehaviourLogProbs, "batch.BehaviourLogProbs", "the rollout correction weighs tokens by exp(l_old - l_beh), the inference engine's log-probs");
        if (Options.EntropyCoefficient != 0)
        {
            Require(batch.Entropy, "batch.Entropy", $"its entropy bonus (coefficient {Options.EntropyCoefficient}) needs the per-token entropy");
            if (batch.LogProbs.requires_grad && !batch.Entropy!.requires_grad)
                throw new ArgumentException(
                    $"The {Name} loss's entropy bonus needs a differentiable batch.Entropy (computed from the logits with grad); the one given has no " +
                    "gradient, so the bonus would change the loss value but never the policy. The log-prob pass's TokenEntropy is detached: compute the " +
                    "entropy with grad, or set EntropyCoefficient = 0 (the entropy is still reported as a metric).", "batch.Entropy");
        }
        if (Options.TopEntropyQuantile < 1)
            Require(batch.Entropy, "batch.Entropy", $"top_entropy_quantile {Options.TopEntropyQuantile} keeps the highest-entropy tokens, so it needs the per-token entropy " +
                "(SequenceLogProbsOptions.StepStatistics gives it)");
    }

    /// <summary>TRL's high-entropy mask: valid tokens with H &gt;= the (1 - q) quantile of the valid tokens' entropies (the
    /// window's global threshold when it carries one).</summary>
    private static Tensor HighEntropyMask(TokenTerms terms, Tensor entropy, double quantile)
    {
        using var noGrad = no_grad();
        var h = entropy.detach();
        if (terms.EntropyThreshold is { } global) return ((h >= global) & terms.Valid).to_type(terms.DType);
        var values = h.masked_select(terms.Valid);
        if (values.shape[0] == 0) return zeros_like(terms.Mask);
        return ((h >= Numerics.QuantileThreshold(values, quantile)) & terms.Valid).to_type(terms.DType);
    }

    private void CheckAdvantagesFinite(TokenTerms terms)
    {
        using var noGrad = no_grad();
        terms.Checks.Add(isfinite(terms.Advantages!).all(), () => new ArgumentException(
            $"batch.Advantages holds NaN or Inf at valid tokens. An unscorable completion (a NaN reward) gets advantage 0 from the estimators " +
            $"(Advantages.Grpo and the others); pass their output, or replace NaN by 0 before the {Name} loss.", "batch.Advantages"));
    }

    /// <inheritdoc />
    protected sealed override TokenLossOutput Evaluate(TokenTerms terms)
    {
        ArgumentNullException.ThrowIfNull(terms);
        var metrics = new List<(string, Tensor)>();
        var logRatio = terms.LogProbs - terms.OldLogProbs;
        if (Options.LogRatioClamp is { } c) logRatio = logRatio.clamp(-c, c);
        var (policy, sequenceLevel) = PolicyTerm(terms, logRatio, metrics);
        var perToken = policy;
        Tensor? entropyMask = null;
        if (Options.TopEntropyQuantile < 1 && terms.Entropy is { } h)
        {
            entropyMask = HighEntropyMask(terms, h, Options.TopEntropyQuantile);
            perToken = perToken * entropyMask;
        }
        if (Options.RolloutCorrection is { } correction)
        {
            var w = correction.Weights(terms);
            perToken = perToken * w;
            using (no_grad())
            {
                var big = full_like(w, double.PositiveInfinity);
                metrics.Add((MetricNames.ImportanceSamplingRatioMin, w.where(terms.Valid, big).min()));
                metrics.Add((MetricNames.ImportanceSamplingRatioMean, terms.TokenMean(w)));
                metrics.Add((MetricNames.ImportanceSamplingRatioMax, w.where(terms.Valid, -big).max()));
            }
        }
        if (Options.Kl is { } kl && terms.ReferenceLogProbs is { } reference)
        {
            var perTokenKl = kl.PerToken(terms.LogProbs, reference);
            if (kl.BiasCorrected) perTokenKl = perTokenKl * logRatio.exp();
            if (kl.Beta > 0) perToken = perToken + perTokenKl * kl.Beta;
            metrics.Add((MetricNames.Kl, terms.TokenMean(perTokenKl)));
        }
        Tensor? bonus = null;
        if (terms.Entropy is { } entropy)
        {
            metrics.Add((MetricNames.Entropy, terms.TokenMean(entropy)));
            if (Options.EntropyCoefficient != 0) bonus = (entropyMask is null ? entropy : entropy * entropyMask) * -Options.EntropyCoefficient;
        }
        return new TokenLossOutput(perToken, metrics) { SequenceLevel = sequenceLevel, TokenMeanTerm = bonus };
    }

    /// <summary>
    /// The importance ratio [N, T] at each valid token (a sequence's ratio at each of its tokens for the sequence levels),
    /// with its gradient, from the clamped log-ratios.
    /// </summary>
    protected static Tensor Ratio(TokenTerms terms, Tensor logRatio, ImportanceRatio level)
    {
        ArgumentNullException.ThrowIfNull(terms);
        ArgumentNullException.ThrowIfNull(logRatio);
        switch (level)
        {
            case ImportanceRatio.Token:
                return logRatio.exp();
            case ImportanceRatio.SequenceMean:
                return terms.Expand(terms.SequenceMean(logRatio)).exp();
            case ImportanceRatio.SequenceSum:
                return terms.Expand(terms.SequenceSum(logRatio)).exp();
            default:
                var sequenceLog = terms.Expand(terms.SequenceMean(logRatio)).detach();
                return (sequenceLog + terms.LogProbs - terms.LogProbs.detach()).exp();
        }
    }

    /// <summary>Whether <paramref name="level"/> gives one ratio per sequence without a per-token gradient.</summary>
    protected static bool IsSequenceLevel(ImportanceRatio level) => level is ImportanceRatio.SequenceMean or ImportanceRatio.SequenceSum;

    /// <summary>The fraction of valid tokens where <paramref name="condition"/> holds (for sequence-level ratios, of sequences), detached.</summary>
    protected static Tensor Fraction(TokenTerms terms, Tensor condition, bool perSequence)
    {
        ArgumentNullException.ThrowIfNull(terms);
        ArgumentNullException.ThrowIfNull(condition);
        using var noGrad = no_grad();
        var x = condition.to_type(terms.DType);
        if (!perSequence) return terms.TokenMean(x);
        return terms.SequenceMean(x).sum() / terms.NonEmptySequences.clamp_min(1);   // an empty sequence's mean is 0
    }

    /// <summary>Checks an importance-ratio level option by name.</summary>
    protected static ImportanceRatio CheckLevel(ImportanceRatio level, string name) => Guard.Defined(level, name);

    /// <summary>The error for a sequence-level ratio with a reduction that sums tokens, raised when the loss is created.</summary>
    protected static void RefuseTokenSumming(ImportanceRatio level, TokenReduction reduction, string lossName)
    {
        ArgumentNullException.ThrowIfNull(reduction);
        if (IsSequenceLevel(level) && reduction.SumsTokens)
            throw new ArgumentException(
                $"The {lossName} loss with a {level} importance ratio is one value per sequence, so it reduces only as the sequence mean of token means; " +
                $"{reduction} would weigh each sequence's loss by its length (TRL issue 3823). Use TokenReduction.SequenceMeanTokenMean " +
                "(or ImportanceRatio.SequenceMeanToken, whose per-token gradient allows any reduction).", "options");
    }
}
