using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// One micro-batch for a token-level objective (<see cref="ITokenLoss"/>: GRPO and its family): per-token log-probs of
/// sampled completions under the policy, which tokens count, the detached log-probs of the sampling, reference and
/// inference-engine policies, and the advantages.
/// </summary>
/// <remarks>
/// <para>Layout: padded, one completion per row ([N, T], <see cref="Boundaries"/> null), or packed, every completion end to
/// end in one row ([1, P] with <see cref="Boundaries"/> giving the sequences, as for <see cref="SequenceLogProbs"/>). Every
/// per-token tensor has the layout of <see cref="LogProbs"/>; values where <see cref="Mask"/> is 0 are never read (NaN there
/// is harmless). Build it from the log-prob pass with <see cref="FromLogProbs"/>, so that no [N, T, V] tensor is ever kept:
/// <c>SequenceLogProbs</c> and <c>FusedLinearLogProbs</c> give the per-token log-probs, the mask and (with
/// <see cref="SequenceLogProbsOptions.StepStatistics"/>) the per-token entropy.</para>
/// <para>The batch holds references to the caller's tensors and owns none of them.</para>
/// </remarks>
public sealed class TokenBatch
{
    /// <summary>A padded ([N, T]) or packed ([1, P] with <see cref="Boundaries"/>) batch.</summary>
    /// <param name="logProbs">l [N, T]: log p(y_t | x, y_&lt;t) of each sampled token under the policy, with grad, at the sampling
    /// temperature (logits / temperature before the log-softmax).</param>
    /// <param name="mask">m [N, T]: nonzero where the token counts (completion tokens; 0 for prompt, padding, tool output).
    /// Bool, integer or floating.</param>
    public TokenBatch(Tensor logProbs, Tensor mask)
    {
        LogProbs = logProbs ?? throw new ArgumentNullException(nameof(logProbs));
        Mask = mask ?? throw new ArgumentNullException(nameof(mask));
    }

    /// <summary>l [N, T]: the policy's per-token log-probs of the sampled tokens (with grad).</summary>
    public Tensor LogProbs { get; }

    /// <summary>m [N, T]: which tokens count (nonzero) and which do not (0).</summary>
    public Tensor Mask { get; }

    /// <summary>
    /// l_old [N, T] (detached): the same tokens under the policy that sampled them. Null (default) means one optimisation
    /// step per generation, l_old = sg(l): the ratio is 1 but its gradient is not 0 (TRL's and verl's convention).
    /// </summary>
    public Tensor? OldLogProbs { get; init; }

    /// <summary>l_ref [N, T] (detached): the reference model's log-probs, for a KL term. Required when the loss has one.</summary>
    public Tensor? ReferenceLogProbs { get; init; }

    /// <summary>
    /// l_beh [N, T] (detached): the inference engine's own log-probs of the sampled tokens (e.g. vLLM's), for the
    /// rollout/trainer mismatch correction (<see cref="RolloutCorrection"/>). Required when the loss has one.
    /// </summary>
    public Tensor? BehaviourLogProbs { get; init; }

    /// <summary>
    /// A (detached): per sequence [N] (GRPO, RLOO, ...; broadcast over the sequence's tokens) or per token in the layout of
    /// <see cref="LogProbs"/> (REINFORCE++, GAE, on-policy distillation). From <see cref="Advantages"/>' estimators.
    /// Required by the policy-gradient losses.
    /// </summary>
    public Tensor? Advantages { get; init; }

    /// <summary>
    /// H [N, T]: the per-token entropy at the sampling temperature, reported as the "entropy" metric. With grad (your
    /// own entropy computation) it can also carry an entropy bonus (<see cref="PolicyGradientOptions.EntropyCoefficient"/>);
    /// the log-prob pass's entropy (<see cref="SequenceLogProbsResult.TokenEntropy"/>) has none.
    /// </summary>
    public Tensor? Entropy { get; init; }

