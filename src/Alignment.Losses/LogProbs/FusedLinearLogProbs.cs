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
/// (one matrix product), keep the per-token target log-prob, free the chunk. The result is the [N] log-probs any
/// <see cref="IPreferenceLoss"/> consumes, so the loss maths is the same code as the unfused path, batch-coupled losses
/// (RPO) included. Backward (phase 2): for each chunk, recompute the logits (or reuse them, with
/// <see cref="SequenceLogProbsOptions.RetainHeadLogits"/>), form d loss/d logits = g * (onehot - softmax) (on the CPU in
/// one pass of the managed kernel, in place), and accumulate grad_hidden = G W and grad_W += G^T h (and grad_b).</para>
/// <para>Chunks hold whole sequences when they fit, token ranges otherwise, so peak memory is bounded by the chunk size
/// whatever T and V are: about ChunkTokens x V fp32 values plus the gradients of W (and h) themselves. Masked positions
/// contribute nothing, even when their hidden states hold NaN or Inf.</para>
/// <para>Use it with <see cref="Compute(Tensor, Tensor, Tensor?, Tensor, Tensor?, LabelAlignment, SequenceLogProbsOptions?)"/> then any loss, or with <see cref="ComputeLoss(IPreferenceLoss, Tensor, Tensor, Tensor?, Tensor, Tensor?, LabelAlignment, PreferenceLogps?, SequenceLogProbsOptions?)"/>
/// in one call.</para>
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
    /// <param name="options">Ignore index, chunk size (tokens per chunk), LD-DPO, WPO terms and step statistics.</param>
    /// <exception cref="ArgumentException">A shape, dtype, device or value is invalid; the message names the argument.</exception>
    /// <exception cref="InsufficientMemoryException">A chunk or a gradient cannot be allocated.</exception>
    public static SequenceLogProbsResult Compute(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? mask,
        LabelAlignment alignment, SequenceLogProbsOptions? options = null) =>
        ComputeCore(hidden, weight, bias, labels, mask, null, alignment, options);

    /// <summary>
    /// Per-sequence log-probs of a packed (padding-free) batch from hidden states: S sequences laid end to end in one row,
    /// with the <paramref name="boundaries"/> between them; each sequence's result equals that of its own padded row.
    /// </summary>
    /// <param name="hidden">[1, Total, H] last hidden states of the packed row.</param>
    /// <param name="weight">[V, H] head weight.</param>
    /// <param name="bias">Optional [V] head bias.</param>
    /// <param name="labels">[1, Total] int64 target ids.</param>
    /// <param name="mask">Optional [1, Total] mask of the tokens that count.</param>
    /// <param name="boundaries">The sequences' cumulative lengths.</param>
    /// <param name="alignment">Aligned or shifted labels; shifted, no logit scores a token of the next sequence.</param>
    /// <param name="options">As for padded batches.</param>
    public static SequenceLogProbsResult Compute(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? mask,
        SequenceBoundaries boundaries, LabelAlignment alignment, SequenceLogProbsOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(boundaries);
        return ComputeCore(hidden, weight, bias, labels, mask, boundaries, alignment, options);
    }

    private static SequenceLogProbsResult ComputeCore(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? mask,
        SequenceBoundaries? boundaries, LabelAlignment alignment, SequenceLogProbsOptions? options)
    {
        options ??= new SequenceLogProbsOptions();
        Guard.Usable(hidden, nameof(hidden));
        Guard.Usable(weight, nameof(weight));
        Guard.Rank(hidden, 3, nameof(hidden), "of hidden states [N, T, H]");
        Guard.Rank(weight, 2, nameof(weight), "of the head weight [V, H]");
        Guard.Floating(hidden, nameof(hidden));
        Guard.Floating(weight, nameof(weight));
        Guard.Defined(alignment, nameof(alignment));
        if (weight.shape[1] != hidden.shape[2])
            throw new ArgumentException($"weight must be [V, {hidden.shape[2]}] to match the hidden size; got {Guard.Shape(weight)}.", nameof(weight));
        Guard.SameDevice(hidden, nameof(hidden), weight, nameof(weight));
        if (bias is not null)
        {
            Guard.Usable(bias, nameof(bias));
            Guard.Floating(bias, nameof(bias));
            if (bias.dim() != 1 || bias.shape[0] != weight.shape[0])
                throw new ArgumentException($"bias must be [{weight.shape[0]}]; got {Guard.Shape(bias)}.", nameof(bias));
            Guard.SameDevice(hidden, nameof(hidden), bias, nameof(bias));
        }
        return Native.Run("FusedLinearLogProbs.Compute", () => $"hidden {Native.Describe(hidden)}, weight {Native.Describe(weight)}, chunk {options.HeadTokensPerChunk(weight.shape[0], hidden.device_type)} tokens", () =>
        {
            using var scope = NewDisposeScope();
            var prepared = Targets.Prepare(hidden, nameof(hidden), weight.shape[0], nameof(weight), labels, mask, boundaries, alignment, options);
            bool shift = alignment == LabelAlignment.ShiftByOne;
            var dtype = Numerics.DTypeFor(hidden, weight, bias);
            var extras = LogProbExtras.For(options, prepared.Valid, dtype);
            bool retain = options.RetainHeadLogits && is_grad_enabled() && (hidden.requires_grad || weight.requires_grad || bias?.requires_grad == true);
            var chunk = new ChunkMath.Plan(options.HeadTokensPerChunk(weight.shape[0], hidden.device_type), options.FusedCpu, retain);
            // views, so that the gradients reach a leaf's AccumulateGrad as fresh tensors it adopts instead of copying
            Tensor ViewOf(Tensor t) => t.requires_grad ? t.view(t.shape) : t;
            var tokens = bias is null
                ? LinearFunction.apply(ViewOf(hidden), ViewOf(weight), prepared.Targets, prepared.Valid, shift, chunk, dtype, extras)
                : LinearBiasFunction.apply(ViewOf(hidden), ViewOf(weight), ViewOf(bias), prepared.Targets, prepared.Valid, shift, chunk, dtype, extras);
            var result = Targets.Finish(tokens, prepared, dtype, options.LdAlpha, extras, nameof(hidden),
                sum => NonFinite(hidden, weight, bias, prepared.Valid, shift, sum, dtype));
            result.MoveToOuter(scope);
            return result;
        });
    }

    /// <summary>
    /// Any preference loss without side inputs from hidden states, in one call: the fused log-probs of a batch stacked as
    /// [chosen rows; rejected rows] feed <paramref name="loss"/> with the reference log-probs.
    /// </summary>
    /// <param name="loss">Any loss of the library (or your own <see cref="IPreferenceLoss"/>).</param>
    /// <param name="hidden">[2B, T, H] last hidden states: B chosen rows, then B rejected rows.</param>
    /// <param name="weight">[V, H] head weight.</param>
    /// <param name="bias">Optional [V] head bias.</param>
    /// <param name="labels">[2B, T] int64 target ids.</param>
    /// <param name="mask">Optional [2B, T] mask of the completion tokens.</param>
    /// <param name="alignment">Aligned or shifted labels (explicit).</param>
    /// <param name="reference">Reference log-probs [B] (chosen, rejected), or null for a reference-free loss.</param>
    /// <param name="options">Ignore index and chunk size.</param>
    public static PreferenceLossResult ComputeLoss(IPreferenceLoss loss, Tensor hidden, Tensor weight, Tensor? bias,
        Tensor labels, Tensor? mask, LabelAlignment alignment, PreferenceLogps? reference = null, SequenceLogProbsOptions? options = null) =>
        ComputeLoss(loss, policy => new PreferenceBatch(policy, reference), hidden, weight, bias, labels, mask, alignment, options);

    /// <summary>
    /// Any preference loss from hidden states, in one call, with side inputs: <paramref name="batch"/> builds the loss's
    /// batch around the fused policy log-probs, e.g. <c>policy =&gt; new PreferenceBatch(policy, reference) { Scores = scores }</c>.
    /// </summary>
    /// <param name="loss">Any loss of the library (or your own <see cref="IPreferenceLoss"/>).</param>
    /// <param name="batch">Builds the batch from the policy log-probs; its <see cref="PreferenceBatch.Policy"/> must be the given one.</param>
    /// <param name="hidden">[2B, T, H] last hidden states: B chosen rows, then B rejected rows.</param>
    /// <param name="weight">[V, H] head weight.</param>
    /// <param name="bias">Optional [V] head bias.</param>
    /// <param name="labels">[2B, T] int64 target ids.</param>
    /// <param name="mask">Optional [2B, T] mask of the completion tokens.</param>
    /// <param name="alignment">Aligned or shifted labels (explicit).</param>
    /// <param name="options">Ignore index and chunk size.</param>
    public static PreferenceLossResult ComputeLoss(IPreferenceLoss loss, Func<PreferenceLogps, PreferenceBatch> batch, Tensor hidden, Tensor weight, Tensor? bias,
        Tensor labels, Tensor? mask, LabelAlignment alignment, SequenceLogProbsOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(loss);
        ArgumentNullException.ThrowIfNull(batch);
        Guard.Usable(hidden, nameof(hidden));
        Guard.Rank(hidden, 3, nameof(hidden), "of hidden states [2B, T, H]");
        if (hidden.shape[0] % 2 != 0)
            throw new ArgumentException(
                $"hidden must stack B chosen rows then B rejected rows ([2B, T, H]); got {hidden.shape[0]} rows, an odd number.", nameof(hidden));
        using var scope = NewDisposeScope();
        using var logps = Compute(hidden, weight, bias, labels, mask, alignment, options);
        var policy = logps.ToPreferenceLogps();
        var built = batch(policy) ?? throw new InvalidOperationException("The batch function returned null; it must return a PreferenceBatch around the policy log-probs it is given.");
        if (!ReferenceEquals(built.Policy, policy))
            throw new InvalidOperationException("The batch function must build the PreferenceBatch around the policy log-probs it is given (new PreferenceBatch(policy, ...)); it used other log-probs.");
        var result = loss.Compute(built);
        result.MoveToOuter(scope);
        return result;
    }

    /// <summary>Only on failure: a non-finite weight or bias, non-finite hidden states at valid positions, or an overflow.</summary>
    private static Exception NonFinite(Tensor hidden, Tensor weight, Tensor? bias, Tensor valid, bool shift, Tensor sum, ScalarType dtype)
    {
        Guard.AllFinite((weight, nameof(weight)), (bias, nameof(bias)));
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var badHidden = (~isfinite(SequenceLogProbs.Scored(hidden, shift))).any(-1) & valid;   // [N, T']
        if (badHidden.any().item<bool>())
        {
            var rows = badHidden.any(1).nonzero().flatten().cpu().data<long>().Take(8);
            return new ArgumentException($"hidden contains NaN or Inf at valid positions of sequence(s) {string.Join(", ", rows)}.", nameof(hidden));
        }
        var seqs = (~isfinite(sum.detach())).nonzero().flatten().cpu().data<long>().Take(8);
        return new ArithmeticException(
            $"The log-probs of sequence(s) {string.Join(", ", seqs)} overflowed {dtype} although hidden, weight and bias are finite: the logits h W^T + b " +
            $"(|hidden| up to {Guard.MaxAbs(new[] { hidden }):G4}, |weight| up to {Guard.MaxAbs(new[] { weight }):G4}) exceed its range.");
    }

    private static Tensor Logits(Tensor h, Tensor wt, Tensor? b) =>
        b is null ? h.mm(wt) : torch.addmm(b, h, wt, 1, 1);   // mm / addmm, never matmul: see Native

    /// <summary>The forward pass; with <see cref="ChunkMath.Plan.Retain"/> each chunk's logits are added to <paramref name="kept"/> (in block order).</summary>
    private static Tensor Forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor valid, bool shift, ChunkMath.Plan plan, ScalarType dtype,
        LogProbExtras? extras, List<Tensor> kept)
    {
        var x = SequenceLogProbs.Scored(hidden, shift);
        long n = x.shape[0], t = x.shape[1];
        var tokenLogp = empty(n, t, dtype: dtype, device: x.device);
        var wt = weight.to_type(dtype).t();
        var b = bias?.to_type(dtype);
        foreach (var block in ChunkMath.Blocks(n, t, plan.Tokens))
        {
            using var inner = NewDisposeScope();
            var logits = Logits(block.Rows2D(x, dtype), wt, b);                              // [count, V]: the one live chunk
            var y = block.Flat(targets);
            var (lse, targetLogp) = ChunkMath.Forward(logits, y, plan.Fused);
            block.Of(tokenLogp).copy_(targetLogp.view(block.Rows, block.Tokens));
            extras?.Record(block, logits, lse, y);
            if (plan.Retain)
            {
                inner.MoveToOuter(logits);       // alive until the caller saves it for backward (libtorch then holds it)
                kept.Add(logits);
            }
        }
        return ChunkMath.Masked(tokenLogp, valid);
    }

    /// <summary>
    /// The backward pass; <paramref name="kept"/>: the forward's chunk logits in block order (retained), or empty (recompute).
    /// Overwrote: whether a kept chunk now holds its gradient (the kernel writes it in place; the libtorch path works on a
    /// copy, since its in-place ops would invalidate the saved tensor for a second backward pass).
    /// </summary>
    private static (Tensor Hidden, Tensor Weight, Tensor? Bias, bool Overwrote) Backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets,
        Tensor valid, bool shift, ChunkMath.Plan plan, ScalarType dtype, Tensor gradOutput, IReadOnlyList<Tensor> kept)
    {
        var x = SequenceLogProbs.Scored(hidden, shift);
        var (gradHidden, scored) = SequenceLogProbs.GradientBuffer(hidden, hidden.dtype, shift);
        var gradWeight = zeros(weight.shape, dtype: dtype, device: weight.device);
        var gradBias = bias is null ? null : zeros(bias.shape, dtype: dtype, device: weight.device);
        var rowGrad = ChunkMath.Masked(gradOutput.to_type(dtype), valid);                   // [N, T']: d loss / d token log-prob
        var w = weight.to_type(dtype);
        var wt = w.t();
        var b = bias?.to_type(dtype);
        int index = 0;
        bool overwrote = false;
        foreach (var block in ChunkMath.Blocks(x.shape[0], x.shape[1], plan.Tokens))
        {
            using var inner = NewDisposeScope();
            var g = block.Flat(rowGrad);
            // masked positions contribute nothing, even when their hidden states are NaN (0 * NaN would be NaN in G^T h)
            var h = block.Rows2D(x, dtype).masked_fill((g == 0).unsqueeze(1), 0);
            // the forward's logits (overwritten in place by the kernel, after which a second backward pass through a retained
            // graph recomputes; copied first on the libtorch path), or recomputed; masked rows get exact zeros whatever their
            // logits hold
            Tensor logits;
            if (index < kept.Count)
            {
                var saved = kept[index++];
                bool inPlace = ChunkMath.KernelTakes(saved, g, plan.Fused);
                overwrote |= inPlace;
                logits = inPlace ? saved : saved.clone();
            }
            else logits = Recompute(h, wt, b);
            var gradLogits = ChunkMath.GradInPlace(logits, null, block.Flat(targets), g, plan.Fused);   // [count, V]
            block.Of(scored).copy_(gradLogits.mm(w).view(block.Rows, block.Tokens, x.shape[2]));
            gradWeight.addmm_(gradLogits.t(), h);
            gradBias?.add_(gradLogits.sum(dim: 0));   // named: a literal 0 would bind to sum(ScalarType)
        }
        return (gradHidden, gradWeight.to_type(weight.dtype), gradBias?.to_type(bias!.dtype), overwrote);
    }

    /// <summary>Chunks whose logits a backward pass on this thread recomputed (lets tests see that retained logits were used).</summary>
    [ThreadStatic] internal static int RecomputedChunksOnThisThread;

    private static Tensor Recompute(Tensor h, Tensor wt, Tensor? b)
    {
        RecomputedChunksOnThisThread++;
        return Logits(h, wt, b);
    }

    /// <summary>
    /// The retained chunk logits (saved after the <paramref name="first"/> fixed tensors) while they still hold the logits:
    /// until a backward pass has overwritten them with their gradient (then a second pass through a retained graph recomputes).
    /// </summary>
    private static IReadOnlyList<Tensor> Retained(autograd.AutogradContext ctx, IReadOnlyList<Tensor> saved, int first) =>
        ctx.get_data("retained") is true ? saved.Skip(first).ToList() : Array.Empty<Tensor>();

    /// <summary>The backward pass of either function; records when the retained logits were overwritten.</summary>
    private static (Tensor Hidden, Tensor Weight, Tensor? Bias) Backward(autograd.AutogradContext ctx, IReadOnlyList<Tensor> s, Tensor? bias, int fixedCount,
        Tensor gradOutput)
    {
        int offset = bias is null ? 0 : 1;
        var (gh, gw, gb, overwrote) = Backward(s[0], s[1], bias, s[2 + offset], s[3 + offset], (bool)ctx.get_data("shift")!, (ChunkMath.Plan)ctx.get_data("chunk")!,
            (ScalarType)ctx.get_data("dtype")!, gradOutput, Retained(ctx, s, fixedCount));
        if (overwrote) ctx.save_data("retained", false);
        return (gh, gw, gb);
    }

    private sealed class LinearFunction : LibraryFunction<LinearFunction>
    {
        public override string Name => "AlignmentLosses.FusedLinearLogProbs";

        protected override Tensor Forward(autograd.AutogradContext ctx, object[] vars)
        {
            Tensor hidden = (Tensor)vars[0], weight = (Tensor)vars[1], targets = (Tensor)vars[2], weights = (Tensor)vars[3];
            ctx.save_data("shift", vars[4]);
            ctx.save_data("chunk", vars[5]);
            ctx.save_data("dtype", vars[6]);
            var kept = new List<Tensor>();
            var result = FusedLinearLogProbs.Forward(hidden, weight, null, targets, weights, (bool)vars[4], (ChunkMath.Plan)vars[5], (ScalarType)vars[6], (LogProbExtras?)vars[7], kept);
            ctx.save_for_backward(new List<Tensor> { hidden, weight, targets, weights }.Concat(kept).ToList());
            ctx.save_data("retained", kept.Count > 0);
            return result;
        }

        protected override Tensor?[] Backward(autograd.AutogradContext ctx, IReadOnlyList<Tensor> s, Tensor grad_output)
        {
            var (gh, gw, _) = FusedLinearLogProbs.Backward(ctx, s, null, 4, grad_output);
            return new Tensor?[] { gh, gw, null, null, null, null, null, null };
        }
    }

    private sealed class LinearBiasFunction : LibraryFunction<LinearBiasFunction>
    {
        public override string Name => "AlignmentLosses.FusedLinearLogProbsWithBias";

        protected override Tensor Forward(autograd.AutogradContext ctx, object[] vars)
        {
            Tensor hidden = (Tensor)vars[0], weight = (Tensor)vars[1], bias = (Tensor)vars[2], targets = (Tensor)vars[3], weights = (Tensor)vars[4];
            ctx.save_data("shift", vars[5]);
            ctx.save_data("chunk", vars[6]);
            ctx.save_data("dtype", vars[7]);
            var kept = new List<Tensor>();
            var result = FusedLinearLogProbs.Forward(hidden, weight, bias, targets, weights, (bool)vars[5], (ChunkMath.Plan)vars[6], (ScalarType)vars[7], (LogProbExtras?)vars[8], kept);
            ctx.save_for_backward(new List<Tensor> { hidden, weight, bias, targets, weights }.Concat(kept).ToList());
            ctx.save_data("retained", kept.Count > 0);
            return result;
        }

        protected override Tensor?[] Backward(autograd.AutogradContext ctx, IReadOnlyList<Tensor> s, Tensor grad_output)
        {
            var (gh, gw, gb) = FusedLinearLogProbs.Backward(ctx, s, s[2], 5, grad_output);
            return new Tensor?[] { gh, gw, gb, null, null, null, null, null, null };
        }
    }
}
