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
    /// fit in <see cref="DefaultCpuChunkElements"/> (CPU) or <see cref="DefaultCudaChunkElements"/> (CUDA) logits, and for
    /// <see cref="FusedLinearLogProbs"/> on the CPU at least <see cref="MinCpuHeadChunkTokens"/>; many short sequences then
    /// share one chunk instead of costing a few kernels each. (The CPU kernel of <see cref="FusedCpu"/> reads the logits
    /// in place and needs no chunk.)
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
    /// logsumexp per chunk; on CUDA the fused kernels carry it in the same read of the logits).
    /// </summary>
    public bool WpoTerms { get; init; }

    /// <summary>
    /// Also compute, in the same chunked pass (and in the fused CUDA kernels), the step statistics TRL logs: each token's
    /// entropy -sum_v p_v log p_v, its mean logit over V, and whether the first argmax over V is the label. The result then
    /// holds their per-sequence sums (<see cref="SequenceLogProbsResult.EntropySum"/>, <see cref="SequenceLogProbsResult.LogitMeanSum"/>,
    /// <see cref="SequenceLogProbsResult.CorrectTokens"/>) and <see cref="SequenceLogProbsResult.Statistics"/> the batch's
    /// entropy, mean_token_accuracy, logits/chosen and logits/rejected. Default false. No gradient flows through them.
    /// </summary>
    public bool StepStatistics { get; init; }

    /// <summary>
    /// On the CPU, run the log-prob step (forward with the WPO terms and step statistics, and backward) as one managed kernel
    /// over rows of float32 or bfloat16 logits: one read of the logits forward, one read and one write backward, rows in
    /// parallel on up to <c>torch.get_num_threads()</c> threads, bitwise the same whatever the thread count; also each
    /// chunk of <see cref="FusedLinearLogProbs"/>, in place. Default true.
    /// It needs .NET 9 or later and 256-bit vectors; float16 and float64 logits, non-unit strides along V, and other
    /// devices take the chunked libtorch path, as does every call with false. Both paths agree to float32 rounding
    /// (the tests hold them to 2e-6 relative) and throw the same errors.
    /// </summary>
    public bool FusedCpu { get; init; } = true;

    /// <summary>
    /// <see cref="FusedLinearLogProbs"/> only: keep each chunk's fp32 logits from the forward pass for the backward pass
    /// instead of recomputing them. The backward pass then makes two matrix products per chunk instead of three (three in
    /// all, as materialised logits cost, instead of four), at the memory of all the scored tokens' fp32 logits until
    /// the backward pass has run (tokens x V x 4 bytes; measured at 1,024 tokens, V = 32,000: about half of PyTorch's extra
    /// memory for materialised logits, a third of TorchSharp's). On the CPU kernel the backward pass writes each chunk's
    /// gradient in place (a second backward pass through a retained graph then recomputes); elsewhere it works on a copy
    /// of one chunk at a time. Default false (recompute: memory bounded by one chunk). Only when a gradient is needed; the
    /// kept logits are released with the autograd graph.
    /// </summary>
    public bool RetainHeadLogits { get; init; }

    /// <summary>
    /// On Linux, ask for transparent huge pages (madvise MADV_HUGEPAGE) on the fresh CPU gradient buffer the backward pass
    /// writes (at least 4 MiB). Writing fresh memory otherwise costs a page fault per 4 KiB, which makes the write several
    /// times slower than the memory bandwidth. A hint: where the kernel's huge pages are off ("never") nothing changes.
    /// Default true.
    /// </summary>
    public bool HugePageGradients { get; init; } = true;

    /// <summary>
    /// The fewest tokens per chunk of <see cref="FusedLinearLogProbs"/> on the CPU when <see cref="ChunkTokens"/> is not set:
    /// 256, so that each chunk's matrix products are large enough to run at the BLAS's speed even at V = 128k (where
    /// <see cref="DefaultCpuChunkElements"/> alone would give 32 tokens). A chunk of 256 tokens at V = 128,256 is 131 MB of fp32
    /// logits.
    /// </summary>
    public const long MinCpuHeadChunkTokens = 256;

    /// <summary>The chunk size in tokens of the fused LM head for a vocabulary of <paramref name="vocab"/> on <paramref name="device"/>.</summary>
    internal long HeadTokensPerChunk(long vocab, DeviceType device) =>
        ChunkTokens ?? (device == DeviceType.CPU ? Math.Max(MinCpuHeadChunkTokens, TokensPerChunk(vocab, device)) : TokensPerChunk(vocab, device));

    /// <summary>The chunk size in tokens for a vocabulary of <paramref name="vocab"/> on <paramref name="device"/>.</summary>
    internal long TokensPerChunk(long vocab, DeviceType device) =>
        ChunkTokens ?? Math.Max(1, (device == DeviceType.CUDA ? DefaultCudaChunkElements : DefaultCpuChunkElements) / Math.Max(1, vocab));
}

/// <summary>Per-sequence log-probabilities from <see cref="SequenceLogProbs.Compute(Tensor, Tensor, Tensor?, LabelAlignment, SequenceLogProbsOptions?)"/> or <see cref="FusedLinearLogProbs"/>.</summary>
/// <remarks>
/// The result owns its tensors: dispose it (or let an enclosing dispose scope do it) after the backward pass.
/// Reading a tensor after that throws <see cref="ObjectDisposedException"/>. N is the number of sequences: the rows of a
/// padded batch, or <see cref="SequenceBoundaries.Count"/> of a packed one.
/// </remarks>
public sealed class SequenceLogProbsResult : IDisposable
{
    private readonly Tensor _sum, _tokenCounts, _mean, _tokens, _valid;
    private readonly LogProbExtras? _extras;
    private readonly Segments _segments;
    private readonly bool _shift;
    private readonly List<Tensor> _derived = new();   // views handed out by ToPreferenceLogps & co., released with the result
    private bool _disposed;

