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
    /// <param name="mask">[S, T] 1 where the position counts (completion tokens), 0 elsewhere; bool or numeric.</param>
    /// <param name="chunkElements">Upper bound on logits per fp32 chunk (default <see cref="DefaultChunkElements"/>).</param>
    /// <returns>[S] float32 (float64 for float64 logits) per-sample KL, differentiable with respect to <paramref name="policyLogits"/>.</returns>
    public static Tensor Compute(Tensor policyLogits, Tensor referenceLogits, Tensor mask, long chunkElements = DefaultChunkElements)
    {
        Guard.NotDisposed(policyLogits, nameof(policyLogits));
        Guard.NotDisposed(referenceLogits, nameof(referenceLogits));
        Guard.NotDisposed(mask, nameof(mask));
        Guard.Rank(policyLogits, 3, nameof(policyLogits), "of logits [S, T, V]");
        Guard.Floating(policyLogits, nameof(policyLogits));
        Guard.Floating(referenceLogits, nameof(referenceLogits));
        Guard.NotEmpty(policyLogits, nameof(policyLogits));
        if (!referenceLogits.shape.SequenceEqual(policyLogits.shape))
            throw new ArgumentException($"referenceLogits must have the policy logits' shape {Guard.Shape(policyLogits)}; got {Guard.Shape(referenceLogits)}.", nameof(referenceLogits));
        if (mask.dim() != 2 || mask.shape[0] != policyLogits.shape[0] || mask.shape[1] != policyLogits.shape[1])
            throw new ArgumentException($"mask must have shape [{policyLogits.shape[0]}, {policyLogits.shape[1]}] (samples x positions); got {Guard.Shape(mask)}.", nameof(mask));
        Guard.SameDevice(policyLogits, nameof(policyLogits), referenceLogits, nameof(referenceLogits));
        Guard.SameDevice(policyLogits, nameof(policyLogits), mask, nameof(mask));
        if (chunkElements < 1) throw new ArgumentOutOfRangeException(nameof(chunkElements), chunkElements, "chunkElements must be >= 1.");
        Guard.AllFinite((policyLogits, nameof(policyLogits)), (referenceLogits, nameof(referenceLogits)));

        using var scope = NewDisposeScope();
        var dtype = policyLogits.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        var weights = Numerics.As(mask.detach(), dtype).reshape(-1);
        var perPosition = TokenKlFunction.apply(policyLogits, referenceLogits.detach(), weights, chunkElements, dtype);
        return perPosition.reshape(policyLogits.shape[0], policyLogits.shape[1]).sum(1).MoveToOuterDisposeScope();
    }

    /// <summary>Rows per chunk so that one fp32 chunk holds at most <paramref name="chunkElements"/> values.</summary>
    internal static long RowsPerChunk(long vocab, long chunkElements) => Math.Max(1, chunkElements / vocab);

    /// <summary>Masked per-position KL [S*T]; the backward pass recomputes softmaxes chunk by chunk.</summary>
    private sealed class TokenKlFunction : autograd.SingleTensorFunction<TokenKlFunction>
    {
        public override string Name => "AlignmentLosses.TokenKl";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var policy = (Tensor)vars[0];
            var reference = (Tensor)vars[1];
            var weights = (Tensor)vars[2];
            var chunk = (long)vars[3];
            var dtype = (ScalarType)vars[4];
            long vocab = policy.shape[2];
            var p2 = policy.reshape(-1, vocab);
            var q2 = reference.reshape(-1, vocab);
            long rows = p2.shape[0], step = RowsPerChunk(vocab, chunk);
            var result = empty(rows, dtype: dtype, device: policy.device);
            for (long start = 0; start < rows; start += step)
            {
                using var inner = NewDisposeScope();
                long len = Math.Min(step, rows - start);
                var logp = nn.functional.log_softmax(p2.narrow(0, start, len).to_type(dtype), 1);
                var logq = nn.functional.log_softmax(q2.narrow(0, start, len).to_type(dtype), 1);
                result.narrow(0, start, len).copy_((logp.exp() * (logp - logq)).sum(1));
            }
            ctx.save_for_backward(new List<Tensor> { policy, reference, weights });
            ctx.save_data("chunk", chunk);
            ctx.save_data("dtype", dtype);
            return result * weights;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad_output)
        {
            var saved = ctx.get_saved_variables();
            Tensor policy = saved[0], reference = saved[1], weights = saved[2];
            var chunk = (long)ctx.get_data("chunk")!;
            var dtype = (ScalarType)ctx.get_data("dtype")!;
            long vocab = policy.shape[2];
            var p2 = policy.reshape(-1, vocab);
            var q2 = reference.reshape(-1, vocab);
            long rows = p2.shape[0], step = RowsPerChunk(vocab, chunk);
            var rowScale = (grad_output.to_type(dtype) * weights).unsqueeze(1);
            var grad = empty_like(p2);
            for (long start = 0; start < rows; start += step)
            {
                using var inner = NewDisposeScope();
                long len = Math.Min(step, rows - start);
                var logp = nn.functional.log_softmax(p2.narrow(0, start, len).to_type(dtype), 1);
                var logq = nn.functional.log_softmax(q2.narrow(0, start, len).to_type(dtype), 1);
                var p = logp.exp();
                var diff = logp - logq;
                var kl = (p * diff).sum(1, keepdim: true);
                // d KL / d z_v = p_v * ((log p_v - log q_v) - KL)
                grad.narrow(0, start, len).copy_(p * (diff - kl) * rowScale.narrow(0, start, len));
            }
            return new List<Tensor> { grad.reshape(policy.shape), null!, null!, null!, null! };
        }
    }
}
