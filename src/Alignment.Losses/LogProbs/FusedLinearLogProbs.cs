using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Per-sequence log-probs straight from the last hidden states and the language-model head, without ever materialising
/// the [N, T, V] logits: the fused path for preference training with large vocabularies.
/// </summary>
/// <remarks>
/// <para>Two phases, in one custom autograd function. Forward (phase 1): for each chunk of tokens, logits = h W^T + b
/// (one matmul), keep the per-token logsumexp and target log-prob, free the chunk. The result is the [N] log-probs
/// any <see cref="IPreferenceLoss"/> consumes, so the loss maths is the same code as the unfused path, batch-coupled
/// losses (RPO) included. Backward (phase 2): for each chunk, recompute the logits, form
/// d loss/d logits = g * (onehot - softmax), and accumulate grad_hidden = G W and grad_W += G^T h (and grad_b).</para>
/// <para>Chunks run along tokens within each sequence, so peak memory is bounded by the chunk size whatever T and V are:
/// about ChunkTokens x V fp32 values plus the gradients of W (and h) themselves.</para>
/// <para>Use it with <see cref="Compute"/> then any loss, or with <see cref="ComputeLoss"/> in one call.</para>
/// </remarks>
public static class FusedLinearLogProbs
{
    /// <summary>Computes per-sequence log-probs of <paramref name="labels"/> under softmax(hidden W^T + bias).</summary>
    /// <param name="hidden">[N, T, H] last hidden states (with grad).</param>
    /// <param name="weight">[V, H] head weight (with grad).</param>
    /// <param name="bias">Optional [V] head bias.</param>
    /// <param name="labels">[N, T] int64 target ids.</param>
    /// <param name="mask">Optional [N, T] mask of the tokens that count.</param>
    /// <param name="alignment">Aligned or shifted labels (explicit).</param>
    /// <param name="options">Ignore index and chunk size (tokens per chunk).</param>
    public static SequenceLogProbsResult Compute(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? mask,
        LabelAlignment alignment, SequenceLogProbsOptions? options = null)
    {
        options ??= new SequenceLogProbsOptions();
        Guard.NotDisposed(hidden, nameof(hidden));
        Guard.NotDisposed(weight, nameof(weight));
        Guard.Rank(hidden, 3, nameof(hidden), "of hidden states [N, T, H]");
        Guard.Rank(weight, 2, nameof(weight), "of the head weight [V, H]");
        Guard.Floating(hidden, nameof(hidden));
        Guard.Floating(weight, nameof(weight));
        if (weight.shape[1] != hidden.shape[2])
            throw new ArgumentException($"weight must be [V, {hidden.shape[2]}] to match the hidden size; got {Guard.Shape(weight)}.", nameof(weight));
        Guard.SameDevice(hidden, nameof(hidden), weight, nameof(weight));
        if (bias is not null)
        {
            Guard.NotDisposed(bias, nameof(bias));
            if (bias.dim() != 1 || bias.shape[0] != weight.shape[0])
                throw new ArgumentException($"bias must be [{weight.shape[0]}]; got {Guard.Shape(bias)}.", nameof(bias));
            Guard.SameDevice(hidden, nameof(hidden), bias, nameof(bias));
        }
        using var scope = NewDisposeScope();
        var prepared = Targets.Prepare(hidden, weight.shape[0], labels, mask, alignment, options);   // the logits path's label handling
        var x = alignment == LabelAlignment.ShiftByOne ? hidden.narrow(1, 0, hidden.shape[1] - 1) : hidden;
        var dtype = hidden.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        var weights = prepared.Valid.to_type(dtype);
        var sum = bias is null
            ? LinearFunction.apply(x, weight, prepared.Targets, weights, options.ChunkTokens, dtype)
            : LinearBiasFunction.apply(x, weight, bias, prepared.Targets, weights, options.ChunkTokens, dtype);
        var result = Targets.Finish(sum, weights, "hidden");
        scope.MoveToOuter(result.Sum, result.TokenCounts, result.Mean);
        return result;
    }

    /// <summary>
    /// Any preference loss from hidden states, in one call: the fused log-probs of a batch stacked as [chosen rows;
    /// rejected rows] feed <paramref name="loss"/> with <paramref name="batch"/>'s reference log-probs and side inputs.
    /// </summary>
    /// <param name="loss">Any loss of the library (or your own <see cref="IPreferenceLoss"/>).</param>
    /// <param name="batch">Reference log-probs and side inputs; its <see cref="PreferenceBatch.Policy"/> is replaced by the fused log-probs.</param>
    /// <param name="hidden">[2B, T, H] last hidden states: B chosen rows, then B rejected rows.</param>
    /// <param name="weight">[V, H] head weight.</param>
    /// <param name="bias">Optional [V] head bias.</param>
    /// <param name="labels">[2B, T] int64 target ids.</param>
    /// <param name="mask">Optional [2B, T] mask of the completion tokens.</param>
    /// <param name="alignment">Aligned or shifted labels (explicit).</param>
    /// <param name="options">Ignore index and chunk size.</param>
    public static PreferenceLossResult ComputeLoss(IPreferenceLoss loss, PreferenceBatch batch, Tensor hidden, Tensor weight, Tensor? bias,
        Tensor labels, Tensor? mask, LabelAlignment alignment, SequenceLogProbsOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(loss);
        ArgumentNullException.ThrowIfNull(batch);
        using var scope = NewDisposeScope();
        var logps = Compute(hidden, weight, bias, labels, mask, alignment, options);
        var result = loss.Compute(batch with { Policy = logps.ToPreferenceLogps() });
        result.MoveToOuter(scope);
        return result;
    }