    internal SequenceLogProbsResult(Tensor sum, Tensor tokenCounts, Tensor mean, Tensor tokens, Tensor valid, LogProbExtras? extras,
        Segments segments, bool shift)
    {
        _sum = sum;
        _tokenCounts = tokenCounts;
        _mean = mean;
        _tokens = tokens;
        _valid = valid;
        _extras = extras;
        _segments = segments;
        _shift = shift;
    }

    /// <summary>
    /// [N] WPO's per-sequence term, the sum over completion tokens of log p_t - log sum_v p_v^2 (no grad), or null unless
    /// <see cref="SequenceLogProbsOptions.WpoTerms"/> was set. Computed from the plain token log-probs, LD-DPO or not.
    /// </summary>
    public Tensor? WpoTerm => _extras?.WpoTerm is { } t ? Alive(t) : null;

    /// <summary>[N] sum over completion tokens of the token entropy (no grad), or null unless <see cref="SequenceLogProbsOptions.StepStatistics"/>.</summary>
    public Tensor? EntropySum => _extras?.EntropySum is { } t ? Alive(t) : null;

    /// <summary>[N] sum over completion tokens of the mean logit over V (no grad), or null unless <see cref="SequenceLogProbsOptions.StepStatistics"/>.</summary>
    public Tensor? LogitMeanSum => _extras?.LogitMeanSum is { } t ? Alive(t) : null;

    /// <summary>[N] completion tokens whose first argmax over V is the label (float, no grad), or null unless <see cref="SequenceLogProbsOptions.StepStatistics"/>.</summary>
    public Tensor? CorrectTokens => _extras?.CorrectTokens is { } t ? Alive(t) : null;

    /// <summary>
    /// [R, T'] the log-prob of every scored token, differentiable, 0 at positions that do not count (R rows of the input;
    /// T' = T, or T - 1 with <see cref="LabelAlignment.ShiftByOne"/>, where entry t scores label t + 1). Plain log-probs,
    /// also under LD-DPO. It is the tensor the sums are taken over, so reading it costs nothing.
    /// </summary>
    public Tensor TokenLogProbs => Alive(_tokens);

    /// <summary>[R, T'] true where a token counts (same layout as <see cref="TokenLogProbs"/>).</summary>
    public Tensor TokenMask => Alive(_valid);

    /// <summary>
    /// [R, T'] the entropy of the next-token distribution at every scored position (no grad; 0 where no token counts), in the
    /// layout of <see cref="TokenLogProbs"/>, or null unless <see cref="SequenceLogProbsOptions.StepStatistics"/>. The token
    /// objectives (<see cref="TokenBatch.FromLogProbs"/>) report it as TRL's "entropy" metric.
    /// </summary>
    public Tensor? TokenEntropy => _extras?.TokenEntropy is { } t ? Alive(t) : null;

    /// <summary>How scored positions map to sequences (per row, or a packed batch's segment ids).</summary>
    internal Segments Segments => _segments;

    /// <summary>Whether labels were shifted by one (causal-LM alignment).</summary>
    internal bool Shifted => _shift;

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

    /// <summary>
    /// The batch's step statistics as sums and token counts (so that micro-batches and logging windows average correctly):
    /// entropy over all completion tokens; for a batch stacked as [chosen; rejected], mean_token_accuracy over the chosen
    /// completions and logits/chosen, logits/rejected (TRL's definitions). One synchronisation.
    /// </summary>
    /// <exception cref="InvalidOperationException"><see cref="SequenceLogProbsOptions.StepStatistics"/> was not set, or the number of sequences is odd.</exception>
    public LogProbStatistics Statistics()
    {
        if (EntropySum is null)
            throw new InvalidOperationException("Step statistics need SequenceLogProbsOptions { StepStatistics = true } when the log-probs are computed.");
        long n = _sum.shape[0];
        if (n % 2 != 0)
            throw new InvalidOperationException($"Step statistics split chosen and rejected sequences: a batch stacked as B chosen then B rejected needs an even count; got {n}.");
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        Tensor Half(Tensor t, int which) => t.to_type(ScalarType.Float64).narrow(0, which * (n / 2), n / 2).sum();
        var values = stack(new[]
        {
            Half(EntropySum!, 0) + Half(EntropySum!, 1), Half(_tokenCounts, 0) + Half(_tokenCounts, 1),
            Half(CorrectTokens!, 0), Half(_tokenCounts, 0), Half(LogitMeanSum!, 0), Half(LogitMeanSum!, 1), Half(_tokenCounts, 1),
        }).cpu().data<double>().ToArray();
        return new LogProbStatistics(values[0], values[1], values[2], values[3], values[4], values[5], values[6]);
    }

    /// <summary>[N] summed log-probs of the valid (completion) tokens, float32 (float64 for float64 inputs), differentiable.</summary>
    public Tensor Sum => Alive(_sum);

    /// <summary>[N] number of valid tokens per sequence (float, no grad).</summary>
    public Tensor TokenCounts => Alive(_tokenCounts);

