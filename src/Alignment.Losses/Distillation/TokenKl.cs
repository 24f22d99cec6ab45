using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Exact token-level KL(policy || reference) on sampled sequences, for SPO's global regulariser: the distillation
/// family's reverse KL (<see cref="TokenDivergence.ReverseKl"/>, student = policy, teacher = reference) summed per sample.
/// </summary>
/// <remarks>
/// <para>For each sample s and valid position t: KL_st = sum_v p_v (log p_v - log q_v), with p = softmax(policy logits)
/// and q = softmax(reference logits) over the full vocabulary. Per sample: KL_s = sum over valid t of KL_st.</para>
/// <para>Memory: rows are processed in chunks of at most <see cref="DefaultChunkElements"/> logits, so no fp32 copy of a
/// whole [S, T, V] tensor is ever held; the backward pass recomputes each chunk and writes the gradient in the policy
/// logits' dtype. The gradient flows into the policy logits only (the reference is a constant). The pass is
/// <see cref="DistillationLoss"/>'s (one chunked engine for every per-token divergence).</para>
/// </remarks>
public static class TokenKl
{
    /// <summary>The default chunk size: 16 Mi logits (64 MiB per fp32 temporary).</summary>
    public const long DefaultChunkElements = 16L << 20;

    /// <summary>Computes KL_s [S] for each sample.</summary>
    /// <param name="policyLogits">[S, T, V] policy next-token logits (with grad), any floating dtype.</param>
    /// <param name="referenceLogits">[S, T, V] reference next-token logits (no grad is taken).</param>
    /// <param name="mask">[S, T]: nonzero (or true) where the position counts (completion tokens), 0 elsewhere; bool or
    /// numeric (not negative), and finite when floating.</param>
    /// <param name="chunkElements">Upper bound on logits per fp32 chunk (default <see cref="DefaultChunkElements"/>).</param>
    /// <returns>[S] float32 (float64 for float64 logits) per-sample KL, differentiable with respect to <paramref name="policyLogits"/>.</returns>
    /// <exception cref="ArgumentException">A shape, dtype or device is invalid, or the logits (or a floating mask) hold NaN/Inf.</exception>
    /// <exception cref="InsufficientMemoryException">A chunk or the gradient cannot be allocated.</exception>
    public static Tensor Compute(Tensor policyLogits, Tensor referenceLogits, Tensor mask, long chunkElements = DefaultChunkElements)
    {
        Guard.Usable(policyLogits, nameof(policyLogits));
        Guard.Usable(referenceLogits, nameof(referenceLogits));
        Guard.Usable(mask, nameof(mask));
        Guard.Rank(policyLogits, 3, nameof(policyLogits), "of logits [S, T, V]");
        Guard.Floating(policyLogits, nameof(policyLogits));
        Guard.Floating(referenceLogits, nameof(referenceLogits));
        Guard.NotEmpty(policyLogits, nameof(policyLogits));
        if (!referenceLogits.shape.SequenceEqual(policyLogits.shape))
            throw new ArgumentException($"referenceLogits must have the policy logits' shape {Guard.Shape(policyLogits)}; got {Guard.Shape(referenceLogits)}.", nameof(referenceLogits));
        if (mask.dim() != 2 || mask.shape[0] != policyLogits.shape[0] || mask.shape[1] != policyLogits.shape[1])
            throw new ArgumentException($"mask must have shape [{policyLogits.shape[0]}, {policyLogits.shape[1]}] (samples x positions); got {Guard.Shape(mask)}.", nameof(mask));
        if (mask.is_complex())
            throw new ArgumentException($"mask must be bool, integer or floating; got {mask.dtype}.", nameof(mask));
        Guard.SameDevice(policyLogits, nameof(policyLogits), referenceLogits, nameof(referenceLogits));
        Guard.SameDevice(policyLogits, nameof(policyLogits), mask, nameof(mask));
        if (chunkElements < 1) throw new ArgumentOutOfRangeException(nameof(chunkElements), chunkElements, "chunkElements must be >= 1.");

        return Native.Run("TokenKl.Compute", () => $"logits {Native.Describe(policyLogits)}", () =>
        {
            using var scope = NewDisposeScope();
            Guard.AllFinite((policyLogits, nameof(policyLogits)), (referenceLogits, nameof(referenceLogits)), (mask.is_floating_point() ? mask : null, nameof(mask)));
            if (mask.dtype != ScalarType.Bool && (mask.detach() < 0).any().item<bool>())
                throw new ArgumentException("mask holds negative values; it marks the positions that count with nonzero (1 or true) and the others with 0.", nameof(mask));
            var dtype = policyLogits.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
            var valid = mask.detach() != 0;
            // the distillation family's chunked pass: reverse KL(student = policy || teacher = reference) at tau 1, no labels
            var plan = new DistillationPlan(false, false, TeacherSource.Logits, false, false, TokensPerChunk(policyLogits.shape[2], chunkElements), dtype,
                TokenDivergence.ReverseKl(), false);
            var targets = zeros(valid.shape, dtype: ScalarType.Int64, device: valid.device);
            var perPosition = DistillationFunction.Run(plan, new[] { policyLogits, referenceLogits.detach(), targets, valid })[0];
            return perPosition.sum(1).MoveToOuterDisposeScope();
        });
    }

    /// <summary>Token positions per chunk so that one fp32 chunk holds at most <paramref name="chunkElements"/> values.</summary>
    internal static long TokensPerChunk(long vocab, long chunkElements) => Math.Max(1, chunkElements / vocab);
}