    /// <summary>The sequences of a packed batch ([1, P] tensors; <see cref="SequenceBoundaries.TotalTokens"/> = P). Null: padded.</summary>
    public SequenceBoundaries? Boundaries { get; init; }

    /// <summary>
    /// The optimiser-step window's global counts (all micro-batches of gradient accumulation, all data-parallel ranks),
    /// which the reduction divides by. Null (default): this micro-batch is the whole window (one process, no accumulation).
    /// </summary>
    public TokenWindow? Window { get; init; }

    /// <summary>Segments from the log-prob pass (<see cref="FromLogProbs"/>): the packed layout of its scored positions.</summary>
    internal Segments? ScoredSegments { get; init; }

    /// <summary>
    /// The batch for the log-probs of one pass (padded or packed), with their mask and, when the pass computed step
    /// statistics, their per-token entropy; the sampling policy's, reference's and inference engine's log-probs of the
    /// same tokens come from passes over the same batch (same layout), detached.
    /// </summary>
    /// <param name="policy">The policy's log-probs of the sampled completions (with grad).</param>
    /// <param name="advantages">A [N] per sequence or per token in the layout of <see cref="SequenceLogProbsResult.TokenLogProbs"/>.</param>
    /// <param name="old">The sampling policy's pass (l_old); null: one optimisation step per generation, l_old = sg(l).</param>
    /// <param name="reference">The reference model's pass, for a KL term.</param>
    /// <param name="behaviour">The inference engine's log-probs of the same tokens in the same layout, for the rollout correction.</param>
    /// <param name="window">The optimiser-step window's counts; null: this micro-batch is the window.</param>
    /// <exception cref="ArgumentNullException"><paramref name="policy"/> is null.</exception>
    /// <exception cref="ArgumentException">A pass has another layout than the policy's (shape or packing).</exception>
    /// <exception cref="ObjectDisposedException">A pass has been disposed.</exception>
    public static TokenBatch FromLogProbs(SequenceLogProbsResult policy, Tensor? advantages = null, SequenceLogProbsResult? old = null,
        SequenceLogProbsResult? reference = null, Tensor? behaviour = null, TokenWindow? window = null)
    {
        ArgumentNullException.ThrowIfNull(policy);
        var shape = policy.TokenLogProbs.shape;
        Tensor? Same(SequenceLogProbsResult? other, string name)
        {
            if (other is null) return null;
            if (!other.TokenLogProbs.shape.SequenceEqual(shape) || other.IsPacked != policy.IsPacked)
                throw new ArgumentException(
                    $"{name} must be a pass over the same batch as policy (token log-probs [{string.Join(", ", shape)}]{(policy.IsPacked ? ", packed" : "")}); " +
                    $"got [{string.Join(", ", other.TokenLogProbs.shape)}]{(other.IsPacked ? ", packed" : "")}.", name);
            return other.TokenLogProbs;
        }
        return new TokenBatch(policy.TokenLogProbs, policy.TokenMask)
        {
            Advantages = advantages,
            OldLogProbs = Same(old, nameof(old)),
            ReferenceLogProbs = Same(reference, nameof(reference)),
            BehaviourLogProbs = behaviour,
            Entropy = policy.TokenEntropy,
            Window = window,
            ScoredSegments = policy.IsPacked ? policy.Segments : null,
        };
    }

    /// <summary>A copy with other window counts (the tensors are shared).</summary>
    public TokenBatch WithWindow(TokenWindow? window) => new(LogProbs, Mask)
    {
        OldLogProbs = OldLogProbs, ReferenceLogProbs = ReferenceLogProbs, BehaviourLogProbs = BehaviourLogProbs,
        Advantages = Advantages, Entropy = Entropy, Boundaries = Boundaries, Window = window, ScoredSegments = ScoredSegments,
    };

    /// <summary>The number of sequences N (rows, or the packed batch's sequences).</summary>
    public long SequenceCount => ScoredSegments?.Count ?? Boundaries?.Count ?? (LogProbs.IsInvalid || LogProbs.dim() < 1 ? 0 : LogProbs.shape[0]);