    /// <summary>[N] per-token mean log-prob (Sum / TokenCounts; 0 for a sequence with no valid token), differentiable.</summary>
    public Tensor Mean => Alive(_mean);

    /// <summary>Whether the batch was packed (<see cref="SequenceBoundaries"/>).</summary>
    public bool IsPacked => _segments.IsPacked;

    /// <summary>
    /// Splits a batch stacked as [chosen; rejected] (first half chosen) into paired log-probs with token counts. The
    /// tensors are views owned by this result: they stay valid until it is disposed, and are released with it (with or
    /// without a dispose scope of the caller's).
    /// </summary>
    /// <exception cref="InvalidOperationException">The number of sequences is odd.</exception>
    public PreferenceLogps ToPreferenceLogps()
    {
        long n = Sum.shape[0];
        if (n % 2 != 0)
            throw new InvalidOperationException($"A stacked chosen/rejected batch needs an even number of sequences (B chosen, then B rejected); got {n}.");
        long half = n / 2;
        return new PreferenceLogps(Own(_sum.narrow(0, 0, half)), Own(_sum.narrow(0, half, half)),
            Own(_tokenCounts.narrow(0, 0, half)), Own(_tokenCounts.narrow(0, half, half)));
    }

    /// <summary>
    /// Splits a batch of unpaired binary feedback into unpaired log-probs with token counts: the first
    /// <paramref name="desirableCount"/> sequences are the desirable (chosen) examples, the rest the undesirable ones (for
    /// KTO, apo_zero_unpaired and BCO). Either side may be empty. The tensors are views owned by this result (see
    /// <see cref="ToPreferenceLogps"/>).
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="desirableCount"/> is outside [0, N].</exception>
    public PreferenceLogps ToUnpairedLogps(long desirableCount)
    {
        long n = Sum.shape[0];
        if (desirableCount < 0 || desirableCount > n)
            throw new ArgumentOutOfRangeException(nameof(desirableCount), desirableCount, $"desirableCount must be in [0, {n}] (the number of sequences).");
        return PreferenceLogps.Unpaired(Own(_sum.narrow(0, 0, desirableCount)), Own(_sum.narrow(0, desirableCount, n - desirableCount)),
            Own(_tokenCounts.narrow(0, 0, desirableCount)), Own(_tokenCounts.narrow(0, desirableCount, n - desirableCount)));
    }

    /// <summary>
    /// The chosen half of a batch stacked as [chosen; rejected] as <see cref="PromptLogps"/>, for ORPO's NLL over prompt and
    /// completion: call it on the prompt part, <c>all.Within(collated.PromptMask).ToPromptLogps()</c>. Views owned by this result.
    /// </summary>
    /// <exception cref="InvalidOperationException">The number of sequences is odd.</exception>
    public PromptLogps ToPromptLogps()
    {
        long n = Sum.shape[0];
        if (n % 2 != 0)
            throw new InvalidOperationException($"A stacked chosen/rejected batch needs an even number of sequences (B chosen, then B rejected); got {n}.");
        return new PromptLogps(Own(_sum.narrow(0, 0, n / 2)), Own(_tokenCounts.narrow(0, 0, n / 2)));
    }

    /// <summary>
    /// The same token log-probs restricted to the positions where <paramref name="mask"/> is nonzero: per-sequence sums,
    /// counts, means and token log-probs of that part only (differentiable), and the extras (step statistics, WPO terms)
    /// summed over that part; no LD-DPO weighting. One log-prob
    /// pass then serves several parts of a sequence: compute the log-probs with labels on every attended token
    /// (<see cref="Data.CollatedPreferences.SequenceLabels"/>), then take <c>Within(CompletionMask)</c> for the loss and
    /// <c>Within(PromptMask)</c> for ORPO's NLL over prompt and completion (TRL's).
    /// </summary>
    /// <param name="mask">[R, T] in the layout of the labels passed to Compute (bool, integer or finite floating), on their device;
    /// with <see cref="LabelAlignment.ShiftByOne"/> entry t marks label t (scored by position t - 1), as for Compute's mask.</param>
    /// <returns>A new result the caller disposes (independent of this one).</returns>
    /// <exception cref="ArgumentException">The mask's shape, dtype or device does not match, or it holds NaN/Inf.</exception>
    public SequenceLogProbsResult Within(Tensor mask)
    {
        Alive(_tokens);
        Guard.Usable(mask, nameof(mask));
        long rows = _tokens.shape[0], positions = _tokens.shape[1] + (_shift ? 1 : 0);
        if (mask.dim() != 2 || mask.shape[0] != rows || mask.shape[1] != positions)
            throw new ArgumentException($"mask must have the labels' shape [{rows}, {positions}]; got {Guard.Shape(mask)}.", nameof(mask));
        if (mask.is_complex())
            throw new ArgumentException($"mask must be bool, integer or floating; got {mask.dtype}.", nameof(mask));
        Guard.SameDevice(_tokens, "these log-probs", mask, nameof(mask));
        using var scope = NewDisposeScope();
        if (mask.is_floating_point())
        {
            using var noGrad = no_grad();
            if (!isfinite(mask).all().item<bool>())
                throw new ArgumentException("mask contains NaN or Inf; a mask marks each position with 0 (skip) or a nonzero value (count).", nameof(mask));
        }
        Tensor valid;
        using (no_grad()) valid = _valid & ((_shift ? mask.narrow(1, 1, positions - 1) : mask) != 0);
        var tokens = _tokens * valid.to_type(_tokens.dtype);
        var sum = _segments.Reduce(tokens);
        var counts = _segments.Reduce(valid.to_type(_sum.dtype));
        var segments = _segments.Alias();
        var result = new SequenceLogProbsResult(sum, counts, sum / counts.clamp_min(1), tokens, valid, _extras?.Within(valid, tokens, segments), segments, _shift);
        result.MoveToOuter(scope);
        return result;
    }

