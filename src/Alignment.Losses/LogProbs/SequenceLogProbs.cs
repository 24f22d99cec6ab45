using Alignment.Losses.Internal;
using Alignment.Losses.Internal.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>How target tokens line up with logits.</summary>
public enum LabelAlignment
{
    /// <summary>logits[:, t] scores labels[:, t] (labels already shifted by the caller).</summary>
    Aligned,

    /// <summary>The causal-LM convention: logits[:, t] predicts labels[:, t + 1]; the last logit and the first label are dropped.</summary>
    ShiftByOne,
}

/// <summary>Options of <see cref="SequenceLogProbs"/>.</summary>
public sealed record SequenceLogProbsOptions
{
    /// <summary>Label value that marks a position to skip (besides the mask). Default -100 (the Hugging Face convention).</summary>
    public long IgnoreIndex { get; init; } = -100;

    /// <summary>Tokens per fp32 chunk: bounds the extra memory to about ChunkTokens x V x 4 bytes. Default 1024.</summary>
    public long ChunkTokens { get; init => field = value >= 1 ? value : throw new ArgumentOutOfRangeException(nameof(ChunkTokens), value, "ChunkTokens must be >= 1."); } = 1024;
}

/// <summary>Per-sequence log-probabilities from <see cref="SequenceLogProbs.Compute"/>.</summary>
/// <param name="Sum">[N] summed log-probs of the valid (completion) tokens, float32 (float64 for float64 logits), differentiable w.r.t. the logits.</param>
/// <param name="TokenCounts">[N] number of valid tokens per sequence (float, no grad).</param>
/// <param name="Mean">[N] per-token mean log-prob (Sum / TokenCounts; 0 for a sequence with no valid token), differentiable.</param>
public sealed record SequenceLogProbsResult(Tensor Sum, Tensor TokenCounts, Tensor Mean) : IDisposable
{
    /// <summary>Splits a batch stacked as [chosen rows; rejected rows] (first half chosen) into paired log-probs with token counts.</summary>
    public PreferenceLogps ToPreferenceLogps()
    {
        long n = Sum.shape[0];
        if (n % 2 != 0)
            throw new InvalidOperationException($"A stacked chosen/rejected batch needs an even number of rows; got {n}.");
        long half = n / 2;
        return new PreferenceLogps(Sum.narrow(0, 0, half), Sum.narrow(0, half, half), TokenCounts.narrow(0, 0, half), TokenCounts.narrow(0, half, half));
    }

    /// <summary>Releases the three tensors.</summary>
    public void Dispose()
    {
        Sum.Dispose();
        TokenCounts.Dispose();
        Mean.Dispose();
    }
}

/// <summary>
/// Sequence log-probabilities from language-model logits: l(y) = sum over valid positions t of log softmax(logits_t)[y_t],
/// computed chunk by chunk so that memory stays bounded whatever T and V are.
/// </summary>
/// <remarks>
/// <para>The common way (fp32 log_softmax of all [N, T, V] logits, then gather) allocates fp32 copies several times the
/// size of the logits. Here at most one fp32 chunk of <see cref="SequenceLogProbsOptions.ChunkTokens"/> x V values is
/// alive at a time; the forward pass keeps only a logsumexp per token, and the backward pass (a custom autograd
/// function) recomputes each chunk's softmax and writes grad_logits = g * (onehot(y) - softmax) in the logits' dtype.</para>
/// <para>Non-contiguous logits are read in place (no copy of the whole tensor). Labels outside [0, V) at a valid position are
/// an error; NaN/Inf logits at a valid position are an error naming the sequences (at masked positions they are ignored).</para>
/// </remarks>
public static class SequenceLogProbs
{
    /// <summary>Computes per-sequence summed and mean log-probs.</summary>
    /// <param name="logits">[N, T, V] logits (float16, bfloat16, float32 or float64), with grad.</param>
    /// <param name="labels">[N, T] int64 target token ids (<see cref="SequenceLogProbsOptions.IgnoreIndex"/> marks skipped positions).</param>
    /// <param name="mask">Optional [N, T] mask, nonzero / true where the token counts (completion tokens); null = every non-ignored position.</param>
    /// <param name="alignment">Whether labels are already aligned with logits or must be shifted by one (stated explicitly: there is no default).</param>
    /// <param name="options">Ignore index and chunk size.</param>
    public static SequenceLogProbsResult Compute(Tensor logits, Tensor labels, Tensor? mask, LabelAlignment alignment, SequenceLogProbsOptions? options = null)
        => ComputeCore(logits, labels, mask, alignment, options, allowKernels: true);

    /// <summary>
    /// What the fused CUDA kernels are doing: "fused CUDA kernels active on cuda:0 for BFloat16 (...)", or why the last
    /// CUDA call fell back to the chunked path (no NVRTC, no driver, a compile error, a failed self-test, or
    /// ALIGNMENT_LOSSES_CUDA_KERNELS=0). The reason is also traced once (System.Diagnostics.Trace) when it first occurs.
    /// </summary>
    public static string CudaKernelStatus => CudaLogProbKernels.Status;