    /// <summary>The sequence layout after validation: per row, or the packed segments of every position.</summary>
    internal Segments SegmentsFor(Tensor logProbs)
    {
        if (ScoredSegments is { } scored) return scored;
        if (Boundaries is { } b) return Segments.Packed(b.Count, b.SegmentIds(logProbs.shape[1], logProbs.device));
        return Segments.PerRow(logProbs.shape[0]);
    }
}

/// <summary>
/// The global counts of one optimiser-step window (every micro-batch of gradient accumulation on every data-parallel
/// rank), which a <see cref="TokenReduction"/> divides by so that the loss never depends on how the window is cut.
/// </summary>
/// <remarks>
/// <para>Convention: each micro-batch's loss is its share of the window's objective scaled by
/// <see cref="DataParallelSize"/>, loss_part = D * sum_part / count_win. Call backward on every micro-batch's loss
/// <b>without</b> dividing by the number of accumulation steps, and let the data-parallel engine <b>average</b> gradients
/// over ranks (DDP's default): the accumulated, averaged gradient is then exactly the gradient of the whole window's
/// objective, whatever the micro-batches' lengths. (This is TRL's "dapo" convention: num_items_in_batch / num_processes.)
/// An engine that sums gradients over ranks instead passes <c>DataParallelSize = 1</c>.</para>
/// <para>Count the window's tokens and sequences before the first micro-batch's loss (an all-reduce of two numbers); the
/// same counts go to every micro-batch of the window.</para>
/// </remarks>
public sealed record TokenWindow
{
    /// <summary>N_win: the valid (masked-in) tokens of the whole window; null: this micro-batch's. Used by token-mean.</summary>
    public double? Tokens { get; init; }

    /// <summary>S_win: the sequences of the whole window (non-empty ones unless the reduction counts empty ones); null:
    /// this micro-batch's. Used by the sequence means and the constant normaliser.</summary>
    public double? Sequences { get; init; }

    /// <summary>D: the number of data-parallel ranks whose gradients the engine averages. Default 1.</summary>
    public int DataParallelSize { get; init; } = 1;

    /// <summary>
    /// M: the micro-batches (gradient-accumulation steps) of the window on this rank, used only by the local token mean
    /// (TRL "bnpo"), which divides by M as TRL does; the other reductions take the window's counts instead. Default 1.
    /// </summary>
    public int MicroBatches { get; init; } = 1;

    /// <summary>
    /// The entropy threshold of <see cref="PolicyGradientOptions.TopEntropyQuantile"/> over the whole data-parallel batch:
    /// the (1 - q) quantile of every rank's valid tokens' entropies, from
    /// <see cref="GlobalBatch.EntropyThreshold(ICollectives?, IEnumerable{TokenBatch}, double)"/> (TRL gathers the entropies
    /// across processes before taking the quantile). Null (default): the micro-batch's own quantile. Ignored when the
    /// loss keeps every token (q = 1).
    /// </summary>
    public double? EntropyThreshold { get; init; }

    internal void Validate()
    {
        if (EntropyThreshold is { } h && !double.IsFinite(h))
            throw new ArgumentException($"window.EntropyThreshold must be finite (a quantile of finite entropies); got {h}.", "window");
        if (Tokens is { } t && !(t > 0 && double.IsFinite(t)))
            throw new ArgumentException($"window.Tokens must be a positive finite count of the window's valid tokens; got {t}.", "window");
        if (Sequences is { } s && !(s > 0 && double.IsFinite(s)))
            throw new ArgumentException($"window.Sequences must be a positive finite count of the window's sequences; got {s}.", "window");
        if (DataParallelSize < 1)
            throw new ArgumentException($"window.DataParallelSize must be >= 1 (the number of ranks); got {DataParallelSize}.", "window");
        if (MicroBatches < 1)
            throw new ArgumentException($"window.MicroBatches must be >= 1; got {MicroBatches}.", "window");
    }
}
