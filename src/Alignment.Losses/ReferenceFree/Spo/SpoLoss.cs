using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Options of <see cref="SpoLoss"/>.</summary>
public sealed record SpoOptions : PreferenceLossOptions
{
    /// <summary>
    /// alpha in [1e-12, 1e12], the softness exponent: the preference model is P(y_w &gt; y_l) = pi(y_w)^alpha / (pi(y_w)^alpha + pi(y_l)^alpha),
    /// and the optimum under Bradley-Terry is softmax(r / alpha). Larger alpha gives a softer (higher-entropy) policy. Default 1.
    /// </summary>
    public double Alpha { get; init => field = Guard.Scale(value, nameof(Alpha)); } = 1.0;

    /// <summary>
    /// beta_r in [0, 1e12], the weight of the global KL(policy || reference) regulariser. Default 0.1 (a library default; the
    /// paper's values are not public). 0 turns the regulariser off explicitly (the loss is then named "spo_no_kl"); any
    /// other value requires <see cref="PreferenceBatch.KlDivergence"/>.
    /// </summary>
    public double KlWeight { get; init => field = Guard.Weight(value, nameof(KlWeight)); } = 0.1;
}

/// <summary>
/// SPO, Soft Preference Optimization (Sharifnassab et al. 2024, arXiv 2405.00747).
/// </summary>
/// <remarks>
/// <para>Preference term per pair (no reference model): (mu_i / alpha) * softplus(-alpha * (l_pol(y_w) - l_pol(y_l))),
/// with optional detached non-negative weights mu (<see cref="PreferenceBatch.ExampleWeights"/>, default 1).
/// Regulariser: beta_r * KL(pi || pi_ref), the mean of <see cref="PreferenceBatch.KlDivergence"/> (typically
/// <see cref="TokenKl.Compute"/> on sequences sampled from the current policy). Loss = mean preference term + beta_r * KL;
/// per-example losses carry the regulariser spread evenly so that their mean is the loss.</para>
/// <para>The regulariser is never dropped silently: with <see cref="SpoOptions.KlWeight"/> &gt; 0 (the default) a batch without
/// a KL estimate is an error; set KlWeight = 0 to train the preference term alone (named "spo_no_kl"; the metric spo/kl then
/// reads the KL if one is given, else 0). The reference log-probs in the batch, if any, are used only for the reward metrics.</para>
/// <para>What follows the paper and what is reconstructed: the preference model, the alpha-softmax optimum and the
/// global (on-policy) KL regulariser are the paper's stated objective. No public code exists; the paper's weighting
/// function mu could not be recovered, so weights are caller-supplied, and the exact KL estimator (full-vocabulary
/// token-level KL summed over positions) is this library's choice.</para>
/// <para>Gradient of the preference term: always chosen up, rejected down. SPO's preference term equals
/// (1 / alpha) times reference-free DPO with beta = alpha.</para>
/// </remarks>
public sealed class SpoLoss : PreferenceLoss<SpoOptions>
{
    /// <summary>Creates the loss; default alpha 1, beta_r 0.1.</summary>
    public SpoLoss(SpoOptions? options = null) : base(options ?? new SpoOptions()) { }

    /// <inheritdoc />
    /// <remarks>"spo" with the KL regulariser, "spo_no_kl" with <see cref="SpoOptions.KlWeight"/> = 0 (the preference term alone).</remarks>
    public override string Name => Options.KlWeight > 0 ? "spo" : "spo_no_kl";

    /// <inheritdoc />
    protected override double RewardScale => Options.Alpha;