    /// <summary>Detaches <paramref name="view"/> from any dispose scope and keeps it with this result (released by Dispose).</summary>
    private Tensor Own(Tensor view)
    {
        view.DetachFromDisposeScope();
        lock (_derived) _derived.Add(view);
        return view;
    }

    private Tensor Alive(Tensor t)
    {
        if (_disposed || t.IsInvalid)
            throw new ObjectDisposedException(nameof(SequenceLogProbsResult),
                "These sequence log-probs have been disposed, by Dispose() or by the end of the dispose scope they were created in.");
        return t;
    }

    private IEnumerable<Tensor> Owned() =>
        new[] { _sum, _tokenCounts, _mean, _tokens, _valid }.Concat(_extras?.Results ?? Enumerable.Empty<Tensor>())
            .Concat(_extras?.Buffers ?? Enumerable.Empty<Tensor>()).Concat(_segments.Tensors);

    /// <summary>Moves the result's tensors out of <paramref name="scope"/>.</summary>
    internal void MoveToOuter(DisposeScope scope) => scope.MoveToOuter(Owned().ToArray());

    /// <summary>Releases the tensors, the views handed out (<see cref="ToPreferenceLogps"/> and the like), and gradients the
    /// library's backward passes returned on this thread outside any scope.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var t in Owned()) t.Dispose();
        lock (_derived)
        {
            foreach (var t in _derived) t.Dispose();
            _derived.Clear();
        }
        BackwardLeftovers.Release();
    }
}

