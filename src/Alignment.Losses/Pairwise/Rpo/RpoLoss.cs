using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Where RPO's weight enters the per-entry loss.</summary>
public enum RpoWeightPlacement
{
    /// <summary>softplus(-beta * W_ij * A_ij): the weight scales the logit inside the sigmoid (the authors' code; the default).</summary>
    InsideSigmoid,

    /// <summary>W_ij * softplus(-beta * A_ij), summed over j: a weighted average of DPO losses (a variant, not the authors' default).</summary>
    OutsideSigmoid,
}

/// <summary>Which RPO contrast is computed. Each is an explicit choice: the loss never switches variant on its own.</summary>
public enum RpoVariant
{
    /// <summary>Every chosen against every rejected, weighted by prompt similarity (<see cref="PreferenceBatch.PromptEmbeddings"/>)
    /// or by a caller's weight matrix (<see cref="PreferenceBatch.RpoWeights"/>); one of the two is required. Named "rpo".</summary>
    Contrast,

    /// <summary>The authors' "diagonal" variant for paired data without embeddings:
    /// L_i = lambda * softplus(-beta * A_ii) + (1 - lambda) * mean over j != i of softplus(-beta * A_ij). Needs N &gt;= 2. Named "rpo_diagonal".</summary>
    Diagonal,

    /// <summary>The authors' variant without embeddings: every chosen against every rejected with W_ij = 1 ("all-pairs DPO").
    /// Named "rpo_all_pairs".</summary>
    AllPairs,
}

/// <summary>Options of <see cref="RpoLoss"/>.</summary>
public sealed record RpoOptions : PreferenceLossOptions
{
    /// <summary>beta in [1e-12, 1e12]. Default 0.1 (the authors'). Because softmax rows sum to 1, the effective beta per contrast entry is about beta / N.</summary>
    public double Beta { get; init => field = Guard.Scale(value, nameof(Beta)); } = 0.1;

    /// <summary>tau in [1e-12, 1e12] of the cosine-softmax weighting. Default 0.5 (the authors sweep 0.25 / 0.5 / 0.75). Ignored when <see cref="Weighting"/> is set.</summary>
    public double Temperature { get; init => field = Guard.Scale(value, nameof(Temperature)); } = 0.5;

    /// <summary>Where the weight enters. Default <see cref="RpoWeightPlacement.InsideSigmoid"/> (the authors').
    /// The diagonal variant always weights outside the sigmoid (its weights are a mixture).</summary>
    public RpoWeightPlacement WeightPlacement { get; init => field = Guard.Defined(value, nameof(WeightPlacement)); } = RpoWeightPlacement.InsideSigmoid;

    /// <summary>The contrast. Default <see cref="RpoVariant.Contrast"/> (needs embeddings or a weight matrix).</summary>
    public RpoVariant Variant { get; init => field = Guard.Defined(value, nameof(Variant)); } = RpoVariant.Contrast;

    /// <summary>lambda in (0, 1] of the diagonal variant. Default 0.8 (the authors').</summary>
    public double DiagonalWeight { get; init => field = Guard.InClosedRange(value, double.Epsilon, 1, nameof(DiagonalWeight)); } = 0.8;

    /// <summary>The similarity-to-weights step; <see langword="null"/> (default) means <see cref="CosineSoftmaxWeighting"/> with <see cref="Temperature"/>.</summary>
    public IRpoWeighting? Weighting { get; init; }
}

