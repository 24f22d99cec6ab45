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

    /// <summary>
    /// The logits per fp32 chunk on the CPU when <see cref="ChunkTokens"/> is not set: 2^22 (16 MiB), e.g. 512 tokens at
    /// V = 8192. Measured on a 2-core VM, chunks of 16 MiB ran about 1.5x faster than chunks of 64 MiB (cache and page
    /// faults of the fresh temporaries), while a whole batch of short sequences still fits in one chunk at a small V.
    /// </summary>
    public const long DefaultCpuChunkElements = 1L << 22;

    /// <summary>
    /// The logits per fp32 chunk on CUDA when <see cref="ChunkTokens"/> is not set: 2^26 (256 MiB), e.g. 512 tokens at
    /// V = 131072: enough rows per chunk that the head's matrix products and the kernels are not launch-bound.
    /// </summary>
    public const long DefaultCudaChunkElements = 1L << 26;

    /// <summary>
    /// Tokens per fp32 chunk: bounds the extra memory to about ChunkTokens x V x 4 bytes. Default null: as many tokens as
    /// fit in <see cref="DefaultCpuChunkElements"/> (CPU) or <see cref="DefaultCudaChunkElements"/> (CUDA) logits; many
    /// short sequences then share one chunk instead of costing a few kernels each.
    /// </summary>
    public long? ChunkTokens
    {
        get;
        init => field = value is null or >= 1 ? value : throw new ArgumentOutOfRangeException(nameof(ChunkTokens), value, "ChunkTokens must be >= 1 (or null for the default).");
    }

    /// <summary>
    /// LD-DPO (Liu et al. 2024, arXiv 2409.06411; TRL's <c>ld_alpha</c>): null (default) for plain sums. With a value in
    /// [0, 1] the batch must be stacked as [B chosen rows; B rejected rows]; each pair's log-probs then sum the first
    /// min(n_w, n_l) completion tokens at weight 1 and the rest (the longer response's tail) at weight alpha. Apply the same
    /// value to the reference log-probs. alpha = 1 is plain sums; alpha = 0 drops the tail.
    /// </summary>
    public double? LdAlpha
    {
        get;
        init => field = value is null ? null : Guard.InClosedRange(value.Value, 0, 1, nameof(LdAlpha));
    }

    /// <summary>
    /// WPO (Zhou et al. 2024, arXiv 2406.11827; TRL's <c>use_weighting</c>): also compute, in the same chunked pass, each
    /// sequence's sum over completion tokens of log p_t - log sum_v p_v^2 (<see cref="SequenceLogProbsResult.WpoTerm"/>),
    /// from which <see cref="SequenceLogProbsResult.WpoPairWeights"/> gives the pair weights. Default false (it costs one more
    /// logsumexp per chunk). On CUDA it uses the chunked path, not the fused kernels.
    /// </summary>
    public bool WpoTerms { get; init; }

    /// <summary>The chunk size in tokens for a vocabulary of <paramref name="vocab"/> on <paramref name="device"/>.</summary>
    internal long TokensPerChunk(long vocab, DeviceType device) =>
        ChunkTokens ?? Math.Max(1, (device == DeviceType.CUDA ? DefaultCudaChunkElements : DefaultCpuChunkElements) / Math.Max(1, vocab));
}

/// <summary>Per-sequence log-probabilities from <see cref="SequenceLogProbs.Compute"/> or <see cref="FusedLinearLogProbs.Compute"/>.</summary>
/// <remarks>
/// The result owns its three tensors: dispose it (or let an enclosing dispose scope do it) after the backward pass.
/// Reading a tensor after that throws <see cref="ObjectDisposedException"/>.
/// </remarks>
public sealed class SequenceLogProbsResult : IDisposable
{
    private readonly Tensor _sum, _tokenCounts, _mean;
    private readonly Tensor? _wpoTerm;
    private bool _disposed;

    internal SequenceLogProbsResult(Tensor sum, Tensor tokenCounts, Tensor mean, Tensor? wpoTerm)
    {
        _sum = sum;
        _tokenCounts = tokenCounts;
        _mean = mean;
        _wpoTerm = wpoTerm;
    }