    /// <summary>The chunked path only (never the CUDA kernels): the reference the kernels are checked against.</summary>
    internal static SequenceLogProbsResult ComputeChunked(Tensor logits, Tensor labels, Tensor? mask, LabelAlignment alignment, SequenceLogProbsOptions? options = null)
        => ComputeCore(logits, labels, mask, alignment, options, allowKernels: false);

    private static SequenceLogProbsResult ComputeCore(Tensor logits, Tensor labels, Tensor? mask, LabelAlignment alignment, SequenceLogProbsOptions? options, bool allowKernels)
    {
        options ??= new SequenceLogProbsOptions();
        Guard.NotDisposed(logits, nameof(logits));
        Guard.Rank(logits, 3, nameof(logits), "of logits [N, T, V]");
        Guard.Floating(logits, nameof(logits));
        using var scope = NewDisposeScope();
        var prepared = Targets.Prepare(logits, logits.shape[2], labels, mask, alignment, options);
        var x = alignment == LabelAlignment.ShiftByOne ? logits.narrow(1, 0, logits.shape[1] - 1) : logits;
        var dtype = logits.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        var weights = prepared.Valid.to_type(dtype);
        Tensor sum;
        if (allowKernels && x.device_type == DeviceType.CUDA && logits.dtype != ScalarType.Float64 && x.stride(2) == 1
            && CudaLogProbKernels.TryGet(x.device, logits.dtype) is { } kernels)
            sum = KernelFunction.apply(x, prepared.Targets, weights, kernels);
        else
            sum = SequenceLogProbFunction.apply(x, prepared.Targets, weights, options.ChunkTokens, dtype);
        var result = Targets.Finish(sum, weights, nameof(logits));
        scope.MoveToOuter(result.Sum, result.TokenCounts, result.Mean);
        return result;
    }

    /// <summary>The fused CUDA path: one kernel pass forward, one backward (see <see cref="CudaLogProbKernels"/>).</summary>
    private sealed class KernelFunction : autograd.SingleTensorFunction<KernelFunction>
    {
        public override string Name => "AlignmentLosses.SequenceLogProbsCuda";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var logits = (Tensor)vars[0];
            var targets = (Tensor)vars[1];
            var weights = (Tensor)vars[2];
            var kernels = (CudaLogProbKernels.Kernels)vars[3];
            var (lse, tokenLogp) = CudaLogProbKernels.LaunchForward(kernels, logits, targets);
            ctx.save_for_backward(new List<Tensor> { logits, targets, weights, lse });
            ctx.save_data("kernels", kernels);
            return ChunkMath.MaskedSum(tokenLogp, weights);
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad_output)
        {
            var s = ctx.get_saved_variables();
            var kernels = (CudaLogProbKernels.Kernels)ctx.get_data("kernels")!;
            var g = (grad_output.to_type(ScalarType.Float32).unsqueeze(1) * s[2].to_type(ScalarType.Float32)).contiguous();
            return new List<Tensor> { CudaLogProbKernels.LaunchBackward(kernels, s[0], s[1], s[3], g), null!, null!, null! };
        }
    }

    /// <summary>Forward: per-sequence sums from chunked logsumexp and target gathers. Backward: chunked g * (onehot - softmax).</summary>
    private sealed class SequenceLogProbFunction : autograd.SingleTensorFunction<SequenceLogProbFunction>
    {
        public override string Name => "AlignmentLosses.SequenceLogProbs";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var logits = (Tensor)vars[0];
            var targets = (Tensor)vars[1];
            var weights = (Tensor)vars[2];
            var chunk = (long)vars[3];
            var dtype = (ScalarType)vars[4];
            long n = logits.shape[0], t = logits.shape[1];
            var tokenLogp = zeros(n, t, dtype: dtype, device: logits.device);
            var lse = zeros(n, t, dtype: dtype, device: logits.device);
            foreach (var (i, t0, len) in ChunkMath.Chunks(n, t, chunk))
            {
                using var inner = NewDisposeScope();
                var block = logits[i].narrow(0, t0, len).to_type(dtype);                 // [len, V] fp32: the one live chunk
                var (blockLse, targetLogp) = ChunkMath.Forward(block, targets[i].narrow(0, t0, len));
                lse[i].narrow(0, t0, len).copy_(blockLse);
                tokenLogp[i].narrow(0, t0, len).copy_(targetLogp);
            }
            ctx.save_for_backward(new List<Tensor> { logits, targets, weights, lse });
            ctx.save_data("chunk", chunk);
            ctx.save_data("dtype", dtype);
            return ChunkMath.MaskedSum(tokenLogp, weights);
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad_output)
        {
            var saved = ctx.get_saved_variables();
            Tensor logits = saved[0], targets = saved[1], weights = saved[2], lse = saved[3];
            var chunk = (long)ctx.get_data("chunk")!;
            var dtype = (ScalarType)ctx.get_data("dtype")!;
            long n = logits.shape[0], t = logits.shape[1];
            var rowGrad = grad_output.to_type(dtype).unsqueeze(1) * weights;             // [N, T]: g_n * valid
            var grad = empty(logits.shape, dtype: logits.dtype, device: logits.device);
            foreach (var (i, t0, len) in ChunkMath.Chunks(n, t, chunk))
            {
                using var inner = NewDisposeScope();
                var source = logits[i].narrow(0, t0, len);
                var target = grad[i].narrow(0, t0, len);
                var y = targets[i].narrow(0, t0, len);
                var g = rowGrad[i].narrow(0, t0, len);
                if (source.dtype == dtype)
                    ChunkMath.GradInPlace(target.copy_(source), lse[i].narrow(0, t0, len), y, g);      // in the gradient's own storage
                else
                    target.copy_(ChunkMath.GradInPlace(source.to_type(dtype), lse[i].narrow(0, t0, len), y, g));   // fp32 chunk, cast back
            }
            return new List<Tensor> { grad, null!, null!, null!, null! };
        }
    }
}