/// <summary>
/// A batch's log-prob step statistics as sums and counts (TRL's entropy, mean_token_accuracy, logits/chosen,
/// logits/rejected), from <see cref="SequenceLogProbsResult.Statistics"/>. Sums add up over micro-batches and steps:
/// combine with <see cref="op_Addition"/> and read the means.
/// </summary>
/// <param name="EntropySum">Sum of token entropies over all completion tokens.</param>
/// <param name="Tokens">All completion tokens.</param>
/// <param name="ChosenCorrect">Chosen completion tokens whose argmax is the label.</param>
/// <param name="ChosenTokens">Chosen completion tokens.</param>
/// <param name="ChosenLogitSum">Sum over chosen completion tokens of the mean logit over V.</param>
/// <param name="RejectedLogitSum">Sum over rejected completion tokens of the mean logit over V.</param>
/// <param name="RejectedTokens">Rejected completion tokens.</param>
public readonly record struct LogProbStatistics(double EntropySum, double Tokens, double ChosenCorrect, double ChosenTokens,
    double ChosenLogitSum, double RejectedLogitSum, double RejectedTokens)
{
    /// <summary>Mean token entropy over all completion tokens (TRL "entropy"); 0 without tokens.</summary>
    public double Entropy => Tokens > 0 ? EntropySum / Tokens : 0;

    /// <summary>Fraction of chosen completion tokens whose argmax is the label (TRL "mean_token_accuracy"); 0 without tokens.</summary>
    public double MeanTokenAccuracy => ChosenTokens > 0 ? ChosenCorrect / ChosenTokens : 0;

    /// <summary>Mean logit over chosen completion tokens and the vocabulary (TRL "logits/chosen"); 0 without tokens.</summary>
    public double LogitsChosen => ChosenTokens > 0 ? ChosenLogitSum / ChosenTokens : 0;

    /// <summary>Mean logit over rejected completion tokens and the vocabulary (TRL "logits/rejected"); 0 without tokens.</summary>
    public double LogitsRejected => RejectedTokens > 0 ? RejectedLogitSum / RejectedTokens : 0;

    /// <summary>The statistics as TRL names them: entropy, mean_token_accuracy, logits/chosen, logits/rejected.</summary>
    public IReadOnlyDictionary<string, double> ToMetrics() => new Dictionary<string, double>
    {
        [MetricNames.Entropy] = Entropy,
        [MetricNames.MeanTokenAccuracy] = MeanTokenAccuracy,
        [MetricNames.LogitsChosen] = LogitsChosen,
        [MetricNames.LogitsRejected] = LogitsRejected,
    };

    /// <summary>Adds two sets of sums (micro-batches of one step, or steps of a logging window).</summary>
    public static LogProbStatistics operator +(LogProbStatistics a, LogProbStatistics b) =>
        new(a.EntropySum + b.EntropySum, a.Tokens + b.Tokens, a.ChosenCorrect + b.ChosenCorrect, a.ChosenTokens + b.ChosenTokens,
            a.ChosenLogitSum + b.ChosenLogitSum, a.RejectedLogitSum + b.RejectedLogitSum, a.RejectedTokens + b.RejectedTokens);
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
    /// <param name="options">Ignore index, chunk size, LD-DPO, WPO terms and step statistics.</param>
    /// <exception cref="ArgumentException">A shape, dtype, device or value is invalid; the message names the argument.</exception>
    /// <exception cref="InsufficientMemoryException">A chunk or the gradient cannot be allocated.</exception>
    public static SequenceLogProbsResult Compute(Tensor logits, Tensor labels, Tensor? mask, LabelAlignment alignment, SequenceLogProbsOptions? options = null)
        => ComputeCore(logits, labels, mask, null, alignment, options, allowKernels: true);

    /// <summary>
    /// Per-sequence log-probs of a packed (padding-free) batch: S sequences laid end to end in one row, with the
    /// <paramref name="boundaries"/> between them. Each sequence's result equals that of its own padded row.
    /// </summary>
    /// <param name="logits">[1, Total, V] logits of the packed row (Total &gt;= boundaries.TotalTokens; positions past it are ignored).</param>
    /// <param name="labels">[1, Total] int64 target ids.</param>
    /// <param name="mask">Optional [1, Total] mask of the tokens that count (completion tokens).</param>
    /// <param name="boundaries">The sequences' cumulative lengths.</param>
    /// <param name="alignment">Aligned or shifted labels; with <see cref="LabelAlignment.ShiftByOne"/> no logit scores a token of the next sequence.</param>
    /// <param name="options">As for padded batches; LD-DPO pairs sequence i with sequence S/2 + i.</param>
    public static SequenceLogProbsResult Compute(Tensor logits, Tensor labels, Tensor? mask, SequenceBoundaries boundaries, LabelAlignment alignment,
        SequenceLogProbsOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(boundaries);
        return ComputeCore(logits, labels, mask, boundaries, alignment, options, allowKernels: true);
    }

    /// <summary>
    /// What the fused CUDA kernels are doing: "fused CUDA kernels active on cuda:0 for BFloat16 (...)", or why the last
    /// CUDA call fell back to the chunked path (no NVRTC, no driver, a compile error, a failed self-test, or
    /// ALIGNMENT_LOSSES_CUDA_KERNELS=0). The reason is also traced once (System.Diagnostics.Trace) when it first occurs.
    /// </summary>
    public static string CudaKernelStatus => CudaLogProbKernels.Status;

    /// <summary>The chunked path only (never the CUDA kernels): the reference the kernels are checked against.</summary>
    internal static SequenceLogProbsResult ComputeChunked(Tensor logits, Tensor labels, Tensor? mask, LabelAlignment alignment, SequenceLogProbsOptions? options = null)
        => ComputeCore(logits, labels, mask, null, alignment, options, allowKernels: false);

    private static SequenceLogProbsResult ComputeCore(Tensor logits, Tensor labels, Tensor? mask, SequenceBoundaries? boundaries, LabelAlignment alignment,
        SequenceLogProbsOptions? options, bool allowKernels)
    {
        options ??= new SequenceLogProbsOptions();
        Guard.Usable(logits, nameof(logits));
        Guard.Rank(logits, 3, nameof(logits), boundaries is null ? "of logits [N, T, V]" : "of packed logits [1, Total, V]");
        Guard.Floating(logits, nameof(logits));
        Guard.Defined(alignment, nameof(alignment));
        return Native.Run("SequenceLogProbs.Compute", () => $"logits {Native.Describe(logits)}, chunk {options.TokensPerChunk(logits.shape[2], logits.device_type)} tokens", () =>
        {
            using var scope = NewDisposeScope();
            var prepared = Targets.Prepare(logits, nameof(logits), logits.shape[2], nameof(logits), labels, mask, boundaries, alignment, options);
            bool shift = alignment == LabelAlignment.ShiftByOne;
            var dtype = logits.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
            var extras = LogProbExtras.For(options, prepared.Valid, dtype);
            // a view, so that the gradient this function returns reaches a leaf's AccumulateGrad as a fresh tensor it can
            // adopt (the library's own handle to it would otherwise make libtorch copy it: a second logits-sized buffer)
            var input = logits.requires_grad ? logits.view(logits.shape) : logits;
            Tensor tokens;
            if (allowKernels && logits.device_type == DeviceType.CUDA && logits.dtype != ScalarType.Float64 && logits.stride(2) == 1
                && CudaLogProbKernels.TryGet(logits.device, logits.dtype) is { } kernels)
                tokens = KernelFunction.apply(input, prepared.Targets, prepared.Valid, shift, kernels, extras);
            else
                tokens = SequenceLogProbFunction.apply(input, prepared.Targets, prepared.Valid, shift, options.TokensPerChunk(logits.shape[2], logits.device_type), dtype, extras,
                    (options.FusedCpu, options.HugePageGradients));
            var result = Targets.Finish(tokens, prepared, dtype, options.LdAlpha, extras, nameof(logits), sum => Targets.NonFinite(nameof(logits), sum));
            result.MoveToOuter(scope);
            return result;
        });
    }

    /// <summary>The logits the labels are scored against: all positions, or all but the last with ShiftByOne.</summary>
    internal static Tensor Scored(Tensor logits, bool shift) => shift ? logits.narrow(1, 0, logits.shape[1] - 1) : logits;

    /// <summary>A gradient buffer laid out like <paramref name="input"/> whose unscored last position is 0 (ShiftByOne), and its scored part.</summary>
    internal static (Tensor Full, Tensor Scored) GradientBuffer(Tensor input, ScalarType dtype, bool shift, bool hugePages = false)
    {
        var full = empty_like(input, dtype: dtype);
        if (hugePages && full.device_type == DeviceType.CPU)
            unsafe { TensorMemory.AdviseHugePages(TensorMemory.Address(full), full.numel() * full.ElementSize); }   // before any page is touched
        if (shift) full.narrow(1, input.shape[1] - 1, 1).zero_();
        return (full, Scored(full, shift));
    }

    /// <summary>The fused CUDA path: one kernel pass forward (with the statistics when asked), one backward (see <see cref="CudaLogProbKernels"/>).</summary>
    private sealed class KernelFunction : LibraryFunction<KernelFunction>
    {
        public override string Name => "AlignmentLosses.SequenceLogProbsCuda";

        protected override Tensor Forward(autograd.AutogradContext ctx, object[] vars)
        {
            var logits = (Tensor)vars[0];
            var targets = (Tensor)vars[1];
            var valid = (Tensor)vars[2];
            var shift = (bool)vars[3];
            var kernels = (CudaLogProbKernels.Kernels)vars[4];
            var extras = (LogProbExtras?)vars[5];
            Tensor lse, tokenLogp;
            if (extras is null)
                (lse, tokenLogp) = CudaLogProbKernels.LaunchForward(kernels, Scored(logits, shift), targets);
            else
            {
                Tensor stats;
                (lse, tokenLogp, stats) = CudaLogProbKernels.LaunchStatsForward(kernels, Scored(logits, shift), targets);
                extras.RecordKernelStatistics(stats);
            }
            ctx.save_for_backward(new List<Tensor> { logits, targets, valid, lse });
            ctx.save_data("kernels", kernels);
            ctx.save_data("shift", shift);
            return ChunkMath.Masked(tokenLogp, valid);
        }

        protected override Tensor?[] Backward(autograd.AutogradContext ctx, IReadOnlyList<Tensor> s, Tensor grad_output)
        {
            var kernels = (CudaLogProbKernels.Kernels)ctx.get_data("kernels")!;
            var shift = (bool)ctx.get_data("shift")!;
            var g = ChunkMath.Masked(grad_output.to_type(ScalarType.Float32), s[2]).contiguous();
            var (grad, scored) = GradientBuffer(s[0], s[0].dtype, shift);
            CudaLogProbKernels.LaunchBackward(kernels, Scored(s[0], shift), s[1], s[3], g, scored);
            return new Tensor?[] { grad, null, null, null, null, null };
        }
    }

    /// <summary>Forward: per-token log-probs from chunked logsumexp and target gathers. Backward: chunked g * (onehot - softmax).</summary>
    private sealed class SequenceLogProbFunction : LibraryFunction<SequenceLogProbFunction>
    {
        public override string Name => "AlignmentLosses.SequenceLogProbs";

        protected override Tensor Forward(autograd.AutogradContext ctx, object[] vars)
        {
            var logits = (Tensor)vars[0];
            var targets = (Tensor)vars[1];
            var valid = (Tensor)vars[2];
            var shift = (bool)vars[3];
            var chunk = (long)vars[4];
            var dtype = (ScalarType)vars[5];
            var extras = (LogProbExtras?)vars[6];
            var (fused, hugePages) = ((bool, bool))vars[7];
            var x = Scored(logits, shift);
            long n = x.shape[0], t = x.shape[1];
            var tokenLogp = empty(n, t, dtype: dtype, device: x.device);
            var lse = empty(n, t, dtype: dtype, device: x.device);
            fused &= LogSoftmaxRows.Supports(x);
            ctx.save_data("fused", fused);
            ctx.save_data("hugePages", hugePages);
            if (fused)
            {
                using var inner = NewDisposeScope();
                var perToken = extras?.PerToken;
                LogSoftmaxRows.Forward(x, targets, valid.contiguous(), lse, tokenLogp, perToken?.LogSumSquares, perToken?.Entropy, perToken?.LogitMean, perToken?.Hit);
            }
            else foreach (var block in ChunkMath.Blocks(n, t, chunk))
            {
                using var inner = NewDisposeScope();
                var z = block.Rows2D(x, dtype);                                             // the one live chunk
                var y = block.Flat(targets);
                var (blockLse, targetLogp) = ChunkMath.Forward(z, y);
                block.Of(lse).copy_(blockLse.view(block.Rows, block.Tokens));
                block.Of(tokenLogp).copy_(targetLogp.view(block.Rows, block.Tokens));
                extras?.Record(block, z, blockLse, y);
            }
            ctx.save_for_backward(new List<Tensor> { logits, targets, valid, lse });
            ctx.save_data("shift", shift);
            ctx.save_data("chunk", chunk);
            ctx.save_data("dtype", dtype);
            return ChunkMath.Masked(tokenLogp, valid);
        }

        protected override Tensor?[] Backward(autograd.AutogradContext ctx, IReadOnlyList<Tensor> saved, Tensor grad_output)
        {
            Tensor logits = saved[0], targets = saved[1], valid = saved[2], lse = saved[3];
            var shift = (bool)ctx.get_data("shift")!;
            var chunk = (long)ctx.get_data("chunk")!;
            var dtype = (ScalarType)ctx.get_data("dtype")!;
            var x = Scored(logits, shift);
            var rowGrad = ChunkMath.Masked(grad_output.to_type(dtype), valid);              // [N, T]: d loss / d token log-prob
            var (grad, scored) = GradientBuffer(logits, logits.dtype, shift, (bool)ctx.get_data("hugePages")!);
            if ((bool)ctx.get_data("fused")! && LogSoftmaxRows.Supports(scored))
            {
                LogSoftmaxRows.Backward(x, scored, targets, lse, rowGrad.contiguous());
                return new Tensor?[] { grad, null, null, null, null, null, null, null };
            }
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
            return new Tensor?[] { grad, null, null, null, null, null, null, null };
        }
    }
}