    /// <summary>
    /// [N] WPO's per-sequence term, the sum over completion tokens of log p_t - log sum_v p_v^2 (no grad), or null unless
    /// <see cref="SequenceLogProbsOptions.WpoTerms"/> was set. Computed from the plain token log-probs, LD-DPO or not.
    /// </summary>
    public Tensor? WpoTerm => _wpoTerm is null ? null : Alive(_wpoTerm);

    /// <summary>
    /// WPO's pair weights [B] for a batch stacked as [chosen rows; rejected rows]: w = exp(mean_t(log p_t - log sum_v p_v^2))
    /// of the chosen response times that of the rejected one (means over completion tokens, at least 1), detached. Pass
    /// them as <see cref="PreferenceBatch.ExampleWeights"/>: every pairwise loss then multiplies each pair's loss by them.
    /// </summary>
    /// <exception cref="InvalidOperationException">The WPO terms were not computed, or the number of rows is odd.</exception>
    public Tensor WpoPairWeights()
    {
        var term = WpoTerm ?? throw new InvalidOperationException("WPO weights need SequenceLogProbsOptions { WpoTerms = true } when the log-probs are computed.");
        long n = term.shape[0];
        if (n % 2 != 0)
            throw new InvalidOperationException($"WPO pair weights need a batch stacked as B chosen rows then B rejected rows; got {n} rows.");
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var perSequence = (term / _tokenCounts.clamp_min(1)).exp_();
        return (perSequence.narrow(0, 0, n / 2) * perSequence.narrow(0, n / 2, n / 2)).MoveToOuterDisposeScope();
    }

    /// <summary>[N] summed log-probs of the valid (completion) tokens, float32 (float64 for float64 inputs), differentiable.</summary>
    public Tensor Sum => Alive(_sum);

    /// <summary>[N] number of valid tokens per sequence (float, no grad).</summary>
    public Tensor TokenCounts => Alive(_tokenCounts);

    /// <summary>[N] per-token mean log-prob (Sum / TokenCounts; 0 for a sequence with no valid token), differentiable.</summary>
    public Tensor Mean => Alive(_mean);

    /// <summary>Splits a batch stacked as [chosen rows; rejected rows] (first half chosen) into paired log-probs with token counts.</summary>
    /// <exception cref="InvalidOperationException">The number of rows is odd.</exception>
    public PreferenceLogps ToPreferenceLogps()
    {
        long n = Sum.shape[0];
        if (n % 2 != 0)
            throw new InvalidOperationException($"A stacked chosen/rejected batch needs an even number of rows (B chosen, then B rejected); got {n}.");
        long half = n / 2;
        return new PreferenceLogps(_sum.narrow(0, 0, half), _sum.narrow(0, half, half), _tokenCounts.narrow(0, 0, half), _tokenCounts.narrow(0, half, half));
    }

    private Tensor Alive(Tensor t)
    {
        if (_disposed || t.IsInvalid)
            throw new ObjectDisposedException(nameof(SequenceLogProbsResult),
                "These sequence log-probs have been disposed, by Dispose() or by the end of the dispose scope they were created in.");
        return t;
    }

    /// <summary>Moves the result's tensors out of <paramref name="scope"/>.</summary>
    internal void MoveToOuter(DisposeScope scope)
    {
        scope.MoveToOuter(_sum, _tokenCounts, _mean);
        if (_wpoTerm is not null) scope.MoveToOuter(_wpoTerm);
    }