/// <summary>
/// RPO, Relative Preference Optimization (Yin et al. 2024, arXiv 2402.10958), following the authors' code
/// (yinyueqin/relative-preference-optimization) where it differs from the paper.
/// </summary>
/// <remarks>
/// <para>With u = l_pol - l_ref for each of M chosen and N rejected examples, the contrast matrix is
/// A_ij = u_w,i - u_l,j (every chosen against every rejected, the diagonal included). Weights W [M, N] come from
/// prompt similarity (<see cref="CosineSoftmaxWeighting"/>: softmax over j of -(1 - cos(e_i, e_j)) / tau) or from a
/// caller-supplied matrix (<see cref="PreferenceBatch.RpoWeights"/>); without either, choose
/// <see cref="RpoVariant.AllPairs"/> (W = 1) or <see cref="RpoVariant.Diagonal"/> explicitly.</para>
/// <para>Default (weight inside the sigmoid): L = (1 / MN) * sum_ij softplus(-beta * W_ij * A_ij).
/// Weight outside: L = (1 / M) * sum_i sum_j W_ij * softplus(-beta * A_ij).
/// Per-example losses are per chosen row i; the loss is their mean.</para>
/// <para>Gradient: always chosen up, rejected down (W &gt; 0). Loss at initialisation: ln 2. With distinct prompts and
/// tau → 0, W → I and L → (1/N) * mean DPO + ((N - 1)/N) * ln 2; with identical prompts W = 1/N.</para>
/// <para>Unpaired data (M ≠ N allowed): <see cref="PreferenceLogps.Unpaired(Tensor, Tensor)"/> with <see cref="PromptEmbeddings.Unpaired"/>.
/// A batch with zero chosen or zero rejected rows is an error: there is no contrast to compute (the authors' trainer
/// skips such steps; skip them in your loop too).</para>
/// <para>Memory: O(M N + (M + N) D); at most three [M, N] matrices are alive at once. On the CPU, a batch whose
/// matrices would not fit in the available memory is an <see cref="InsufficientMemoryException"/> before any is allocated.</para>
/// </remarks>
public sealed class RpoLoss : PreferenceLoss<RpoOptions>
{
    /// <summary>Creates the loss; default beta 0.1, tau 0.5, weight inside the sigmoid.</summary>
    public RpoLoss(RpoOptions? options = null) : base(options ?? new RpoOptions()) { }

    /// <inheritdoc />
    /// <remarks>"rpo", "rpo_all_pairs" or "rpo_diagonal" by <see cref="RpoOptions.Variant"/>, with "_weight_outside"
    /// appended for <see cref="RpoWeightPlacement.OutsideSigmoid"/> (not for the diagonal variant, which is always outside).</remarks>
    public override string Name => Options.Variant switch
    {
        RpoVariant.Diagonal => "rpo_diagonal",
        RpoVariant.AllPairs => Suffix("rpo_all_pairs"),
        _ => Suffix("rpo"),
    };

    private string Suffix(string name) => Options.WeightPlacement == RpoWeightPlacement.OutsideSigmoid ? name + "_weight_outside" : name;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override bool SupportsUnpaired => true;

    /// <summary>The weighting in use (the configured one, or cosine-softmax with <see cref="RpoOptions.Temperature"/>).</summary>
    public IRpoWeighting Weighting => Options.Weighting ?? new CosineSoftmaxWeighting(Options.Temperature);