/// <summary>
/// What the forward pass computes besides the token log-probs, on request, chunk by chunk: WPO's log sum_v p_v^2 and the
/// step statistics (entropy, mean logit, argmax hit) per token; then their per-sequence sums. No gradient.
/// </summary>
internal sealed class LogProbExtras
{
    private readonly Tensor? _logSumSquares, _entropy, _logitMean, _hit;   // [R, T'] per token

    private LogProbExtras(Tensor valid, bool wpo, bool statistics, ScalarType dtype)
    {
        Valid = valid;
        Tensor Buffer() => zeros(valid.shape, dtype: dtype, device: valid.device);
        if (wpo) _logSumSquares = Buffer();
        if (statistics) { _entropy = Buffer(); _logitMean = Buffer(); _hit = Buffer(); }
    }

    private LogProbExtras(Tensor valid, Tensor? logSumSquares, Tensor? entropy, Tensor? logitMean, Tensor? hit)
    {
        Valid = valid;
        (_logSumSquares, _entropy, _logitMean, _hit) = (logSumSquares, entropy, logitMean, hit);
    }

    /// <summary>The per-token buffers [R, T'] the forward pass fills (null where not asked for).</summary>
    internal (Tensor? LogSumSquares, Tensor? Entropy, Tensor? LogitMean, Tensor? Hit) PerToken => (_logSumSquares, _entropy, _logitMean, _hit);