    /// <summary>Releases the tensors (and gradients the library's backward passes returned on this thread outside any scope).</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _sum.Dispose();
        _tokenCounts.Dispose();
        _mean.Dispose();
        _wpoTerm?.Dispose();
        BackwardLeftovers.Release();
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
/// function) recomputes each chunk's softmax and writes grad_logits = g * (onehot(y) - softmax) in the logits' dtype.
/// Chunks hold whole sequences when they fit (many short sequences cost a few large kernels), token ranges otherwise.</para>
/// <para>Memory after backward: the gradient buffer the backward pass writes becomes the leaf's <c>.grad</c> itself (no
/// second logits-sized copy). When the logits are not a leaf (a model's output), that buffer is released with the
/// result or the dispose scope; <see cref="FusedLinearLogProbs"/> avoids it altogether.</para>
/// <para>Non-contiguous logits are read in place (no copy of the whole tensor). Labels outside [0, V) at a valid position
/// are an error; NaN/Inf logits at a valid position are an error naming the sequences (at masked positions they are
/// ignored). A floating mask must be finite; a nonzero entry marks a position that counts.</para>
/// </remarks>
public static class SequenceLogProbs
{
    /// <summary>Computes per-sequence summed and mean log-probs.</summary>
    /// <param name="logits">[N, T, V] logits (float16, bfloat16, float32 or float64), with grad.</param>
    /// <param name="labels">[N, T] int64 target token ids (<see cref="SequenceLogProbsOptions.IgnoreIndex"/> marks skipped positions).</param>
    /// <param name="mask">Optional [N, T] mask, nonzero / true where the token counts (completion tokens); null = every non-ignored position.</param>
    /// <param name="alignment">Whether labels are already aligned with logits or must be shifted by one (stated explicitly: there is no default).</param>
    /// <param name="options">Ignore index and chunk size.</param>
    /// <exception cref="ArgumentException">A shape, dtype, device or value is invalid; the message names the argument.</exception>
    /// <exception cref="InsufficientMemoryException">A chunk or the gradient cannot be allocated.</exception>
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
        Guard.Usable(logits, nameof(logits));
        Guard.Rank(logits, 3, nameof(logits), "of logits [N, T, V]");
        Guard.Floating(logits, nameof(logits));
        Guard.Defined(alignment, nameof(alignment));
        return Native.Run("SequenceLogProbs.Compute", () => $"logits {Native.Describe(logits)}, chunk {options.TokensPerChunk(logits.shape[2], logits.device_type)} tokens", () =>
        {
            using var scope = NewDisposeScope();
            var prepared = Targets.Prepare(logits, nameof(logits), logits.shape[2], nameof(logits), labels, mask, alignment, options);
            bool shift = alignment == LabelAlignment.ShiftByOne;
            var dtype = logits.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
            var weights = Targets.TokenWeights(prepared.Valid, dtype, options.LdAlpha, nameof(logits));
            var extras = options.WpoTerms ? new LogProbExtras(prepared.Valid) : null;
            // a view, so that the gradient this function returns reaches a leaf's AccumulateGrad as a fresh tensor it can
            // adopt (the library's own handle to it would otherwise make libtorch copy it: a second logits-sized buffer)
            var input = logits.requires_grad ? logits.view(logits.shape) : logits;
            Tensor sum;
            if (allowKernels && extras is null && logits.device_type == DeviceType.CUDA && logits.dtype != ScalarType.Float64 && logits.stride(2) == 1
                && CudaLogProbKernels.TryGet(logits.device, logits.dtype) is { } kernels)
                sum = KernelFunction.apply(input, prepared.Targets, weights, shift, kernels);
            else
                sum = SequenceLogProbFunction.apply(input, prepared.Targets, weights, shift, options.TokensPerChunk(logits.shape[2], logits.device_type), dtype, extras);
            var result = Targets.Finish(sum, prepared.Valid, extras, () => Targets.NonFinite(nameof(logits), sum));
            result.MoveToOuter(scope);
            return result;
        });
    }

    /// <summary>The logits the labels are scored against: all positions, or all but the last with ShiftByOne.</summary>
    internal static Tensor Scored(Tensor logits, bool shift) => shift ? logits.narrow(1, 0, logits.shape[1] - 1) : logits;

    /// <summary>A gradient buffer laid out like <paramref name="input"/> whose unscored last position is 0 (ShiftByOne), and its scored part.</summary>
    internal static (Tensor Full, Tensor Scored) GradientBuffer(Tensor input, ScalarType dtype, bool shift)
    {
        var full = empty_like(input, dtype: dtype);
        if (shift) full.narrow(1, input.shape[1] - 1, 1).zero_();
        return (full, Scored(full, shift));
    }

