using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>How a token-level loss turns per-token losses L [N, T] into one number (the normaliser every framework has got wrong once).</summary>
public enum TokenAggregation
{
    /// <summary>sum m L / N_win: every token of the window weighs the same (DAPO; TRL "dapo", "cispo"; verl "token-mean").</summary>
    TokenMean,

    /// <summary>sum_i (sum_t m L / |o_i|) / S_win: each sequence's token mean, averaged over sequences (TRL "grpo", "sapo", GSPO; verl "seq-mean-token-mean").</summary>
    SequenceMeanTokenMean,

    /// <summary>sum m L / S_win: each sequence's token sum, averaged over sequences (verl "seq-mean-token-sum").</summary>
    SequenceMeanTokenSum,

    /// <summary>sum m L / (S_win * L_max) with a fixed L_max (Dr. GRPO; TRL "dr_grpo"; verl "seq-mean-token-sum-norm").</summary>
    ConstantNormalizer,

    /// <summary>
    /// sum m L / sum m over this micro-batch alone, divided by <see cref="TokenWindow.MicroBatches"/> (TRL "bnpo"). Not
    /// invariant to how a window is cut into micro-batches and ranks: the only reduction that is not.
    /// </summary>
    LocalTokenMean,
}

/// <summary>
/// The reduction of a token-level loss: which normaliser, with the window's global counts
/// (<see cref="TokenBatch.Window"/>) taken from outside, so that gradient accumulation and data parallelism give the
/// same gradient as one big batch by construction (every mode but <see cref="TokenAggregation.LocalTokenMean"/>).
/// </summary>
/// <remarks>
/// <para>With S_win, N_win and D from <see cref="TokenWindow"/> (this micro-batch's counts when the batch has no window, D = 1),
/// a micro-batch's loss is D times its share of the window's objective; see <see cref="TokenWindow"/> for the gradient
/// convention. Example, L = [[1, 2, ·, ·], [3, 4, 5, 6]] (lengths 2, 4): token mean 3.5, sequence mean of token means 3.0,
/// sequence mean of token sums 10.5, constant normaliser with L_max 4: 2.625.</para>
/// <para>A loss whose policy term is one value per sequence (a sequence-level ratio with per-sequence advantages: GSPO,
/// RLOO, GMPO) reduces only with <see cref="TokenAggregation.SequenceMeanTokenMean"/>: the token-summing modes would weigh
/// each sequence's loss by its length (TRL issue 3823), so they are refused with an error instead.</para>
/// </remarks>
public sealed record TokenReduction
{
    /// <summary>A reduction.</summary>
    /// <param name="aggregation">The normaliser.</param>
    /// <param name="maxCompletionLength">L_max for <see cref="TokenAggregation.ConstantNormalizer"/> (TRL's max_completion_length);
    /// required there and refused elsewhere.</param>
    /// <param name="countEmptySequences">Whether a sequence without a valid token counts in S (default false: S counts the non-empty
    /// sequences, as the spec's S_win; TRL's mean over rows counts every row, so its factory sets true).</param>
    /// <exception cref="ArgumentException">An undefined aggregation, or L_max missing, not positive or given where unused.</exception>
    public TokenReduction(TokenAggregation aggregation, double? maxCompletionLength = null, bool countEmptySequences = false)
    {
        if (!Enum.IsDefined(aggregation))
            throw new ArgumentException($"aggregation {(int)aggregation} is not a TokenAggregation.", nameof(aggregation));
        if (aggregation == TokenAggregation.ConstantNormalizer)
        {
            if (maxCompletionLength is not { } l || !(l >= 1 && double.IsFinite(l)))
                throw new ArgumentException(
                    $"The constant normaliser (Dr. GRPO) divides by S * L_max: maxCompletionLength must be a finite length >= 1; got {maxCompletionLength?.ToString() ?? "none"}.",
                    nameof(maxCompletionLength));
        }
        else if (maxCompletionLength is not null)
            throw new ArgumentException($"maxCompletionLength is used only by the constant normaliser, not by {aggregation}.", nameof(maxCompletionLength));
        Aggregation = aggregation;
        MaxCompletionLength = maxCompletionLength;
        CountEmptySequences = countEmptySequences;
    }

    /// <summary>The normaliser.</summary>
    public TokenAggregation Aggregation { get; }

    /// <summary>L_max of the constant normaliser; null otherwise.</summary>
    public double? MaxCompletionLength { get; }

    /// <summary>Whether sequences without a valid token count in S (see the constructor).</summary>
    public bool CountEmptySequences { get; }