    /// <summary>[R, T'] per-token entropy, or null without step statistics.</summary>
    internal Tensor? TokenEntropy => _entropy;

    /// <summary>The per-token buffers, kept with the result (small: [R, T'] each) so that a part of it can be summed again.</summary>
    internal IEnumerable<Tensor> Buffers => new[] { _logSumSquares, _entropy, _logitMean, _hit }.OfType<Tensor>();

    /// <summary>The same extras summed over the positions <paramref name="valid"/> only (new handles: the caller owns them).</summary>
    internal LogProbExtras Within(Tensor valid, Tensor tokenLogp, Segments segments)
    {
        var part = new LogProbExtras(valid, _logSumSquares?.alias(), _entropy?.alias(), _logitMean?.alias(), _hit?.alias());
        part.Finish(tokenLogp, segments);
        return part;
    }

    /// <summary>The extras the options ask for, or null.</summary>
    internal static LogProbExtras? For(SequenceLogProbsOptions options, Tensor valid, ScalarType dtype) =>
        options.WpoTerms || options.StepStatistics ? new LogProbExtras(valid, options.WpoTerms, options.StepStatistics, dtype) : null;

    /// <summary>[R, T'] positions that count.</summary>
    internal Tensor Valid { get; }

    /// <summary>[N] sum over valid positions of log p_t - log sum_v p_v^2 (set by <see cref="Finish"/>).</summary>
    internal Tensor? WpoTerm { get; private set; }

    /// <summary>[N] sums over valid positions of the entropy, the mean logit, and the argmax hits.</summary>
    internal Tensor? EntropySum { get; private set; }
    internal Tensor? LogitMeanSum { get; private set; }
    internal Tensor? CorrectTokens { get; private set; }

    internal IEnumerable<Tensor> Results => new[] { WpoTerm, EntropySum, LogitMeanSum, CorrectTokens }.OfType<Tensor>();

    /// <summary>Records a block's per-token extras from its logits <paramref name="z"/> [count, V] (compute dtype) and logsumexp.</summary>
    internal void Record(ChunkMath.Block block, Tensor z, Tensor lse, Tensor targets)
    {
        using var noGrad = no_grad();
        Tensor Grid(Tensor perToken) => perToken.view(block.Rows, block.Tokens);
        if (_logSumSquares is not null) block.Of(_logSumSquares).copy_(Grid(ChunkMath.LogSumSquares(z, lse)));
        if (_entropy is null) return;
        block.Of(_entropy).copy_(Grid(ChunkMath.Entropy(z, lse)));
        block.Of(_logitMean!).copy_(Grid(z.mean(new long[] { 1 })));
        block.Of(_hit!).copy_(Grid(z.argmax(1) == targets));
    }

    /// <summary>Records the fused kernels' statistics [4, R, T'] (rows as in LogProbKernelSource.StatsRows).</summary>
    internal void RecordKernelStatistics(Tensor stats)
    {
        _logSumSquares?.copy_(stats[0]);
        _entropy?.copy_(stats[1]);
        _logitMean?.copy_(stats[2]);
        _hit?.copy_(stats[3]);
    }

    /// <summary>Per-sequence sums over valid positions (values at other positions never leak in, even NaN).</summary>
    internal void Finish(Tensor tokenLogp, Segments segments)
    {
        using var noGrad = no_grad();
        Tensor Sum(Tensor perToken) => segments.Reduce(ChunkMath.Masked(perToken, Valid));
        if (_logSumSquares is not null) WpoTerm = Sum(tokenLogp.detach() - _logSumSquares);
        if (_entropy is null) return;
        EntropySum = Sum(_entropy);
        LogitMeanSum = Sum(_logitMean!);
        CorrectTokens = Sum(_hit!);
    }
}

/// <summary>Label and mask handling shared by the log-prob paths (from logits and from hidden states).</summary>
internal static class Targets
{
    /// <summary>In-range target ids (0 where masked) and the validity mask, both [R, T'], and how positions map to sequences.</summary>
    internal sealed record Prepared(Tensor Targets, Tensor Valid, Segments Segments, bool Shift);