    /// <summary>The fused CUDA path: one kernel pass forward, one backward (see <see cref="CudaLogProbKernels"/>).</summary>
    private sealed class KernelFunction : LibraryFunction<KernelFunction>
    {
        public override string Name => "AlignmentLosses.SequenceLogProbsCuda";

        protected override Tensor Forward(autograd.AutogradContext ctx, object[] vars)
        {
            var logits = (Tensor)vars[0];
            var targets = (Tensor)vars[1];
            var weights = (Tensor)vars[2];
            var shift = (bool)vars[3];
            var kernels = (CudaLogProbKernels.Kernels)vars[4];
            var (lse, tokenLogp) = CudaLogProbKernels.LaunchForward(kernels, Scored(logits, shift), targets);
            ctx.save_for_backward(new List<Tensor> { logits, targets, weights, lse });
            ctx.save_data("kernels", kernels);
            ctx.save_data("shift", shift);
            return ChunkMath.MaskedSum(tokenLogp, weights);
        }

        protected override Tensor?[] Backward(autograd.AutogradContext ctx, IReadOnlyList<Tensor> s, Tensor grad_output)
        {
            var kernels = (CudaLogProbKernels.Kernels)ctx.get_data("kernels")!;
            var shift = (bool)ctx.get_data("shift")!;
            var g = (grad_output.to_type(ScalarType.Float32).unsqueeze(1) * s[2].to_type(ScalarType.Float32)).contiguous();
            var (grad, scored) = GradientBuffer(s[0], s[0].dtype, shift);
            CudaLogProbKernels.LaunchBackward(kernels, Scored(s[0], shift), s[1], s[3], g, scored);
            return new Tensor?[] { grad, null, null, null, null };
        }
    }

    /// <summary>Forward: per-sequence sums from chunked logsumexp and target gathers. Backward: chunked g * (onehot - softmax).</summary>
    private sealed class SequenceLogProbFunction : LibraryFunction<SequenceLogProbFunction>
    {
        public override string Name => "AlignmentLosses.SequenceLogProbs";

        protected override Tensor Forward(autograd.AutogradContext ctx, object[] vars)
        {
            var logits = (Tensor)vars[0];
            var targets = (Tensor)vars[1];
            var weights = (Tensor)vars[2];
            var shift = (bool)vars[3];
            var chunk = (long)vars[4];
            var dtype = (ScalarType)vars[5];
            var extras = (LogProbExtras?)vars[6];
            var x = Scored(logits, shift);
            long n = x.shape[0], t = x.shape[1];
            var tokenLogp = empty(n, t, dtype: dtype, device: x.device);
            var lse = empty(n, t, dtype: dtype, device: x.device);
            var denominators = extras is null ? null : empty(n, t, dtype: dtype, device: x.device);
            foreach (var block in ChunkMath.Blocks(n, t, chunk))
            {
                using var inner = NewDisposeScope();
                var z = block.Rows2D(x, dtype);                                             // the one live chunk
                var (blockLse, targetLogp) = ChunkMath.Forward(z, block.Flat(targets));
                block.Of(lse).copy_(blockLse.view(block.Rows, block.Tokens));
                block.Of(tokenLogp).copy_(targetLogp.view(block.Rows, block.Tokens));
                if (denominators is not null) block.Of(denominators).copy_(ChunkMath.LogSumSquares(z, blockLse).view(block.Rows, block.Tokens));
            }
            extras?.Finish(tokenLogp, denominators!);
            ctx.save_for_backward(new List<Tensor> { logits, targets, weights, lse });
            ctx.save_data("shift", shift);
            ctx.save_data("chunk", chunk);
            ctx.save_data("dtype", dtype);
            return ChunkMath.MaskedSum(tokenLogp, weights);
        }

