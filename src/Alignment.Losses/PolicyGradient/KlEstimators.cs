using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Schulman's estimators of KL(pi || pi_ref) from samples of pi, per token, with u = l_ref - l.</summary>
public enum KlEstimator
{
    /// <summary>k1 = -u = l - l_ref (unbiased, high variance, can be negative; RLOO's reward penalty).</summary>
    K1,

    /// <summary>k2 = u^2 / 2 (its gradient is the true KL's gradient on-policy).</summary>
    K2,

    /// <summary>k3 = exp(u) - u - 1 &gt;= 0 (unbiased, low variance; TRL GRPO's, verl "low_var_kl").</summary>
    K3,

    /// <summary>"k3+": the value of k3 with the gradient of k2, k2 - sg(k2) + sg(k3) (verl "k3+").</summary>
    K3Plus,
}

/// <summary>
/// A KL-to-reference term added to the per-token loss, + beta * KL_t, reduced with the loss (as TRL and verl add it).
/// Defaults differ: TRL GRPO beta 0 (no term), verl 0.001, NeMo-RL 0.01, Liger 0.04.
/// </summary>
public sealed record KlPenalty
{
    /// <summary>The term with coefficient <paramref name="beta"/> and an estimator (default k3).</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="beta"/> is negative, NaN or infinite.</exception>
    /// <exception cref="ArgumentException"><paramref name="estimator"/> is not defined.</exception>
    public KlPenalty(double beta, KlEstimator estimator = KlEstimator.K3)
    {
        if (!(beta >= 0 && double.IsFinite(beta)))
            throw new ArgumentOutOfRangeException(nameof(beta), beta, "the KL coefficient beta must be finite and >= 0.");
        if (!Enum.IsDefined(estimator))
            throw new ArgumentException($"estimator {(int)estimator} is not a KlEstimator.", nameof(estimator));
        Beta = beta;
        Estimator = estimator;
    }

    /// <summary>beta, the coefficient.</summary>
    public double Beta { get; }

    /// <summary>The estimator.</summary>
    public KlEstimator Estimator { get; }

    /// <summary>
    /// DeepSeek-V3.2's bias correction (TRL use_bias_correction_kl): KL_t times the importance ratio rho_t (with its
    /// gradient), which makes the estimate unbiased for the current policy when the samples come from pi_old. Default false.
    /// </summary>
    public bool BiasCorrected { get; init; }

    /// <summary>verl's clamps for k3 (u to [-20, 20], the value to [-10, 10]). Default false (TRL clamps nothing).</summary>
    public bool Clamp { get; init; }

    /// <summary>
    /// The per-token estimate from the policy's log-probs <paramref name="logProbs"/> (with grad) and the reference's
    /// <paramref name="referenceLogProbs"/> (detached by the caller): a new tensor in the caller's scope; its temporaries are freed.
    /// </summary>
    public Tensor PerToken(Tensor logProbs, Tensor referenceLogProbs)
    {
        ArgumentNullException.ThrowIfNull(logProbs);
        ArgumentNullException.ThrowIfNull(referenceLogProbs);
        using var scope = NewDisposeScope();                         // only the estimate leaves, with or without a caller's scope
        return scope.MoveToOuter(Estimate(logProbs, referenceLogProbs));
    }

    private Tensor Estimate(Tensor logProbs, Tensor referenceLogProbs)
    {
        var u = referenceLogProbs - logProbs;
        if (Clamp) u = u.clamp(-20, 20);
        Tensor K3Value(Tensor v)
        {
            var k = v.exp() - v - 1;
            return Clamp ? k.clamp(-10, 10) : k;
        }
        switch (Estimator)
        {
            case KlEstimator.K1: return -u;
            case KlEstimator.K2: return u.square() * 0.5;
            case KlEstimator.K3: return K3Value(u);
            default:
                var k2 = u.square() * 0.5;
                Tensor shift;
                using (no_grad()) shift = K3Value(u.detach()) - k2.detach();
                return k2 + shift;
        }
    }
}

/// <summary>How the rollout/trainer mismatch weight is formed from delta_t = l_old - l_beh.</summary>
public enum RolloutCorrectionLevel
{
    /// <summary>w_t = exp(delta_t) per token (TIS / token MIS).</summary>
    Token,

    /// <summary>w = exp(sum_t m delta_t) per sequence: the product of the token ratios, not their geometric mean.</summary>
    Sequence,
}

