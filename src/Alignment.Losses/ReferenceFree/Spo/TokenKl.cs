using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Exact token-level KL(policy || reference) on sampled sequences, for SPO's global regulariser.
/// </summary>
/// <remarks>
/// <para>For each sample s and valid position t: KL_st = sum_v p_v (log p_v - log q_v), with p = softmax(policy logits)
/// and q = softmax(reference logits) over the full vocabulary. Per sample: KL_s = sum over valid t of KL_st.</para>
/// <para>Memory: rows are processed in chunks of at most <see cref="DefaultChunkElements"/> logits, so no fp32 copy of a
/// whole [S, T, V] tensor is ever held; the backward pass recomputes each chunk and writes the gradient in the policy
/// logits' dtype. The gradient flows into the policy logits only (the reference is a constant).</para>
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
            var weights = (mask.detach() != 0).to_type(dtype);
            var input = policyLogits.requires_grad ? policyLogits.view(policyLogits.shape) : policyLogits;   // see SequenceLogProbs
            var perPosition = TokenKlFunction.apply(input, referenceLogits.detach(), weights, TokensPerChunk(policyLogits.shape[2], chunkElements), dtype);
            return perPosition.sum(1).MoveToOuterDisposeScope();
        });
    }

    /// <summary>Token positions per chunk so that one fp32 chunk holds at most <paramref name="chunkElements"/> values.</summary>
    internal static long TokensPerChunk(long vocab, long chunkElements) => Math.Max(1, chunkElements / vocab);

    /// <summary>Masked per-position KL [S, T]; the backward pass recomputes the softmaxes chunk by chunk.</summary>
    private sealed class TokenKlFunction : LibraryFunction<TokenKlFunction>
    {
        public override string Name => "AlignmentLosses.TokenKl";

        protected override Tensor Forward(autograd.AutogradContext ctx, object[] vars)
        {
            var policy = (Tensor)vars[0];
            var reference = (Tensor)vars[1];
            var weights = (Tensor)vars[2];
            var chunk = (long)vars[3];
            var dtype = (ScalarType)vars[4];
            var result = empty(policy.shape[0], policy.shape[1], dtype: dtype, device: policy.device);
            foreach (var block in ChunkMath.Blocks(policy.shape[0], policy.shape[1], chunk))
            {
                using var inner = NewDisposeScope();
                var logp = nn.functional.log_softmax(block.Rows2D(policy, dtype), 1);
                var logq = nn.functional.log_softmax(block.Rows2D(reference, dtype), 1);
                block.Of(result).copy_((logp.exp() * (logp - logq)).sum(1).view(block.Rows, block.Tokens));
            }
            ctx.save_for_backward(new List<Tensor> { policy, reference, weights });
            ctx.save_data("chunk", chunk);
            ctx.save_data("dtype", dtype);
            return result.masked_fill_(weights == 0, 0).mul_(weights);
        }

        protected override Tensor?[] Backward(autograd.AutogradContext ctx, IReadOnlyList<Tensor> saved, Tensor grad_output)
        {
            Tensor policy = saved[0], reference = saved[1], weights = saved[2];
            var chunk = (long)ctx.get_data("chunk")!;
            var dtype = (ScalarType)ctx.get_data("dtype")!;
            var scale = grad_output.to_type(dtype) * weights;                                // [S, T]
            var grad = empty_like(policy);
            foreach (var block in ChunkMath.Blocks(policy.shape[0], policy.shape[1], chunk))
            {
                using var inner = NewDisposeScope();
                var logp = nn.functional.log_softmax(block.Rows2D(policy, dtype), 1);
                var logq = nn.functional.log_softmax(block.Rows2D(reference, dtype), 1);
                var p = logp.exp();
                var diff = logp - logq;
                var kl = (p * diff).sum(1, keepdim: true);
                // d KL / d z_v = p_v * ((log p_v - log q_v) - KL); masked positions get an exact 0
                var g = block.Flat(scale).unsqueeze(1);
                var blockGrad = (p * (diff - kl) * g).masked_fill_(g == 0, 0);
                block.Of(grad).copy_(blockGrad.view(block.Rows, block.Tokens, policy.shape[2]));
            }
            return new Tensor?[] { grad, null, null, null, null };
        }
    }
}