        protected override Tensor?[] Backward(autograd.AutogradContext ctx, IReadOnlyList<Tensor> saved, Tensor grad_output)
        {
            Tensor logits = saved[0], targets = saved[1], weights = saved[2], lse = saved[3];
            var shift = (bool)ctx.get_data("shift")!;
            var chunk = (long)ctx.get_data("chunk")!;
            var dtype = (ScalarType)ctx.get_data("dtype")!;
            var x = Scored(logits, shift);
            var rowGrad = grad_output.to_type(dtype).unsqueeze(1) * weights;             // [N, T]: g_n * valid
            var (grad, scored) = GradientBuffer(logits, logits.dtype, shift);
            foreach (var block in ChunkMath.Blocks(x.shape[0], x.shape[1], chunk))
            {
                using var inner = NewDisposeScope();
                var target = block.Of(scored);
                var (y, g, blockLse) = (block.Flat(targets), block.Flat(rowGrad), block.Flat(lse));
                if (logits.dtype == dtype && target.is_contiguous())
                {
                    target.copy_(block.Of(x));                                            // computed in the gradient's own storage
                    ChunkMath.GradInPlace(target.view(block.Count, x.shape[2]), blockLse, y, g);
                }
                else
                {
                    var work = ChunkMath.GradInPlace(block.Copy2D(x, dtype), blockLse, y, g);   // one fp32 chunk, cast back
                    target.copy_(work.view(block.Rows, block.Tokens, x.shape[2]));
                }
            }
            return new Tensor?[] { grad, null, null, null, null, null, null };
        }
    }
}

/// <summary>What the forward pass computes besides the sums, on request: WPO's per-sequence term.</summary>
internal sealed class LogProbExtras
{
    internal LogProbExtras(Tensor valid) => Valid = valid;

    /// <summary>[N, T'] positions that count.</summary>
    internal Tensor Valid { get; }

    /// <summary>[N] sum over valid positions of log p_t - log sum_v p_v^2 (set by the forward pass; no grad).</summary>
    internal Tensor? WpoTerm { get; private set; }

    internal void Finish(Tensor tokenLogp, Tensor denominators) =>
        WpoTerm = (tokenLogp - denominators).masked_fill_(Valid.logical_not(), 0).sum(1);
}

/// <summary>Label and mask handling shared by the log-prob paths (from logits and from hidden states).</summary>
internal static class Targets
{
    internal sealed record Prepared(Tensor Targets, Tensor Valid);

    /// <summary>
    /// Validates labels and mask against an [N, T, ...] input, applies the alignment, and returns in-range target ids
    /// (0 where masked) and the validity mask, both [N, T'] with T' = T or T - 1. One synchronisation.
    /// </summary>
    internal static Prepared Prepare(Tensor input, string inputName, long vocab, string vocabName, Tensor labels, Tensor? mask,
        LabelAlignment alignment, SequenceLogProbsOptions options)
    {
        Guard.Usable(labels, nameof(labels));
        Guard.Rank(labels, 2, nameof(labels), "of token ids [N, T]");
        if (labels.dtype != ScalarType.Int64)
            throw new ArgumentException($"labels must be int64 token ids; got {labels.dtype}.", nameof(labels));
        if (labels.shape[0] != input.shape[0] || labels.shape[1] != input.shape[1])
            throw new ArgumentException($"labels must have shape [{input.shape[0]}, {input.shape[1]}] to match {inputName}; got {Guard.Shape(labels)}.", nameof(labels));
        Guard.SameDevice(input, inputName, labels, nameof(labels));
        if (mask is not null)
        {
            Guard.Usable(mask, nameof(mask));
            if (!mask.shape.SequenceEqual(labels.shape))
                throw new ArgumentException($"mask must have the labels' shape {Guard.Shape(labels)}; got {Guard.Shape(mask)}.", nameof(mask));
            Guard.SameDevice(input, inputName, mask, nameof(mask));
            if (mask.is_complex())
                throw new ArgumentException($"mask must be bool, integer or floating; got {mask.dtype}.", nameof(mask));
        }
        if (vocab == 0)
            throw new ArgumentException($"{vocabName} has an empty vocabulary (V = 0): there is no token to score.", vocabName);
        Guard.NotEmpty(input, inputName);
        if (alignment == LabelAlignment.ShiftByOne && input.shape[1] < 2)
            throw new ArgumentException("ShiftByOne needs at least 2 positions (the last position has no next token).", nameof(alignment));

        using var noGrad = no_grad();
        Tensor y = labels, m = mask ?? ones_like(labels, dtype: ScalarType.Bool);
        var maskFinite = mask is not null && mask.is_floating_point() ? isfinite(mask).all() : ones(1, dtype: ScalarType.Bool, device: labels.device).squeeze();
        if (alignment == LabelAlignment.ShiftByOne)
        {
            long t = input.shape[1] - 1;
            y = labels.narrow(1, 1, t);
            m = m.narrow(1, 1, t);
        }
        var valid = (m != 0) & (y != options.IgnoreIndex);
        var outOfRange = valid & ((y < 0) | (y >= vocab));
        var verdicts = stack(new[] { outOfRange.any(), maskFinite.logical_not() }).cpu().data<bool>().ToArray();   // one synchronisation
        if (verdicts[1])
            throw new ArgumentException("mask contains NaN or Inf; a mask marks each position with 0 (skip) or a nonzero value (count).", nameof(mask));
        if (verdicts[0])
        {
            var first = outOfRange.nonzero()[0].cpu().data<long>().ToArray();
            throw new ArgumentException(
                $"labels must be token ids in [0, {vocab}) (or {options.IgnoreIndex} to skip); label {y[first[0], first[1]].cpu().item<long>()} at sequence {first[0]}, position {first[1] + (alignment == LabelAlignment.ShiftByOne ? 1 : 0)} is not.",
                nameof(labels));
        }
        return new Prepared(y.where(valid, zeros_like(y)).contiguous(), valid);   // masked positions gather id 0, weighted by 0
    }

