using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// The per-chunk maths shared by the chunked log-prob paths (from logits, and from hidden states through the head):
/// one [rows, V] block of logits in the compute dtype in, per-token logsumexp and target log-prob out; and the
/// gradient of sum_t g_t * log softmax(z_t)[y_t] with respect to the block, g * (onehot(y) - softmax(z)).
/// </summary>
internal static class ChunkMath
{
    /// <summary>Returns (logsumexp [rows], target log-prob [rows]) of a block of logits [rows, V]; with <paramref name="fused"/>,
    /// through the managed kernel (<see cref="LogSoftmaxRows"/>) where it applies.</summary>
    internal static (Tensor Lse, Tensor TargetLogp) Forward(Tensor block, Tensor targets, bool fused = false)
    {
        if (fused && Kernel(block))
        {
            var (l, tl) = (empty(block.shape[0], dtype: ScalarType.Float32), empty(block.shape[0], dtype: ScalarType.Float32));
            LogSoftmaxRows.Forward(block, targets.contiguous(), null, l, tl);
            return (l, tl);
        }
        var lse = block.logsumexp(1);
        var target = block.gather(1, targets.unsqueeze(1)).squeeze(1);
        return (lse, target - lse);
    }

    /// <summary>
    /// d/d block of sum_t g_t log softmax(block_t)[y_t] = g * (onehot(y) - softmax(block)); overwrites <paramref name="block"/>.
    /// Rows with g = 0 (masked positions) get an exact 0, even where their logits are not finite.
    /// </summary>
    /// <param name="block">[rows, V] logits, overwritten by the gradient.</param>
    /// <param name="lse">Their logsumexp per row, or null to compute it here.</param>
    /// <param name="targets">[rows] target ids.</param>
    /// <param name="g">[rows] d loss / d target log-prob.</param>
    /// <param name="fused">Through the managed kernel (<see cref="LogSoftmaxRows"/>) where it applies: one pass, in place.</param>
    internal static Tensor GradInPlace(Tensor block, Tensor? lse, Tensor targets, Tensor g, bool fused = false)
    {
        if (KernelTakes(block, g, fused))
        {
            LogSoftmaxRows.Backward(block, block, targets.contiguous(), lse?.contiguous(), g.contiguous());
            return block;
        }
        lse ??= block.logsumexp(1);
        var gradient = block.sub_(lse.unsqueeze(1)).exp_().mul_(-g.unsqueeze(1));   // -g * softmax
        gradient.scatter_add_(1, targets.unsqueeze(1), g.unsqueeze(1));              // + g at the target
        return gradient.masked_fill_((g == 0).unsqueeze(1), 0);
    }

    /// <summary>Whether a 2-D block can take the managed kernel in place: a contiguous float32 CPU block.</summary>
    private static bool Kernel(Tensor block) => block.dtype == ScalarType.Float32 && block.is_contiguous() && LogSoftmaxRows.Supports(block);

    /// <summary>
    /// Whether <see cref="GradInPlace"/> runs the kernel for this block. The kernel writes through the block's memory without
    /// touching its autograd version counter; the libtorch path's in-place ops bump it, so a tensor autograd has saved must
    /// not be given to that path (unpacking it again would fail).
    /// </summary>
    internal static bool KernelTakes(Tensor block, Tensor g, bool fused) => fused && Kernel(block) && g.dtype == ScalarType.Float32;

    /// <summary>Per-token values with exact zeros where <paramref name="valid"/> is false (selecting, so NaN/Inf there cannot leak in).</summary>
    internal static Tensor Masked(Tensor perToken, Tensor valid) => perToken.masked_fill(valid.logical_not(), 0);

    /// <summary>
    /// Per-token entropy -sum_v p_v log p_v of a block of logits [rows, V] with its logsumexp (no grad); a logit of -inf
    /// (probability 0) contributes 0.
    /// </summary>
    internal static Tensor Entropy(Tensor block, Tensor lse)
    {
        var logp = block - lse.unsqueeze(1);
        return logp.exp().mul_(logp).nan_to_num_(0, 0, 0).sum(1).neg_();
    }

    /// <summary>WPO's per-token log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z) of a block of logits [rows, V] (no grad).</summary>
    internal static Tensor LogSumSquares(Tensor block, Tensor lse) => (block * 2).logsumexp(1).sub_(lse * 2);

    /// <summary>
    /// The blocks a [N, T] grid of tokens is processed in, each of at most <paramref name="chunk"/> tokens: groups of whole
    /// sequences when a sequence fits in a chunk (so many short sequences cost a few large kernels, not one small kernel
    /// each), and ranges of positions within one sequence otherwise.
    /// </summary>
    internal static IEnumerable<Block> Blocks(long n, long t, long chunk)
    {
        if (t <= chunk)
        {
            long perBlock = Math.Max(1, chunk / Math.Max(1, t));
            for (long n0 = 0; n0 < n; n0 += perBlock)
                yield return new Block(n0, Math.Min(perBlock, n - n0), 0, t);
            yield break;
        }
        for (long i = 0; i < n; i++)
            for (long t0 = 0; t0 < t; t0 += chunk)
                yield return new Block(i, 1, t0, Math.Min(chunk, t - t0));
    }

    /// <summary>How a head's chunks are processed: tokens per chunk, whether the CPU kernel may run, and whether the
    /// forward pass keeps each chunk's logits for the backward pass (instead of recomputing them).</summary>
    internal readonly record struct Plan(long Tokens, bool Fused, bool Retain = false);

    /// <summary>Sequences [N0, N0 + Rows) at positions [T0, T0 + Tokens).</summary>
    internal readonly record struct Block(long N0, long Rows, long T0, long Tokens)
    {
        /// <summary>Number of tokens in the block.</summary>
        internal long Count => Rows * Tokens;

        /// <summary>The block of an [N, T, ...] tensor, as a view [Rows, Tokens, ...].</summary>
        internal Tensor Of(Tensor x) => x.narrow(0, N0, Rows).narrow(1, T0, Tokens);

        /// <summary>The block's rows of an [N, T, D] tensor as a [Count, D] tensor in <paramref name="dtype"/>: a view when
        /// possible, otherwise one copy of the block (never of the whole tensor).</summary>
        internal Tensor Rows2D(Tensor x, ScalarType dtype) => Of(x).to_type(dtype).reshape(Count, x.shape[2]);

        /// <summary>A fresh (writable) [Count, D] copy of the block in <paramref name="dtype"/>.</summary>
        internal Tensor Copy2D(Tensor x, ScalarType dtype)
        {
            var work = empty(Count, x.shape[2], dtype: dtype, device: x.device);
            work.view(Rows, Tokens, x.shape[2]).copy_(Of(x));
            return work;
        }

        /// <summary>The block of an [N, T] tensor, flattened to [Count].</summary>
        internal Tensor Flat(Tensor x) => Of(x).reshape(Count);
    }
}