/// <summary>What happens to a weight outside [Min, Max].</summary>
public enum RolloutCorrectionMode
{
    /// <summary>Clamped to the bounds (truncated importance sampling).</summary>
    Truncate,

    /// <summary>Set to 0: the token or sequence is dropped (masked importance sampling, ICE-POP).</summary>
    Mask,
}

/// <summary>
/// The rollout/trainer mismatch correction: the inference engine that sampled (vLLM, SGLang) computes slightly different
/// log-probs l_beh than the trainer's l_old, so each token's loss is multiplied by a detached importance weight built from
/// delta_t = l_old - l_beh. TRL's default with vLLM: sequence level, mask, max 3 (vllm_importance_sampling_*).
/// </summary>
public sealed record RolloutCorrection
{
    /// <summary>A correction.</summary>
    /// <param name="level">Token or sequence weights.</param>
    /// <param name="mode">Truncate or mask outside the bounds.</param>
    /// <param name="max">C_max (TRL default 3); null: no upper bound.</param>
    /// <param name="min">C_min; null: no lower bound (TRL's default).</param>
    /// <exception cref="ArgumentException">Undefined level or mode, a bound that is not positive and finite, or min &gt; max.</exception>
    public RolloutCorrection(RolloutCorrectionLevel level, RolloutCorrectionMode mode, double? max = 3.0, double? min = null)
    {
        if (!Enum.IsDefined(level)) throw new ArgumentException($"level {(int)level} is not a RolloutCorrectionLevel.", nameof(level));
        if (!Enum.IsDefined(mode)) throw new ArgumentException($"mode {(int)mode} is not a RolloutCorrectionMode.", nameof(mode));
        if (max is { } hi && !(hi > 0 && double.IsFinite(hi)))
            throw new ArgumentOutOfRangeException(nameof(max), hi, "the upper bound C_max must be positive and finite (or null for none).");
        if (min is { } lo && !(lo >= 0 && double.IsFinite(lo)))
            throw new ArgumentOutOfRangeException(nameof(min), lo, "the lower bound C_min must be finite and >= 0 (or null for none).");
        if (min is { } a && max is { } b && a > b)
            throw new ArgumentException($"min ({a}) must not exceed max ({b}).", nameof(min));
        (Level, Mode, Max, Min) = (level, mode, max, min);
    }

    /// <summary>Token or sequence weights.</summary>
    public RolloutCorrectionLevel Level { get; }

    /// <summary>Truncate or mask.</summary>
    public RolloutCorrectionMode Mode { get; }

    /// <summary>C_max, or null.</summary>
    public double? Max { get; }

    /// <summary>C_min, or null.</summary>
    public double? Min { get; }

    /// <summary>TRL's vllm_importance_sampling_mode names: token_truncate, token_mask, sequence_truncate, sequence_mask.</summary>
    /// <exception cref="ArgumentException">Another name.</exception>
    public static RolloutCorrection FromTrl(string mode, double? clipMax = 3.0, double? clipMin = null) => mode switch
    {
        "token_truncate" => new(RolloutCorrectionLevel.Token, RolloutCorrectionMode.Truncate, clipMax, clipMin),
        "token_mask" => new(RolloutCorrectionLevel.Token, RolloutCorrectionMode.Mask, clipMax, clipMin),
        "sequence_truncate" => new(RolloutCorrectionLevel.Sequence, RolloutCorrectionMode.Truncate, clipMax, clipMin),
        "sequence_mask" => new(RolloutCorrectionLevel.Sequence, RolloutCorrectionMode.Mask, clipMax, clipMin),
        _ => throw new ArgumentException(
            $"vllm_importance_sampling_mode '{mode}' is not one of token_truncate, token_mask, sequence_truncate, sequence_mask.", nameof(mode)),
    };

    /// <summary>The detached weights [N, T] (a sequence's weight at each of its tokens).</summary>
    internal Tensor Weights(TokenTerms terms)
    {
        using var noGrad = no_grad();
        var delta = (terms.OldLogProbs - terms.BehaviourLogProbs!) * terms.Mask;
        var w = Level == RolloutCorrectionLevel.Token ? delta.exp() : terms.Expand(terms.SequenceSum(delta).exp());
        if (Mode == RolloutCorrectionMode.Truncate)
            return w.clamp(Min ?? double.NegativeInfinity, Max ?? double.PositiveInfinity);
        var outside = (w < (Min ?? double.NegativeInfinity)) | (w > (Max ?? double.PositiveInfinity));
        return w.masked_fill(outside, 0.0);
    }
}