/// <summary>Label and mask handling shared by the log-prob paths (from logits and from hidden states).</summary>
internal static class Targets
{
    internal sealed record Prepared(Tensor Targets, Tensor Valid);

    /// <summary>
    /// Validates labels and mask against an [N, T, ...] input, applies the alignment, and returns in-range target ids
    /// (0 where masked) and the validity mask, both [N, T'] with T' = T or T - 1.
    /// </summary>
    internal static Prepared Prepare(Tensor input, long vocab, Tensor labels, Tensor? mask, LabelAlignment alignment, SequenceLogProbsOptions options)
    {
        const string inputName = "input";
        Guard.NotDisposed(labels, nameof(labels));
        Guard.Rank(labels, 2, nameof(labels), "of token ids [N, T]");
        if (labels.dtype != ScalarType.Int64)
            throw new ArgumentException($"labels must be int64 token ids; got {labels.dtype}.", nameof(labels));
        if (labels.shape[0] != input.shape[0] || labels.shape[1] != input.shape[1])
            throw new ArgumentException($"labels must have shape [{input.shape[0]}, {input.shape[1]}] to match the input; got {Guard.Shape(labels)}.", nameof(labels));
        Guard.SameDevice(input, inputName, labels, nameof(labels));
        if (mask is not null)
        {
            Guard.NotDisposed(mask, nameof(mask));
            if (!mask.shape.SequenceEqual(labels.shape))
                throw new ArgumentException($"mask must have the labels' shape {Guard.Shape(labels)}; got {Guard.Shape(mask)}.", nameof(mask));
            Guard.SameDevice(input, inputName, mask, nameof(mask));
        }
        Guard.NotEmpty(input, inputName);
        if (alignment == LabelAlignment.ShiftByOne && input.shape[1] < 2)
            throw new ArgumentException("ShiftByOne needs at least 2 positions (the last position has no next token).", nameof(alignment));

        Tensor y = labels, m = mask ?? ones_like(labels, dtype: ScalarType.Bool);
        if (alignment == LabelAlignment.ShiftByOne)
        {
            long t = input.shape[1] - 1;
            y = labels.narrow(1, 1, t);
            m = m.narrow(1, 1, t);
        }
        using var noGrad = no_grad();
        var valid = (m != 0) & (y != options.IgnoreIndex);
        var outOfRange = valid & ((y < 0) | (y >= vocab));
        if (outOfRange.any().cpu().item<bool>())
        {
            var first = outOfRange.nonzero()[0].cpu().data<long>().ToArray();
            throw new ArgumentException(
                $"labels must be token ids in [0, {vocab}) (or {options.IgnoreIndex} to skip); label {y[first[0], first[1]].cpu().item<long>()} at sequence {first[0]}, position {first[1] + (alignment == LabelAlignment.ShiftByOne ? 1 : 0)} is not.",
                nameof(labels));
        }
        return new Prepared(y.where(valid, zeros_like(y)).contiguous(), valid);   // masked positions gather id 0, weighted by 0
    }

    /// <summary>Checks the sums are finite (naming the sequences otherwise) and builds the result with counts and means.</summary>
    internal static SequenceLogProbsResult Finish(Tensor sum, Tensor weights, string inputName)
    {
        var counts = weights.sum(1);
        bool finite;
        using (no_grad()) finite = isfinite(sum.detach()).all().item<bool>();
        if (!finite)
        {
            using var noGrad = no_grad();
            var bad = (~isfinite(sum.detach())).nonzero().flatten().cpu();   // only on failure: name the sequences
            throw new ArgumentException(
                $"{inputName} contain NaN or Inf at valid positions of sequence(s) {string.Join(", ", bad.data<long>().Take(8))}; the log-probs would be non-finite.",
                inputName);
        }
        return new SequenceLogProbsResult(sum, counts, sum / counts.clamp_min(1));   // outside no_grad: Mean is differentiable
    }
}