    /// <inheritdoc />
    protected override IEnumerable<(Tensor? Tensor, string Name)> Validate(PreferenceBatch batch, ValueChecks checks)
    {
        var policy = batch.Policy;
        var embeddings = batch.PromptEmbeddings;
        var extra = new List<(Tensor?, string)>();
        switch (Options.Variant)
        {
            case RpoVariant.Contrast:
                if (embeddings is null && batch.RpoWeights is null)
                    throw new ArgumentException(
                        "RPO's contrast needs prompt embeddings (PreferenceBatch.PromptEmbeddings, or RpoLoss.Compute(policy, reference, promptEmbeddings)) " +
                        "or a weight matrix (PreferenceBatch.RpoWeights). Without either, choose RpoVariant.AllPairs (every pair weighted 1) or RpoVariant.Diagonal explicitly.",
                        "batch.PromptEmbeddings");
                if (embeddings is not null && batch.RpoWeights is not null)
                    throw new ArgumentException("Give RPO either prompt embeddings or a weight matrix, not both.", "batch.RpoWeights");
                break;
            default:
                if (embeddings is not null || batch.RpoWeights is not null)
                    throw new ArgumentException(
                        $"The {Name} variant uses no prompt embeddings or weight matrix (its weights are fixed); use RpoVariant.Contrast to weight by prompt similarity.",
                        embeddings is not null ? "batch.PromptEmbeddings" : "batch.RpoWeights");
                break;
        }
        if (Options.Variant == RpoVariant.Diagonal)
        {
            if (!policy.IsPaired)
                throw new ArgumentException("The diagonal RPO variant needs paired log-probs.", "policy");
            if (policy.ChosenCount < 2)
                throw new ArgumentException($"The diagonal RPO variant needs N >= 2 pairs (it averages over j != i); got {policy.ChosenCount}.", "policy");
        }
        if (embeddings is not null)
        {
            string chosenName = embeddings.IsPaired ? "promptEmbeddings" : "promptEmbeddings.Chosen";
            string rejectedName = embeddings.IsPaired ? "promptEmbeddings" : "promptEmbeddings.Rejected";
            Guard.Usable(embeddings.Chosen, chosenName);
            Guard.Usable(embeddings.Rejected, rejectedName);
            if (embeddings.IsPaired != policy.IsPaired)
                throw new ArgumentException(
                    policy.IsPaired
                        ? "Paired log-probs need PromptEmbeddings.Paired([N, D]); got unpaired embeddings."
                        : "Unpaired log-probs need PromptEmbeddings.Unpaired([M, D], [N, D]); got paired embeddings.",
                    "batch.PromptEmbeddings");
            Guard.SameLength(policy.Chosen, "policy.Chosen", embeddings.Chosen, chosenName);
            Guard.SameLength(policy.Rejected, "policy.Rejected", embeddings.Rejected, rejectedName);
            policy.CheckSameDevice(embeddings.Chosen, chosenName);
            policy.CheckSameDevice(embeddings.Rejected, rejectedName);
            extra.Add((embeddings.Chosen, chosenName));
            if (!embeddings.IsPaired) extra.Add((embeddings.Rejected, "promptEmbeddings.Rejected"));
        }
        if (batch.RpoWeights is { } w)
        {
            Guard.Usable(w, "batch.RpoWeights");
            Guard.Rank(w, 2, "batch.RpoWeights", "of contrast weights [M, N]");
            Guard.Floating(w, "batch.RpoWeights");
            if (w.shape[0] != policy.ChosenCount || w.shape[1] != policy.RejectedCount)
                throw new ArgumentException(
                    $"batch.RpoWeights must have shape [{policy.ChosenCount}, {policy.RejectedCount}] (chosen x rejected); got {Guard.Shape(w)}.", "batch.RpoWeights");
            policy.CheckSameDevice(w, "batch.RpoWeights");
            using (no_grad())
                checks.Add((w >= 0).all(), () => new ArgumentException(
                    "batch.RpoWeights must be non-negative and finite: a negative weight reverses the preference.", "batch.RpoWeights"));
            extra.Add((w, "batch.RpoWeights"));
        }
        // about three [M, N] matrices are alive at the peak (see RpoContrastFunction)
        long m = policy.ChosenCount, n = policy.RejectedCount;
        int element = policy.Chosen.dtype == ScalarType.Float64 || batch.Reference?.Chosen.dtype == ScalarType.Float64 ? 8 : 4;
        Native.EnsureCpuMemory(3 * m * n * element, policy.Device, $"RpoLoss.Compute ({Name})", () => $"three [{m}, {n}] matrices of {element}-byte values");
        return extra;
    }

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var weights = Weights(terms, batch);                                                        // W [M, N], no grad
        var placement = Options.Variant == RpoVariant.Diagonal ? RpoWeightPlacement.OutsideSigmoid : Options.WeightPlacement;
        var perRow = RpoContrastFunction.Apply(terms.ChosenLogRatio, terms.RejectedLogRatio, weights, Options.Beta,
            inside: placement == RpoWeightPlacement.InsideSigmoid);
        return new(perRow, WeightMetrics(weights, terms.IsPaired));
    }

    /// <summary>
    /// The same per-row losses written as plain autograd operations, one op per formula step: the reference the fused
    /// <see cref="RpoContrastFunction"/> is tested against.
    /// </summary>
    internal static Tensor PlainPerRow(Tensor chosenLogRatio, Tensor rejectedLogRatio, Tensor weights, double beta, bool inside)
    {
        var contrast = chosenLogRatio.unsqueeze(1) - rejectedLogRatio.unsqueeze(0);                // A [M, N]
        return inside
            ? PreferenceMath.NegLogSigmoid(contrast * weights * beta).mean(new long[] { 1 })
            : (PreferenceMath.NegLogSigmoid(contrast * beta) * weights).sum(1);
    }

    private Tensor Weights(PreferenceTerms terms, PreferenceBatch batch)
    {
        long m = terms.ChosenLogRatio.shape[0], n = terms.RejectedLogRatio.shape[0];
        var device = terms.ChosenLogRatio.device;
        if (Options.Variant == RpoVariant.Diagonal)
        {
            double lambda = Options.DiagonalWeight, off = (1 - lambda) / (n - 1);
            var eye = torch.eye(n, dtype: terms.DType, device: device);
            return eye.mul_(lambda - off).add_(off);
        }
        if (Options.Variant == RpoVariant.AllPairs) return torch.ones(m, n, dtype: terms.DType, device: device);
        if (batch.PromptEmbeddings is { } e)
        {
            if (Weighting is CosineSoftmaxWeighting cosine) return cosine.ComputeWeights(e.Chosen, e.Rejected, terms.DType, terms.Checks);
            var custom = Weighting.ComputeWeights(e.Chosen, e.Rejected, terms.DType)?.detach()
                ?? throw new InvalidOperationException($"{Weighting.GetType().Name}.ComputeWeights returned null; RPO needs a [{m}, {n}] weight matrix.");
            if (custom.shape.Length != 2 || custom.shape[0] != m || custom.shape[1] != n)
                throw new InvalidOperationException(
                    $"{Weighting.GetType().Name}.ComputeWeights returned shape {Guard.Shape(custom)}; RPO needs [{m}, {n}] (chosen x rejected).");
            if (!custom.is_floating_point() || custom.device_type != device.type || custom.device_index != device.index)
                throw new InvalidOperationException(
                    $"{Weighting.GetType().Name}.ComputeWeights returned a {custom.dtype} tensor on {custom.device}; RPO needs floating weights on {device}.");
            using (no_grad())
                terms.Checks.Add(((custom >= 0) & isfinite(custom)).all(), () => new InvalidOperationException(
                    $"{Weighting.GetType().Name}.ComputeWeights returned negative, NaN or infinite weights; IRpoWeighting implementations must return non-negative, finite weights."));
            return Numerics.As(custom, terms.DType);
        }
        return Numerics.As(batch.RpoWeights!.detach(), terms.DType);
    }

    private static IReadOnlyList<(string, Tensor)> WeightMetrics(Tensor weights, bool paired)
    {
        using var _ = no_grad();
        // entropy of row i of p = W / s_i, s_i = sum_j W_ij: H_i = ln s_i - (sum_j W_ij ln W_ij) / s_i (0 ln 0 = 0),
        // with one temporary [M, N] freed at once instead of materialising p; an all-zero row counts as entropy 0
        var rowSums = weights.sum(1);
        Tensor weightedLogs;
        using (var wlogw = torch.xlogy(weights, weights)) weightedLogs = wlogw.sum(1);
        var positive = rowSums > 0;
        var safeSums = rowSums.where(positive, ones_like(rowSums));
        var entropy = (safeSums.log() - weightedLogs / safeSums).where(positive, zeros_like(rowSums)).mean();
        var metrics = new List<(string, Tensor)> { (MetricNames.RpoRowEntropy, entropy) };
        if (paired) metrics.Insert(0, (MetricNames.RpoDiagonalWeight, weights.diagonal().mean()));
        return metrics;
    }

    /// <summary>
    /// Paired RPO with prompt embeddings: <c>RpoLoss.Compute(policyLogps, refLogps, promptEmbeddings)</c>.
    /// </summary>
    /// <param name="policy">Paired policy log-probs [N] (with grad).</param>
    /// <param name="reference">Paired reference log-probs, or <see langword="null"/> for reference-free.</param>
    /// <param name="promptEmbeddings">[N, D] embedding of each pair's prompt.</param>
    /// <param name="options">Options; default beta 0.1, tau 0.5.</param>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference, Tensor promptEmbeddings, RpoOptions? options = null) =>
        Compute(policy, reference, PromptEmbeddings.PairedNamed(promptEmbeddings, nameof(promptEmbeddings)), options);

    /// <summary>RPO with paired or unpaired prompt embeddings.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference, PromptEmbeddings promptEmbeddings, RpoOptions? options = null) =>
        new RpoLoss(options).Compute(new PreferenceBatch(policy, reference) { PromptEmbeddings = promptEmbeddings ?? throw new ArgumentNullException(nameof(promptEmbeddings)) });

    /// <summary>
    /// RPO without embeddings: the variant must be chosen in <paramref name="options"/> (<see cref="RpoVariant.AllPairs"/> or
    /// <see cref="RpoVariant.Diagonal"/>); with the default <see cref="RpoVariant.Contrast"/> this is an error naming the missing embeddings.
    /// </summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, RpoOptions? options = null) =>
        new RpoLoss(options).Compute(new PreferenceBatch(policy, reference));
}