    /// <summary>
    /// Validates labels and mask against an [N, T, ...] input (or a packed [1, Total, ...] one with its boundaries), applies
    /// the alignment, and returns in-range target ids (0 where masked) and the validity mask, both [N, T'] with T' = T or
    /// T - 1. One synchronisation.
    /// </summary>
    internal static Prepared Prepare(Tensor input, string inputName, long vocab, string vocabName, Tensor labels, Tensor? mask,
        SequenceBoundaries? boundaries, LabelAlignment alignment, SequenceLogProbsOptions options)
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
        if (boundaries is not null)
        {
            if (input.shape[0] != 1)
                throw new ArgumentException($"A packed batch is one row: {inputName} must be [1, Total, ...]; got {input.shape[0]} rows. Pass padded batches without boundaries.", inputName);
            if (boundaries.TotalTokens > input.shape[1])
                throw new ArgumentException($"boundaries cover {boundaries.TotalTokens} tokens but {inputName} has {input.shape[1]} positions.", nameof(boundaries));
        }
        if (vocab == 0)
            throw new ArgumentException($"{vocabName} has an empty vocabulary (V = 0): there is no token to score.", vocabName);
        Guard.NotEmpty(input, inputName);
        if (alignment == LabelAlignment.ShiftByOne && input.shape[1] < 2)
            throw new ArgumentException("ShiftByOne needs at least 2 positions (the last position has no next token).", nameof(alignment));

        using var noGrad = no_grad();
        Tensor y = labels, m = mask ?? ones_like(labels, dtype: ScalarType.Bool);
        var maskFinite = mask is not null && mask.is_floating_point() ? isfinite(mask).all() : ones(1, dtype: ScalarType.Bool, device: labels.device).squeeze();
        long total = input.shape[1], scored = alignment == LabelAlignment.ShiftByOne ? total - 1 : total;
        if (alignment == LabelAlignment.ShiftByOne)
        {
            y = labels.narrow(1, 1, scored);
            m = m.narrow(1, 1, scored);
        }
        var valid = (m != 0) & (y != options.IgnoreIndex);
        Segments segments;
        if (boundaries is null)
            segments = Segments.PerRow(input.shape[0]);
        else
        {
            // position p scores label p (+1 when shifted): it counts only when both lie in the same sequence
            var ids = boundaries.SegmentIds(total, input.device);
            var scoredIds = ids.narrow(0, 0, scored);
            var labelIds = ids.narrow(0, total - scored, scored);
            var sameSequence = (scoredIds == labelIds) & (labelIds < boundaries.Count);
            valid = valid & sameSequence.unsqueeze(0);
            segments = Segments.Packed(boundaries.Count, labelIds.where(sameSequence, full_like(labelIds, boundaries.Count)));
        }
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
        return new Prepared(y.where(valid, zeros_like(y)).contiguous(), valid, segments, alignment == LabelAlignment.ShiftByOne);   // masked positions gather id 0, weighted by 0
    }

    /// <summary>
    /// The per-token weights of the sums: 1 at valid positions, 0 elsewhere; with LD-DPO's <paramref name="ldAlpha"/>, the
    /// positions past the shorter response of each pair (sequences i and S/2 + i) get alpha.
    /// </summary>
    internal static Tensor TokenWeights(Prepared prepared, ScalarType dtype, double? ldAlpha, string inputName)
    {
        var valid = prepared.Valid;
        var weights = valid.to_type(dtype);
        if (ldAlpha is not { } alpha) return weights;
        var segments = prepared.Segments;
        long n = segments.Count;
        if (n % 2 != 0)
            throw new ArgumentException(
                $"LD-DPO (LdAlpha) pairs sequence i with sequence B + i of a batch stacked as B chosen then B rejected; {inputName} holds {n} sequences, an odd number.", inputName);
        using var noGrad = no_grad();
        var counted = valid.to_type(ScalarType.Int64);
        var lengths = segments.Reduce(counted);                                             // [S] valid tokens per sequence
        var position = counted.cumsum(1);                                                   // 1-based index among valid tokens
        if (segments.IsPacked) position = position - segments.Expand(lengths.cumsum(0) - lengths);
        var shared = minimum(lengths.narrow(0, 0, n / 2), lengths.narrow(0, n / 2, n / 2));
        var tail = position > segments.Expand(cat(new[] { shared, shared }, 0));           // past the shared length
        return weights.masked_fill_(tail & valid, alpha);
    }

    /// <summary>
    /// Sums the (masked) token log-probs per sequence with their weights, checks the sums are finite (<paramref name="diagnose"/>
    /// names the cause otherwise), and builds the result with counts, means and the extras.
    /// </summary>
    internal static SequenceLogProbsResult Finish(Tensor tokens, Prepared prepared, ScalarType dtype, double? ldAlpha, LogProbExtras? extras,
        string inputName, Func<Tensor, Exception> diagnose)
    {
        var weights = TokenWeights(prepared, dtype, ldAlpha, inputName);
        var sum = prepared.Segments.Reduce(tokens * weights);
        var counts = prepared.Segments.Reduce(prepared.Valid.to_type(dtype));
        bool finite;
        using (no_grad()) finite = isfinite(sum.detach()).all().item<bool>();
        if (!finite) throw diagnose(sum);
        extras?.Finish(tokens, prepared.Segments);
        return new SequenceLogProbsResult(sum, counts, sum / counts.clamp_min(1), tokens, prepared.Valid, extras, prepared.Segments, prepared.Shift);
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
