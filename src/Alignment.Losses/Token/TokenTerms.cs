using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// One token batch in the compute dtype, as a token loss's formula sees it: the policy's per-token log-probs l (with
/// grad), the detached l_old, l_ref and l_beh, the advantages broadcast over tokens, the mask, and per-sequence sums.
/// </summary>
/// <remarks>
/// Built by <see cref="TokenLoss{TOptions}"/> and handed to its <c>Evaluate</c>. The compute dtype is float32 (bfloat16 and
/// float16 inputs are upcast first) or float64 when an input is float64. Every per-token tensor is 0 where no token
/// counts (whatever the caller's tensors hold there, NaN included). Every tensor lives in the loss call's dispose scope:
/// use them freely, do not dispose them.
/// </remarks>
public sealed class TokenTerms
{
    private readonly Segments _segments;

    internal TokenTerms(TokenBatch batch, Segments segments, ScalarType dtype, ValueChecks checks)
    {
        _segments = segments;
        DType = dtype;
        Checks = checks;
        SequenceCount = segments.Count;
        using (no_grad()) Valid = batch.Mask != 0;
        Mask = Valid.to_type(dtype);
        Tensor Masked(Tensor t) => MaskOut(Numerics.As(t, dtype));
        Tensor MaskedDetached(Tensor t) { using var noGrad = no_grad(); return Masked(t.detach()); }
        LogProbs = Masked(batch.LogProbs);
        OldLogProbs = batch.OldLogProbs is { } old ? MaskedDetached(old) : LogProbs.detach();
        ReferenceLogProbs = batch.ReferenceLogProbs is { } r ? MaskedDetached(r) : null;
        BehaviourLogProbs = batch.BehaviourLogProbs is { } b ? MaskedDetached(b) : null;
        Entropy = batch.Entropy is { } h ? Masked(h) : null;
        EntropyThreshold = batch.Window?.EntropyThreshold;
        using (no_grad()) TokenCounts = segments.Reduce(Mask);
        if (batch.Advantages is { } a)
        {
            using var noGrad = no_grad();
            var adv = Numerics.As(a.detach(), dtype);
            AdvantagesPerSequence = adv.dim() == 1;
            SequenceAdvantages = AdvantagesPerSequence ? adv : null;
            Advantages = AdvantagesPerSequence ? Expand(adv) : MaskOut(adv);
        }
    }

    /// <summary>Terms of a loss that is not a policy gradient (distillation): the validity mask, the student's target
    /// log-probs and the layout, for the shared reductions and metrics.</summary>
    internal TokenTerms(Tensor valid, Tensor logProbs, Segments segments, ScalarType dtype, ValueChecks checks)
    {
        _segments = segments;
        DType = dtype;
        Checks = checks;
        SequenceCount = segments.Count;
        Valid = valid;
        Mask = Valid.to_type(dtype);
        LogProbs = MaskOut(Numerics.As(logProbs, dtype));
        OldLogProbs = LogProbs.detach();
        using (no_grad()) TokenCounts = segments.Reduce(Mask);
    }

    /// <summary>The compute dtype: float32, or float64 when an input is float64.</summary>
    public ScalarType DType { get; }

    /// <summary>Where value checks of side inputs are registered (read back once, after the formula).</summary>
    public ValueChecks Checks { get; }

    /// <summary>N, the number of sequences.</summary>
    public long SequenceCount { get; }

    /// <summary>[N, T] true where a token counts.</summary>
    public Tensor Valid { get; }

    /// <summary>m [N, T]: 1 where a token counts, 0 elsewhere, in the compute dtype.</summary>
    public Tensor Mask { get; }

    /// <summary>l [N, T], with grad (0 where no token counts).</summary>
    public Tensor LogProbs { get; }

    /// <summary>l_old [N, T], detached: the batch's <see cref="TokenBatch.OldLogProbs"/>, or sg(l) without them.</summary>
    public Tensor OldLogProbs { get; }

    /// <summary>l_ref [N, T], detached; null without reference log-probs.</summary>
    public Tensor? ReferenceLogProbs { get; }

    /// <summary>l_beh [N, T], detached; null without the inference engine's log-probs.</summary>
    public Tensor? BehaviourLogProbs { get; }

    /// <summary>H [N, T] as given (with grad when the caller's has one); null without entropy.</summary>
    public Tensor? Entropy { get; }

    /// <summary>The window's global entropy threshold (<see cref="TokenWindow.EntropyThreshold"/>), when given.</summary>
    internal double? EntropyThreshold { get; }

    /// <summary>A [N, T], detached: per-sequence advantages broadcast over each sequence's tokens, or the per-token ones; null without.</summary>
    public Tensor? Advantages { get; }

    /// <summary>Whether the advantages were given per sequence ([N]).</summary>
    public bool AdvantagesPerSequence { get; }

    /// <summary>A [N] as given when the advantages are per sequence; null otherwise.</summary>
    public Tensor? SequenceAdvantages { get; }

    /// <summary>|o_i| [N]: the valid tokens of each sequence (no grad).</summary>
    public Tensor TokenCounts { get; }

    /// <summary>[N]: the sum of a per-token tensor over each sequence's valid tokens (differentiable).</summary>
    public Tensor SequenceSum(Tensor perToken)
    {
        ArgumentNullException.ThrowIfNull(perToken);
        return _segments.Reduce(MaskOut(perToken));
    }

    /// <summary>[N]: the mean of a per-token tensor over each sequence's valid tokens (0 for a sequence without one).</summary>
    public Tensor SequenceMean(Tensor perToken) => SequenceSum(perToken) / TokenCounts.clamp_min(1);

    /// <summary>[N, T]: a per-sequence value [N] at every valid token of its sequence (0 elsewhere); differentiable.</summary>
    public Tensor Expand(Tensor perSequence)
    {
        ArgumentNullException.ThrowIfNull(perSequence);
        var grid = _segments.Expand(perSequence).expand(Valid.shape);
        return MaskOut(grid);
    }

    /// <summary>The mean of a per-token tensor over every valid token of the micro-batch (0 without one), detached: for metrics.</summary>
    public Tensor TokenMean(Tensor perToken)
    {
        ArgumentNullException.ThrowIfNull(perToken);
        using var noGrad = no_grad();
        return MaskOut(Numerics.As(perToken.detach(), DType)).sum() / ValidTokens.clamp_min(1);
    }

    /// <summary>[N, T]: <paramref name="perToken"/> where a token counts, 0 elsewhere (NaN there included); differentiable.</summary>
    public Tensor MaskOut(Tensor perToken)
    {
        ArgumentNullException.ThrowIfNull(perToken);
        return perToken.where(Valid, zeros(1, dtype: perToken.dtype, device: perToken.device));
    }

    /// <summary>The number of valid tokens of the micro-batch (0-d, compute dtype, no grad), computed once per call.</summary>
    internal Tensor ValidTokens => _validTokens ??= Mask.sum();
    private Tensor? _validTokens;

    /// <summary>The number of sequences with at least one valid token (0-d, compute dtype, no grad), computed once per call.</summary>
    internal Tensor NonEmptySequences => _nonEmpty ??= (TokenCounts > 0).to_type(DType).sum();
    private Tensor? _nonEmpty;

    /// <summary>A side input detached and in the compute dtype.</summary>
    public Tensor Upcast(Tensor sideInput)
    {
        ArgumentNullException.ThrowIfNull(sideInput);
        return Numerics.As(sideInput.detach(), DType);
    }
}
