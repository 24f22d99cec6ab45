using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Options of <see cref="DistillationLoss"/>: loss per token = w_hard * CE(student, label) + w_soft * divergence(student,
/// teacher), reduced over the valid tokens. Immutable; validated on construction.
/// </summary>
/// <remarks>
/// Defaults are TRL's GKD trainer (<c>generalized_jsd_loss</c>): JSD at beta 0.5, tau 1, soft weight 1, no hard loss,
/// token mean over the label tokens. <see cref="Liger"/> gives Liger's <c>LigerFusedLinearJSDLoss</c> defaults (hard and
/// soft weights 0.5 / 0.5), <see cref="TrlDistillation"/> TRL's distillation trainer (reverse KL, its temperature in the
/// loss).
/// </remarks>
public sealed record DistillationOptions
{
    /// <summary>The divergence per token (default: generalised JSD at beta 0.5, tau 1: TRL's GKD).</summary>
    public TokenDivergence Divergence
    {
        get;
        init => field = value ?? throw new ArgumentNullException(nameof(Divergence));
    } = TokenDivergence.Jsd();

    /// <summary>w_hard: the weight of the student's cross-entropy on the labels, at temperature 1 (Liger: 0.5; TRL: 0, the default).
    /// Needs labels.</summary>
    public double HardWeight
    {
        get;
        init => field = Guard.Weight(value, nameof(HardWeight));
    }

    /// <summary>w_soft: the weight of the divergence (default 1; Liger 0.5).</summary>
    public double SoftWeight
    {
        get;
        init => field = Guard.Weight(value, nameof(SoftWeight));
    } = 1;

    /// <summary>
    /// How per-token losses become one number (default <see cref="TokenReduction.TokenMean"/>: sum over valid tokens / their
    /// number, TRL's "batchmean" with labels and Liger's normalisation; with a <see cref="TokenWindow"/> the window's count,
    /// TRL's num_items_in_batch).
    /// </summary>
    public TokenReduction Reduction
    {
        get;
        init => field = value ?? throw new ArgumentNullException(nameof(Reduction));
    } = TokenReduction.TokenMean;

    /// <summary>Label value of positions to skip (default -100).</summary>
    public long IgnoreIndex { get; init; } = -100;

    /// <summary>Tokens per chunk; null: as many as fit in a quarter of <see cref="SequenceLogProbsOptions.DefaultCpuChunkElements"/>
    /// (CPU) or <see cref="SequenceLogProbsOptions.DefaultCudaChunkElements"/> (CUDA) logits, since a chunk holds both models'
    /// logits and about six more [rows, V] buffers (e.g. 64 tokens at V = 16,384 on the CPU).</summary>
    public long? ChunkTokens
    {
        get;
        init => field = value is null or >= 1 ? value : throw new ArgumentOutOfRangeException(nameof(ChunkTokens), value, "ChunkTokens must be >= 1 (or null for the default).");
    }

    /// <summary>When true (default), NaN/Inf logits or hidden states at valid positions, or a non-finite loss, raise a clear error
    /// (one synchronisation with the call's other checks).</summary>
    public bool CheckFinite { get; init; } = true;

    /// <summary>TRL's GKD trainer: generalised JSD at <paramref name="beta"/> (default 0.5), tau 1, soft weight 1.</summary>
    public static DistillationOptions TrlGkd(double beta = 0.5) => new() { Divergence = TokenDivergence.Jsd(beta) };

    /// <summary>TRL's distillation trainer: JSD at <paramref name="beta"/> (default 1.0: reverse KL) at its <paramref name="temperature"/>.</summary>
    public static DistillationOptions TrlDistillation(double beta = 1.0, double temperature = 1.0) => new() { Divergence = TokenDivergence.Jsd(beta, temperature) };

    /// <summary>Liger-Kernel's <c>LigerFusedLinearJSDLoss</c>: w_hard 0.5 * CE + w_soft 0.5 * JSD(beta 0.5) at tau 1 (its defaults).</summary>
    public static DistillationOptions Liger(double beta = 0.5, double temperature = 1.0, double hardWeight = 0.5, double softWeight = 0.5) =>
        new() { Divergence = TokenDivergence.Jsd(beta, temperature), HardWeight = hardWeight, SoftWeight = softWeight };
}

/// <summary>
/// Distillation from a teacher, per token over the vocabulary (spec §13): w_hard * CE(student, labels) + w_soft *
/// divergence(student, teacher) at each valid position, reduced by <see cref="DistillationOptions.Reduction"/> with the
/// window's counts. The divergences are those of <see cref="TokenDivergence"/> (generalised JSD with TRL's endpoints,
/// forward and reverse KL, total variation; full vocabulary or top-k).
/// </summary>
/// <remarks>
/// <para>Inputs: the student and the teacher as logits, as hidden states with their LM heads (the fused path: chunk by
/// chunk forward and backward, no [N, T, V] ever built for either model), or the teacher as precomputed top-k; padded
/// [N, T, ·] or packed [1, P, ·] with <see cref="SequenceBoundaries"/>; labels with the ignore index, a mask, and the
/// alignment (ShiftByOne for a causal LM's logits against its input ids). The teacher gets no gradient.</para>
/// <para>The result is a <see cref="TokenLossResult"/>: loss, per-token losses (0 where no token counts), per-sequence
/// means and metrics <c>distillation/divergence</c> and (with labels) <c>distillation/cross_entropy</c>, token means over
/// the micro-batch. Gradient accumulation and data parallelism: pass a <see cref="TokenWindow"/> with the window's token
/// count (TRL's num_items_in_batch) and data-parallel size; the loss is then D times its share of the window's.</para>
/// <para>An empty micro-batch (no valid token) is an error unless a window says it is part of a larger one (then it adds 0).
/// Every temporary is disposed before a call returns, with or without a caller's dispose scope.</para>
/// </remarks>
public sealed class DistillationLoss
{
    /// <summary>Creates the loss (default options: TRL's GKD).</summary>
    /// <exception cref="ArgumentException">Both weights are 0.</exception>
    public DistillationLoss(DistillationOptions? options = null)
    {
        Options = options ?? new DistillationOptions();
        if (Options.HardWeight == 0 && Options.SoftWeight == 0)
            throw new ArgumentException("HardWeight and SoftWeight are both 0: the loss would be identically 0.", nameof(options));
    }

    /// <summary>The options.</summary>
    public DistillationOptions Options { get; }

    /// <summary>"distillation".</summary>
    public string Name { get; } = "distillation";

    /// <summary>The loss from both models' logits [N, T, V].</summary>
    /// <param name="studentLogits">[N, T, V] student logits (with grad).</param>
    /// <param name="teacherLogits">[N, T, V] teacher logits (no grad is taken).</param>
    /// <param name="labels">[N, T] int64 ids: the hard loss's targets, and the ignore index marks positions to skip; null: every
    /// position counts (subject to the mask), and no hard loss.</param>
    /// <param name="mask">Optional [N, T] mask of the positions that count (e.g. the completion).</param>
    /// <param name="alignment">ShiftByOne when the logits at t predict the label at t + 1 (a causal LM's outputs against its input ids).</param>
    /// <param name="window">The optimiser-step window's counts; null: this micro-batch is the window.</param>
    public TokenLossResult Compute(Tensor studentLogits, Tensor teacherLogits, Tensor? labels, Tensor? mask, LabelAlignment alignment,
        TokenWindow? window = null) =>
        Compute(DistillationStudent.FromLogits(studentLogits), DistillationTeacher.FromLogits(teacherLogits), labels, mask, alignment, window);

    /// <summary>The loss from any student and teacher source (logits, hidden states with heads, top-k), padded.</summary>
    /// <param name="labels">[N, T] int64 ids (the hard loss's targets; the ignore index marks positions to skip); null: every position counts, no hard loss.</param>
    /// <param name="mask">Optional [N, T] mask of the positions that count.</param>
    /// <param name="alignment">ShiftByOne when the logits at t predict the label at t + 1.</param>
    /// <param name="window">The optimiser-step window's counts; null: this micro-batch is the window.</param>
    /// <param name="student">The student's logits or hidden states and head.</param>
    /// <param name="teacher">The teacher's logits, hidden states and head, or top-k.</param>
    /// <exception cref="ArgumentException">A shape, dtype, device or value is invalid (the vocabularies differ, NaN logits,
    /// labels out of range, no valid token); the message names the argument.</exception>
    /// <exception cref="InsufficientMemoryException">A chunk or a gradient cannot be allocated.</exception>
    public TokenLossResult Compute(DistillationStudent student, DistillationTeacher teacher, Tensor? labels, Tensor? mask, LabelAlignment alignment,
        TokenWindow? window = null) => ComputeCore(student, teacher, labels, mask, null, alignment, window);

    /// <summary>The loss of a packed (padding-free) batch: S sequences end to end in one row [1, P, ·], with their boundaries;
    /// shifted, no position scores a token of the next sequence.</summary>
    /// <param name="student">The student's logits or hidden states and head, [1, P, ·].</param>
    /// <param name="teacher">The teacher's logits, hidden states and head, or top-k, [1, P, ·].</param>
    /// <param name="labels">[N, T] int64 ids (the hard loss's targets; the ignore index marks positions to skip); null: every position counts, no hard loss.</param>
    /// <param name="mask">Optional [N, T] mask of the positions that count.</param>
    /// <param name="alignment">ShiftByOne when the logits at t predict the label at t + 1.</param>
    /// <param name="window">The optimiser-step window's counts; null: this micro-batch is the window.</param>
    /// <param name="boundaries">The sequences' cumulative lengths.</param>
    /// <exception cref="ArgumentException">A shape, dtype, device or value is invalid; the message names the argument.</exception>
    public TokenLossResult Compute(DistillationStudent student, DistillationTeacher teacher, Tensor? labels, Tensor? mask, SequenceBoundaries boundaries,
        LabelAlignment alignment, TokenWindow? window = null)
    {
        ArgumentNullException.ThrowIfNull(boundaries);
        return ComputeCore(student, teacher, labels, mask, boundaries, alignment, window);
    }

    private TokenLossResult ComputeCore(DistillationStudent student, DistillationTeacher teacher, Tensor? labels, Tensor? mask,
        SequenceBoundaries? boundaries, LabelAlignment alignment, TokenWindow? window)
    {
        ArgumentNullException.ThrowIfNull(student);
        ArgumentNullException.ThrowIfNull(teacher);
        Guard.Defined(alignment, nameof(alignment));
        bool hard = Options.HardWeight > 0;
        if (hard && labels is null)
            throw new ArgumentException($"The hard loss (HardWeight {Options.HardWeight:G}) is the cross-entropy on the labels: pass labels, or set HardWeight = 0.", nameof(labels));
        window?.Validate();
        var layout = DistillationInputs.Validate(student, teacher, Options.Divergence);
        return Native.Run("DistillationLoss.Compute", () => layout.Sizes, () =>
        {
            using var scope = NewDisposeScope();
            var checks = new ValueChecks();
            var ids = labels ?? zeros(layout.Rows, layout.Positions, dtype: ScalarType.Int64, device: layout.Device);
            var prepared = Targets.Prepare(layout.Reference, layout.ReferenceName, layout.Vocab, layout.VocabName, ids, mask, boundaries, alignment,
                new SequenceLogProbsOptions { IgnoreIndex = labels is null ? long.MinValue : Options.IgnoreIndex });
            var (plan, tensors) = DistillationInputs.Plan(student, teacher, Options.Divergence, prepared, layout,
                Options.ChunkTokens ?? layout.DefaultChunk, hard || labels is not null);
            DistillationInputs.CheckTopKIds(teacher, prepared, layout.Vocab, checks);
            var both = DistillationFunction.Run(plan, tensors);
            var divergence = both[0];
            var terms = new TokenTerms(prepared.Valid, both[1], prepared.Segments, plan.DType, checks);
            if (window is null)
            {
                using (no_grad())
                    checks.Add(terms.ValidTokens > 0, () => new ArgumentException(
                        "No position counts in this batch (every label is the ignore index or masked out): the loss would be 0 / 0. A micro-batch " +
                        "without valid tokens is allowed only as part of a larger window (pass a TokenWindow).", labels is null ? nameof(mask) : nameof(labels)));
            }
            var perToken = divergence * Options.SoftWeight;
            if (hard) perToken = perToken - terms.LogProbs * Options.HardWeight;
            perToken = terms.MaskOut(perToken);
            var perSequence = terms.SequenceMean(perToken);
            var loss = Options.Reduction.Reduce(perToken, perSequence, terms, window);
            var metrics = new List<(string, Tensor)> { (MetricNames.DistillationDivergence, terms.TokenMean(divergence)) };
            if (labels is not null) metrics.Add((MetricNames.DistillationCrossEntropy, terms.TokenMean(terms.LogProbs.neg())));
            var (packed, names) = LossEngine.Pack(loss.reshape(1), Array.Empty<string>(), metrics, plan.DType);
            LossEngine.Verify(checks, packed, Options.CheckFinite, () => DistillationInputs.NotFinite(student, teacher, prepared, plan, Options));
            var result = new TokenLossResult(loss, perToken, perSequence, packed.narrow(0, 1, names.Length), names, Name, terms.ValidTokens);
            result.MoveToOuter(scope);
            return result;
        });
    }
}