    /// <inheritdoc />
    protected override IEnumerable<(Tensor? Tensor, string Name)> Validate(PreferenceBatch batch, ValueChecks checks)
    {
        if (batch.KlDivergence is null && Options.KlWeight > 0)
            throw new ArgumentException(
                $"SPO's objective is the preference term plus KlWeight ({Options.KlWeight:G}) times KL(policy || reference): set batch.KlDivergence " +
                "(e.g. TokenKl.Compute on sequences sampled from the policy), or set SpoOptions.KlWeight = 0 to train the preference term alone.",
                "batch.KlDivergence");
        if (batch.KlDivergence is { } kl)
        {
            Guard.ScalarOrVector(kl, "batch.KlDivergence");
            batch.Policy.CheckSameDevice(kl, "batch.KlDivergence");
        }
        return new[] { (batch.KlDivergence, "batch.KlDivergence") };
    }

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var alpha = Options.Alpha;
        var preference = PreferenceMath.NegLogSigmoid((terms.PolicyChosen - terms.PolicyRejected) * alpha) / alpha;
        if (batch.ExampleWeights is { } mu) preference = preference * terms.Upcast(mu);
        var kl = batch.KlDivergence is { } k ? Numerics.As(k, terms.DType).mean() : zeros(1, dtype: terms.DType, device: preference.device).squeeze();
        var perExample = preference + kl * Options.KlWeight;
        return new(perExample, new[] { (MetricNames.SpoPreference, preference.mean()), (MetricNames.SpoKl, kl) });
    }

    /// <summary>The weights mu multiply the preference term only (in <see cref="Evaluate"/>), never the global KL.</summary>
    protected override Tensor ApplyExampleWeights(Tensor perExample, Tensor weights) => perExample;

    /// <summary>SPO with default (or given) options.</summary>
    /// <param name="policy">Policy log-probs of the preference pairs (with grad).</param>
    /// <param name="klDivergence">KL(policy || reference) estimate (scalar or [S]) from <see cref="TokenKl.Compute"/>; required unless <see cref="SpoOptions.KlWeight"/> is 0.</param>
    /// <param name="options">Options; default alpha 1, beta_r 0.1.</param>
    public static PreferenceLossResult Compute(PreferenceLogps policy, Tensor? klDivergence = null, SpoOptions? options = null) =>
        new SpoLoss(options).Compute(new PreferenceBatch(policy) { KlDivergence = klDivergence });

    /// <summary>
    /// SPO's listwise preference term for best-of-n data: -(1/alpha) * [alpha * l_best - logsumexp_k(alpha * l_k)], averaged over rows.
    /// With two candidates it equals the pairwise preference term.
    /// </summary>
    /// <param name="candidateLogps">[B, K] policy log-probs of K candidates per prompt (with grad).</param>
    /// <param name="bestIndex">[B] int64 index of the preferred candidate in each row.</param>
    /// <param name="alpha">alpha in [1e-12, 1e12] (default 1).</param>
    /// <returns>The scalar listwise loss (float32, or float64 for float64 inputs).</returns>
    public static Tensor ListwisePreference(Tensor candidateLogps, Tensor bestIndex, double alpha = 1.0)
    {
        Guard.Scale(alpha, nameof(alpha));
        Guard.Usable(candidateLogps, nameof(candidateLogps));
        Guard.Usable(bestIndex, nameof(bestIndex));
        Guard.Rank(candidateLogps, 2, nameof(candidateLogps), "of candidate log-probs [B, K]");
        Guard.Floating(candidateLogps, nameof(candidateLogps));
        Guard.NotEmpty(candidateLogps, nameof(candidateLogps));
        Guard.Rank(bestIndex, 1, nameof(bestIndex), "of best-candidate indices [B]");
        Guard.SameLength(candidateLogps, nameof(candidateLogps), bestIndex, nameof(bestIndex));
        Guard.SameDevice(candidateLogps, nameof(candidateLogps), bestIndex, nameof(bestIndex));
        if (bestIndex.dtype != ScalarType.Int64) throw new ArgumentException($"bestIndex must be int64; got {bestIndex.dtype}.", nameof(bestIndex));
        return Native.Run("SpoLoss.ListwisePreference", () => $"candidate log-probs {Native.Describe(candidateLogps)}", () =>
        {
            using var scope = NewDisposeScope();
            Guard.AllFinite((candidateLogps, nameof(candidateLogps)));
            using (no_grad())
            {
                if (((bestIndex < 0) | (bestIndex >= candidateLogps.shape[1])).any().cpu().item<bool>())
                    throw new ArgumentException($"bestIndex values must lie in [0, {candidateLogps.shape[1]}).", nameof(bestIndex));
            }
            var dtype = Numerics.DTypeFor(candidateLogps);
            var z = Numerics.As(candidateLogps, dtype) * alpha;
            var best = z.gather(1, bestIndex.unsqueeze(1)).squeeze(1);
            var loss = (-(best - z.logsumexp(1)) / alpha).mean();
            bool finite;
            using (no_grad()) finite = isfinite(loss.detach()).item<bool>();
            if (!finite)
                throw new ArithmeticException(
                    $"The listwise SPO loss overflowed {dtype} with alpha = {alpha:G} and candidate log-probs up to {Guard.MaxAbs(new[] { candidateLogps }):G4} in magnitude; reduce alpha or check the inputs.");
            return loss.MoveToOuterDisposeScope();
        });
    }
}