    /// <summary>Token mean over the window (DAPO).</summary>
    public static TokenReduction TokenMean { get; } = new(TokenAggregation.TokenMean);

    /// <summary>Sequence mean of token means (GRPO, GSPO).</summary>
    public static TokenReduction SequenceMeanTokenMean { get; } = new(TokenAggregation.SequenceMeanTokenMean);

    /// <summary>Sequence mean of token sums.</summary>
    public static TokenReduction SequenceMeanTokenSum { get; } = new(TokenAggregation.SequenceMeanTokenSum);

    /// <summary>Local token mean of the micro-batch (TRL "bnpo"; not invariant to the cut).</summary>
    public static TokenReduction LocalTokenMean { get; } = new(TokenAggregation.LocalTokenMean);

    /// <summary>Dr. GRPO's constant normaliser S * L_max.</summary>
    public static TokenReduction ConstantNormalizer(double maxCompletionLength) => new(TokenAggregation.ConstantNormalizer, maxCompletionLength);

    /// <summary>Whether the mode weighs a sequence's tokens by their number (every mode but the sequence mean of token means).</summary>
    public bool SumsTokens => Aggregation != TokenAggregation.SequenceMeanTokenMean;

    /// <summary>
    /// The scalar loss from masked per-token losses (0 where no token counts), with their per-sequence token means when the
    /// caller has them (computed here otherwise). Window counts given as numbers stay host scalars: no tensor, no copy.
    /// </summary>
    internal Tensor Reduce(Tensor perToken, Tensor? perSequenceMean, TokenTerms terms, TokenWindow? window)
    {
        double d = window?.DataParallelSize ?? 1;
        Tensor Over(Tensor sum, double? count, Func<Tensor> local) =>
            count is { } c ? sum * (d / c) : sum * d / local().clamp_min(1);
        // S: the window's, else every row (a host count) or the non-empty sequences (a device count)
        double? sequences = window?.Sequences ?? (CountEmptySequences ? Math.Max(1, terms.SequenceCount) : null);
        Tensor LocalSequences() => terms.NonEmptySequences;
        return Aggregation switch
        {
            TokenAggregation.TokenMean => Over(perToken.sum(), window?.Tokens, () => terms.ValidTokens),
            TokenAggregation.SequenceMeanTokenMean => Over((perSequenceMean ?? terms.SequenceMean(perToken)).sum(), sequences, LocalSequences),
            TokenAggregation.SequenceMeanTokenSum => Over(perToken.sum(), sequences, LocalSequences),
            TokenAggregation.ConstantNormalizer => Over(perToken.sum() / MaxCompletionLength!.Value, sequences, LocalSequences),
            _ => perToken.sum() / terms.ValidTokens.clamp_min(1) / (window?.MicroBatches ?? 1),
        };
    }

    /// <summary>
    /// <see cref="Reduce"/>'s normaliser as one host factor, from host counts (the fused CPU pass has them): the loss is this
    /// times sum(L) over the valid tokens, or, for <see cref="TokenAggregation.SequenceMeanTokenMean"/>, times the sum of the
    /// sequences' token means. The window's counts when it has them, as in <see cref="Reduce"/>.
    /// </summary>
    /// <param name="validTokens">This micro-batch's valid tokens.</param>
    /// <param name="nonEmptySequences">Its sequences with at least one valid token.</param>
    /// <param name="sequenceCount">Its sequences (N).</param>
    /// <param name="window">The window's counts, or null.</param>
    internal double Scale(double validTokens, double nonEmptySequences, long sequenceCount, TokenWindow? window)
    {
        double d = window?.DataParallelSize ?? 1;
        double sequences = window?.Sequences ?? (CountEmptySequences ? Math.Max(1, sequenceCount) : Math.Max(1, nonEmptySequences));
        return Aggregation switch
        {
            TokenAggregation.TokenMean => d / (window?.Tokens ?? Math.Max(1, validTokens)),
            TokenAggregation.SequenceMeanTokenMean or TokenAggregation.SequenceMeanTokenSum => d / sequences,
            TokenAggregation.ConstantNormalizer => d / (sequences * MaxCompletionLength!.Value),
            _ => 1 / (Math.Max(1, validTokens) * (window?.MicroBatches ?? 1)),
        };
    }

    /// <inheritdoc />
    public override string ToString() => Aggregation switch
    {
        TokenAggregation.ConstantNormalizer => $"ConstantNormalizer(L_max {MaxCompletionLength})",
        _ => Aggregation.ToString(),
    } + (CountEmptySequences ? ", empty sequences counted" : "");
}