    private static (Tensor Sum, Tensor? GradHidden, Tensor? GradWeight, Tensor? GradBias) Run(Tensor hidden, Tensor weight, Tensor? bias,
        Tensor targets, Tensor weights, long chunk, ScalarType dtype, Tensor? gradOutput)
    {
        long n = hidden.shape[0], t = hidden.shape[1];
        bool backward = gradOutput is not null;
        var tokenLogp = backward ? null : zeros(n, t, dtype: dtype, device: hidden.device);
        var gradHidden = backward ? zeros(hidden.shape, dtype: dtype, device: hidden.device) : null;
        var gradWeight = backward ? zeros(weight.shape, dtype: dtype, device: weight.device) : null;
        var gradBias = backward && bias is not null ? zeros(bias.shape, dtype: dtype, device: weight.device) : null;
        var rowGrad = backward ? gradOutput!.to_type(dtype).unsqueeze(1) * weights : null;
        var w = weight.to_type(dtype);
        var b = bias?.to_type(dtype);
        foreach (var (i, t0, len) in ChunkMath.Chunks(n, t, chunk))
        {
            using var inner = NewDisposeScope();
            var h = hidden[i].narrow(0, t0, len).to_type(dtype);                     // [len, H]
            var logits = b is null ? h.matmul(w.t()) : torch.addmm(b, h, w.t(), 1, 1);        // [len, V]: the one live chunk
            var y = targets[i].narrow(0, t0, len);
            if (!backward)
            {
                tokenLogp![i].narrow(0, t0, len).copy_(ChunkMath.Forward(logits, y).TargetLogp);
                continue;
            }
            var g = rowGrad![i].narrow(0, t0, len);
            var gradLogits = ChunkMath.GradInPlace(logits, logits.logsumexp(1), y, g);  // [len, V]
            gradHidden![i].narrow(0, t0, len).copy_(gradLogits.matmul(w));
            gradWeight!.addmm_(gradLogits.t(), h);
            gradBias?.add_(gradLogits.sum(dim: 0));   // named: a literal 0 would bind to sum(ScalarType)
        }
        return backward ? (null!, gradHidden, gradWeight, gradBias) : (ChunkMath.MaskedSum(tokenLogp!, weights), null, null, null);
    }

    private sealed class LinearFunction : autograd.SingleTensorFunction<LinearFunction>
    {
        public override string Name => "AlignmentLosses.FusedLinearLogProbs";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            Tensor hidden = (Tensor)vars[0], weight = (Tensor)vars[1], targets = (Tensor)vars[2], weights = (Tensor)vars[3];
            ctx.save_for_backward(new List<Tensor> { hidden, weight, targets, weights });
            ctx.save_data("chunk", vars[4]);
            ctx.save_data("dtype", vars[5]);
            return Run(hidden, weight, null, targets, weights, (long)vars[4], (ScalarType)vars[5], null).Sum;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad_output)
        {
            var s = ctx.get_saved_variables();
            var (_, gh, gw, _) = Run(s[0], s[1], null, s[2], s[3], (long)ctx.get_data("chunk")!, (ScalarType)ctx.get_data("dtype")!, grad_output);
            return new List<Tensor> { gh!.to_type(s[0].dtype), gw!.to_type(s[1].dtype), null!, null!, null!, null! };
        }
    }

    private sealed class LinearBiasFunction : autograd.SingleTensorFunction<LinearBiasFunction>
    {
        public override string Name => "AlignmentLosses.FusedLinearLogProbsWithBias";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            Tensor hidden = (Tensor)vars[0], weight = (Tensor)vars[1], bias = (Tensor)vars[2], targets = (Tensor)vars[3], weights = (Tensor)vars[4];
            ctx.save_for_backward(new List<Tensor> { hidden, weight, bias, targets, weights });
            ctx.save_data("chunk", vars[5]);
            ctx.save_data("dtype", vars[6]);
            return Run(hidden, weight, bias, targets, weights, (long)vars[5], (ScalarType)vars[6], null).Sum;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad_output)
        {
            var s = ctx.get_saved_variables();
            var (_, gh, gw, gb) = Run(s[0], s[1], s[2], s[3], s[4], (long)ctx.get_data("chunk")!, (ScalarType)ctx.get_data("dtype")!, grad_output);
            return new List<Tensor> { gh!.to_type(s[0].dtype), gw!.to_type(s[1].dtype), gb!.to_type(s[2].dtype), null!, null!, null!, null! };
        }
    }
}