    /// <summary>
    /// The per-token weights of the sums: 1 at valid positions, 0 elsewhere; with LD-DPO's <paramref name="ldAlpha"/>, the
    /// positions past the shorter response of each pair (rows i and B + i) get alpha.
    /// </summary>
    internal static Tensor TokenWeights(Tensor valid, ScalarType dtype, double? ldAlpha, string inputName)
    {
        var weights = valid.to_type(dtype);
        if (ldAlpha is not { } alpha) return weights;
        long n = valid.shape[0];
        if (n % 2 != 0)
            throw new ArgumentException(
                $"LD-DPO (LdAlpha) pairs row i with row B + i of a batch stacked as B chosen rows then B rejected rows; {inputName} has {n} rows, an odd number.", inputName);
        using var noGrad = no_grad();
        var position = valid.to_type(ScalarType.Int64).cumsum(1);                           // 1-based index among valid tokens
        var lengths = position.narrow(1, position.shape[1] - 1, 1);                        // [N, 1] valid tokens per row
        var shared = minimum(lengths.narrow(0, 0, n / 2), lengths.narrow(0, n / 2, n / 2));
        var tail = position > cat(new[] { shared, shared }, 0);                             // past the shared length
        return weights.masked_fill_(tail & valid, alpha);
    }

    /// <summary>Checks the sums are finite (<paramref name="diagnose"/> names the cause otherwise) and builds the result with counts and means.</summary>
    internal static SequenceLogProbsResult Finish(Tensor sum, Tensor valid, LogProbExtras? extras, Func<Exception> diagnose)
    {
        var counts = valid.to_type(sum.dtype).sum(1);
        bool finite;
        using (no_grad()) finite = isfinite(sum.detach()).all().item<bool>();
        if (!finite) throw diagnose();
        return new SequenceLogProbsResult(sum, counts, sum / counts.clamp_min(1), extras?.WpoTerm);   // outside no_grad: Mean is differentiable
    }

    /// <summary>The error for non-finite sums whose inputs are the culprits at valid positions: names the sequences.</summary>
    internal static Exception NonFinite(string inputName, Tensor sum)
    {
        using var noGrad = no_grad();
        using var bad = (~isfinite(sum.detach())).nonzero().flatten().cpu();   // only on failure: name the sequences
        return new ArgumentException(
            $"{inputName} contain NaN or Inf at valid positions of sequence(s) {string.Join(", ", bad.data<long>().Take(8))}; the log-probs would be non-finite.",
            inputName);
    }
}
