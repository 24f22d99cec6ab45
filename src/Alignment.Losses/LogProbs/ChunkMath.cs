using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// The per-chunk maths shared by the chunked log-prob paths (from logits, and from hidden states through the head):
/// one [len, V] block of logits in the compute dtype in, per-token logsumexp and target log-prob out; and the
/// gradient of sum_t g_t * log softmax(z_t)[y_t] with respect to the block, g * (onehot(y) - softmax(z)).
/// </summary>
internal static class ChunkMath
{
    /// <summary>Returns (logsumexp [len], target log-prob [len]) of a block of logits [len, V].</summary>
    internal static (Tensor Lse, Tensor TargetLogp) Forward(Tensor block, Tensor targets)
    {
        var lse = block.logsumexp(1);
        var target = block.gather(1, targets.unsqueeze(1)).squeeze(1);
        return (lse, target - lse);
    }

    /// <summary>
    /// d/d block of sum_t g_t log softmax(block_t)[y_t] = g * (onehot(y) - softmax(block)); overwrites <paramref name="block"/>.
    /// Rows with g = 0 (masked positions) get an exact 0, even where their logits are not finite.
    /// </summary>
    internal static Tensor GradInPlace(Tensor block, Tensor lse, Tensor targets, Tensor g)
    {
        var gradient = block.sub_(lse.unsqueeze(1)).exp_().mul_(-g.unsqueeze(1));   // -g * softmax
        gradient.scatter_add_(1, targets.unsqueeze(1), g.unsqueeze(1));              // + g at the target
        return gradient.masked_fill_((g == 0).unsqueeze(1), 0);
    }

    /// <summary>Sums token log-probs over valid positions, selecting (not multiplying) so that masked NaN/Inf cannot leak in.</summary>
    internal static Tensor MaskedSum(Tensor tokenLogp, Tensor weights) => tokenLogp.masked_fill(weights == 0, 0).sum(1);

    /// <summary>Token ranges [n, t0, t0 + len) of at most <paramref name="chunk"/> tokens.</summary>
    internal static IEnumerable<(long N, long T0, long Len)> Chunks(long n, long t, long chunk)
    {
        for (long i = 0; i < n; i++)
            for (long t0 = 0; t0 < t; t0 += chunk)
                yield return (i, t0, Math.Min(chunk, t - t0));
    }
}
