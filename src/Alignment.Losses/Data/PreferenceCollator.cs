using System.Security.Cryptography;
using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses.Data;

/// <summary>One tokenised preference example: a prompt and a chosen and a rejected completion (token ids).</summary>
/// <param name="Prompt">The prompt's token ids (with its chat template and BOS applied, if the model uses them). Not empty.</param>
/// <param name="Chosen">The preferred completion's token ids (with EOS, if the model uses one). Not empty.</param>
/// <param name="Rejected">The dispreferred completion's token ids. Not empty.</param>
public sealed record PreferenceExample(IReadOnlyList<int> Prompt, IReadOnlyList<int> Chosen, IReadOnlyList<int> Rejected);

/// <summary>Which end of an over-long prompt is kept.</summary>
public enum PromptTruncation
{
    /// <summary>Keep the last tokens (the part next to the completion); the default, as in TRL's earlier DPO collators.</summary>
    KeepEnd,

    /// <summary>Keep the first tokens.</summary>
    KeepStart,
}

/// <summary>
/// Options of <see cref="PreferenceCollator"/>: padding, limits and truncation. Validated on construction; limits that
/// cannot hold a single completion token are an error here, not a surprise at batch time.
/// </summary>
/// <remarks>
/// Truncation, per example, in this order: (1) a prompt longer than <see cref="MaxPromptLength"/> is cut by
/// <see cref="PromptTruncation"/>; (2) each completion longer than <see cref="MaxCompletionLength"/> keeps its first tokens;
/// (3) where prompt + completion exceeds <see cref="MaxLength"/>, the completion keeps its first MaxLength - prompt tokens.
/// A prompt that leaves no room for a completion token under MaxLength is an error naming the example.
/// </remarks>
public sealed record PreferenceCollatorOptions
{
    /// <summary>Token id (&gt;= 0) written into padding positions (they are masked out). Default 0.</summary>
    public int PadTokenId
    {
        get => field;
        init => field = value >= 0 ? value : throw new ArgumentOutOfRangeException(nameof(PadTokenId), value, "PadTokenId must be a token id (>= 0); padding is masked out, so any id of the vocabulary works.");
    }

    /// <summary>Longest prompt kept (null: no limit).</summary>
    public int? MaxPromptLength
    {
        get => field;
        init
        {
            field = Positive(value, nameof(MaxPromptLength));
            CheckConsistent();
        }
    }

    /// <summary>Longest completion kept (null: no limit).</summary>
    public int? MaxCompletionLength { get => field; init => field = Positive(value, nameof(MaxCompletionLength)); }

    /// <summary>Longest prompt + completion (null: no limit). Must exceed <see cref="MaxPromptLength"/> when both are set.</summary>
    public int? MaxLength
    {
        get => field;
        init
        {
            field = Positive(value, nameof(MaxLength));
            CheckConsistent();
        }
    }

    /// <summary>Which end of an over-long prompt is kept. Default <see cref="Data.PromptTruncation.KeepEnd"/>.</summary>
    public PromptTruncation PromptTruncation { get => field; init => field = Guard.Defined(value, nameof(PromptTruncation)); } = PromptTruncation.KeepEnd;

    /// <summary>Round the padded length (padded mode) or the packed row's length (packed mode) up to a multiple of this (null: none).</summary>
    public int? PadToMultipleOf { get => field; init => field = Positive(value, nameof(PadToMultipleOf)); }

    /// <summary>Label written where a token does not count (<see cref="CollatedPreferences.Labels"/>). Default -100.</summary>
    public long IgnoreIndex { get; init; } = -100;

    private static int? Positive(int? value, string name) =>
        value is null or >= 1 ? value : throw new ArgumentOutOfRangeException(name, value, $"{name} must be >= 1 (or null for no limit).");

    private void CheckConsistent()
    {
        if (MaxLength is { } max && MaxPromptLength is { } prompt && prompt >= max)
            throw new ArgumentException($"MaxLength ({max}) must exceed MaxPromptLength ({prompt}) so that every completion keeps at least one token.", nameof(MaxLength));
    }
}

/// <summary>An example after truncation, with its cache key.</summary>
/// <param name="Prompt">Prompt ids kept.</param>
/// <param name="Chosen">Chosen completion ids kept.</param>
/// <param name="Rejected">Rejected completion ids kept.</param>
/// <param name="Key">A 128-bit content key (hex) of exactly these ids: equal keys mean equal sequences.</param>
public sealed record TruncatedExample(int[] Prompt, int[] Chosen, int[] Rejected, string Key);

/// <summary>
/// Turns tokenised (prompt, chosen, rejected) examples into a model-ready batch: B chosen sequences then B rejected ones
/// (TRL's order, which <see cref="SequenceLogProbsResult.ToPreferenceLogps"/> and the fused loss expect), right-padded
/// [2B, T] with attention, prompt and completion masks, or packed without padding into one row with sequence boundaries
/// and position ids.
/// </summary>
/// <example>
/// <code>
/// var collator = new PreferenceCollator(new PreferenceCollatorOptions { MaxLength = 512, MaxPromptLength = 256, PadTokenId = pad });
/// using var batch = collator.Collate(examples, device);
/// var logits = model.forward(batch.InputIds);   // [2B, T, V]
/// using var logps = SequenceLogProbs.Compute(logits, batch.Labels, null, LabelAlignment.ShiftByOne);
/// </code>
/// </example>
public sealed class PreferenceCollator
{
    /// <summary>Creates a collator.</summary>
    public PreferenceCollator(PreferenceCollatorOptions? options = null) => Options = options ?? new PreferenceCollatorOptions();

    /// <summary>The options.</summary>
    public PreferenceCollatorOptions Options { get; }

    /// <summary>
    /// Applies the limits to one example. <paramref name="index"/> only names the example in errors.
    /// </summary>
    /// <exception cref="ArgumentException">A completion or the prompt is empty, or the prompt leaves no room for a completion token.</exception>
    public TruncatedExample Truncate(PreferenceExample example, int index = 0)
    {
        ArgumentNullException.ThrowIfNull(example);
        string where = $"example {index}";
        if (example.Prompt is null || example.Chosen is null || example.Rejected is null)
            throw new ArgumentException($"{where} has a null token list; prompt, chosen and rejected are all required.", nameof(example));
        if (example.Prompt.Count == 0)
            throw new ArgumentException(
                $"{where} has an empty prompt: a causal LM scores a completion's first token from the token before it, so that token would be lost. Start the prompt with BOS or a template token.",
                nameof(example));
        if (example.Chosen.Count == 0)
            throw new ArgumentException($"{where} has an empty chosen completion: there is nothing to score.", nameof(example));
        if (example.Rejected.Count == 0)
            throw new ArgumentException($"{where} has an empty rejected completion: there is nothing to score.", nameof(example));
        foreach (var (tokens, part) in new[] { (example.Prompt, "prompt"), (example.Chosen, "chosen completion"), (example.Rejected, "rejected completion") })
            for (int t = 0; t < tokens.Count; t++)
            {
                if (tokens[t] < 0)
                    throw new ArgumentException($"{where}: its {part} has a negative token id ({tokens[t]}) at position {t}; token ids are >= 0.", nameof(example));
                if (tokens[t] == Options.IgnoreIndex)
                    throw new ArgumentException(
                        $"{where}: its {part} has token id {tokens[t]} at position {t}, which equals IgnoreIndex, so its label would be dropped silently. Choose an IgnoreIndex outside the vocabulary (TRL's -100).",
                        nameof(example));
            }
        var prompt = example.Prompt.ToArray();
        if (Options.MaxPromptLength is { } maxPrompt && prompt.Length > maxPrompt)
            prompt = Options.PromptTruncation == PromptTruncation.KeepEnd ? prompt[^maxPrompt..] : prompt[..maxPrompt];
        int room = int.MaxValue;
        if (Options.MaxLength is { } max)
        {
            room = max - prompt.Length;
            if (room < 1)
                throw new ArgumentException(
                    $"{where}: its prompt ({prompt.Length} tokens{(Options.MaxPromptLength is null ? "" : " after MaxPromptLength")}) leaves no room for a completion under MaxLength {max}. " +
                    "Set MaxPromptLength below MaxLength, or drop the example.", nameof(example));
        }
        if (Options.MaxCompletionLength is { } maxCompletion) room = Math.Min(room, maxCompletion);
        int[] Cut(IReadOnlyList<int> completion) => completion.Count > room ? completion.Take(room).ToArray() : completion.ToArray();
        var chosen = Cut(example.Chosen);
        var rejected = Cut(example.Rejected);
        return new TruncatedExample(prompt, chosen, rejected, Key(prompt, chosen, rejected));
    }

    /// <summary>A right-padded batch [2B, T]: rows 0..B-1 prompt + chosen, rows B..2B-1 prompt + rejected.</summary>
    /// <param name="examples">The B examples (at least one).</param>
    /// <param name="device">Where the tensors go (default CPU).</param>
    public CollatedPreferences Collate(IReadOnlyList<PreferenceExample> examples, Device? device = null)
    {
        var truncated = TruncateAll(examples);
        var rows = Rows(truncated);
        long length = rows.Max(r => (long)r.Prompt.Length + r.Completion.Length);
        length = RoundUp(length);
        int n = rows.Count;
        CheckSize(n, length);
        var ids = new long[n * length];
        var attention = new bool[n * length];
        var completion = new bool[n * length];
        var promptMask = new bool[n * length];
        var labels = new long[n * length];
        var sequenceLabels = new long[n * length];
        Array.Fill(ids, Options.PadTokenId);
        Array.Fill(labels, Options.IgnoreIndex);
        Array.Fill(sequenceLabels, Options.IgnoreIndex);
        for (int i = 0; i < n; i++)
            Fill(rows[i], i * length, ids, attention, promptMask, completion, labels, sequenceLabels);
        var positions = new long[n * length];
        for (int i = 0; i < n; i++)
            for (long t = 0; t < length; t++) positions[i * length + t] = t;
        return Build(truncated, device, new[] { (long)n, length }, ids, attention, promptMask, completion, labels, sequenceLabels, positions, null);
    }

    /// <summary>
    /// KTO's mismatched (prompt, completion) pairs for its reference point z0, built as TRL's KTOTrainer builds them: the
    /// batch's 2B sequences read as 2B unpaired examples (B chosen, then B rejected, as <see cref="Collate"/> lays them out),
    /// and each one's completion replaced by the previous example's, cyclically (TRL rotates the completions by one within
    /// the batch: (x_1, y_n), (x_2, y_1), ..., (x_n, y_(n-1))), so the mismatched completions are the batch's own.
    /// </summary>
    /// <remarks>
    /// Returned as pairs so that <see cref="Collate"/> (or <see cref="CollateMismatched"/>) lays them out like the batch:
    /// example i holds prompt i with the completions of sequences i - 1 and B + i - 1. Score all 2B rows under the policy
    /// (no gradient is needed: z0 is detached) and the reference, and pass their sums as
    /// <see cref="MismatchedLogps"/> (K = 2B) in <see cref="PreferenceBatch.Mismatched"/>.
    /// </remarks>
    /// <param name="examples">The batch's B examples (at least one).</param>
    /// <returns>B examples whose chosen and rejected completions are the mismatched ones.</returns>
    public static IReadOnlyList<PreferenceExample> MismatchedExamples(IReadOnlyList<PreferenceExample> examples)
    {
        ArgumentNullException.ThrowIfNull(examples);
        if (examples.Count == 0)
            throw new ArgumentException("examples is empty: a batch needs at least one example.", nameof(examples));
        for (int i = 0; i < examples.Count; i++)
            if (examples[i] is null) throw new ArgumentException($"example {i} is null.", nameof(examples));
        int b = examples.Count;
        // sequence k of the 2B: the chosen completions, then the rejected ones
        IReadOnlyList<int> Completion(int k) => k < b ? examples[k].Chosen : examples[k - b].Rejected;
        return examples.Select((e, i) => e with { Chosen = Completion((i - 1 + 2 * b) % (2 * b)), Rejected = Completion(b + i - 1) }).ToList();
    }

    /// <summary>
    /// <see cref="Collate"/> of <see cref="MismatchedExamples"/>: KTO's mismatched sequences, laid out like the batch (2B rows).
    /// </summary>
    public CollatedPreferences CollateMismatched(IReadOnlyList<PreferenceExample> examples, Device? device = null) =>
        Collate(MismatchedExamples(examples), device);

    /// <summary>
    /// A packed, padding-free batch [1, Total]: the 2B sequences (B chosen, then B rejected, each prompt + completion) end
    /// to end, with <see cref="CollatedPreferences.Boundaries"/> and position ids restarting at 0 in each sequence.
    /// </summary>
    public CollatedPreferences CollatePacked(IReadOnlyList<PreferenceExample> examples, Device? device = null)
    {
        var truncated = TruncateAll(examples);
        var rows = Rows(truncated);
        var lengths = rows.Select(r => (long)r.Prompt.Length + r.Completion.Length).ToArray();
        var boundaries = SequenceBoundaries.FromLengths(lengths);
        long total = RoundUp(boundaries.TotalTokens);
        CheckSize(1, total);
        var ids = new long[total];
        var attention = new bool[total];
        var completion = new bool[total];
        var promptMask = new bool[total];
        var labels = new long[total];
        var sequenceLabels = new long[total];
        Array.Fill(ids, Options.PadTokenId);
        Array.Fill(labels, Options.IgnoreIndex);
        Array.Fill(sequenceLabels, Options.IgnoreIndex);
        for (int i = 0; i < rows.Count; i++)
            Fill(rows[i], boundaries.CumulativeLengths[i], ids, attention, promptMask, completion, labels, sequenceLabels);
        using var positionIds = boundaries.PositionIds(total);
        var positions = positionIds.data<long>().ToArray();
        return Build(truncated, device, new[] { 1L, total }, ids, attention, promptMask, completion, labels, sequenceLabels, positions, boundaries);
    }

    private long RoundUp(long length) => Options.PadToMultipleOf is { } m ? (length + m - 1) / m * m : length;

    /// <summary>The [rows, length] batch must fit the arrays .NET allocates (at most int.MaxValue elements).</summary>
    private void CheckSize(long rows, long length)
    {
        if (length > Array.MaxLength / rows)
            throw new ArgumentException(
                $"The collated batch would be {rows} x {length} tokens{(Options.PadToMultipleOf is { } m ? $" (PadToMultipleOf = {m})" : "")}, more than an array holds ({Array.MaxLength:N0} elements). " +
                "Lower PadToMultipleOf or the batch's lengths.", Options.PadToMultipleOf is null ? "examples" : nameof(PreferenceCollatorOptions.PadToMultipleOf));
    }

    private List<TruncatedExample> TruncateAll(IReadOnlyList<PreferenceExample> examples)
    {
        ArgumentNullException.ThrowIfNull(examples);
        if (examples.Count == 0)
            throw new ArgumentException("examples is empty: a batch needs at least one example.", nameof(examples));
        return examples.Select((e, i) => Truncate(e ?? throw new ArgumentException($"example {i} is null.", nameof(examples)), i)).ToList();
    }

    private static List<(int[] Prompt, int[] Completion)> Rows(List<TruncatedExample> truncated) =>
        truncated.Select(e => (e.Prompt, e.Chosen)).Concat(truncated.Select(e => (e.Prompt, e.Rejected))).ToList();

    private static void Fill((int[] Prompt, int[] Completion) row, long start, long[] ids, bool[] attention, bool[] promptMask, bool[] completion,
        long[] labels, long[] sequenceLabels)
    {
        long p = start;
        foreach (var id in row.Prompt) { ids[p] = id; attention[p] = true; promptMask[p] = true; sequenceLabels[p] = id; p++; }
        foreach (var id in row.Completion) { ids[p] = id; attention[p] = true; completion[p] = true; labels[p] = id; sequenceLabels[p] = id; p++; }
    }

    private static CollatedPreferences Build(List<TruncatedExample> truncated, Device? device, long[] shape, long[] ids, bool[] attention,
        bool[] promptMask, bool[] completion, long[] labels, long[] sequenceLabels, long[] positions, SequenceBoundaries? boundaries)
    {
        var target = device ?? CPU;
        Tensor Make(long[] data) => Numerics.FromHost(data, shape, ScalarType.Int64, target);
        Tensor MakeMask(bool[] data) => Numerics.FromHost(data, shape, ScalarType.Bool, target);
        return new CollatedPreferences(truncated, Make(ids), MakeMask(attention), MakeMask(promptMask), MakeMask(completion), Make(labels),
            Make(sequenceLabels), Make(positions), boundaries);
    }

    /// <summary>The content key of a truncated example: the first 16 bytes of SHA-256 over the three id lists, in hex.</summary>
    internal static string Key(int[] prompt, int[] chosen, int[] rejected)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var part in new[] { prompt, chosen, rejected })
        {
            sha.AppendData(BitConverter.GetBytes(part.Length));
            sha.AppendData(System.Runtime.InteropServices.MemoryMarshal.AsBytes(part.AsSpan()));
        }
        return Convert.ToHexString(sha.GetHashAndReset(), 0, 16);
    }
}

/// <summary>
/// A collated preference batch (from <see cref="PreferenceCollator"/>). Rows (or, packed, sequences) 0..B-1 are prompt +
/// chosen, B..2B-1 prompt + rejected. Owns its tensors: dispose it (or its dispose scope) when done.
/// </summary>
public sealed class CollatedPreferences : IDisposable
{
    private readonly Tensor[] _owned;

    internal CollatedPreferences(IReadOnlyList<TruncatedExample> examples, Tensor inputIds, Tensor attentionMask, Tensor promptMask,
        Tensor completionMask, Tensor labels, Tensor sequenceLabels, Tensor positionIds, SequenceBoundaries? boundaries)
    {
        Examples = examples;
        InputIds = inputIds;
        AttentionMask = attentionMask;
        PromptMask = promptMask;
        CompletionMask = completionMask;
        Labels = labels;
        SequenceLabels = sequenceLabels;
        PositionIds = positionIds;
        Boundaries = boundaries;
        _owned = new[] { inputIds, attentionMask, promptMask, completionMask, labels, sequenceLabels, positionIds };
    }

    /// <summary>The B examples as truncated, with their cache keys.</summary>
    public IReadOnlyList<TruncatedExample> Examples { get; }

    /// <summary>Number of pairs B.</summary>
    public int PairCount => Examples.Count;

    /// <summary>[2B, T] int64 token ids (padded), or [1, Total] (packed).</summary>
    public Tensor InputIds { get; }

    /// <summary>Bool, true at real tokens (prompt and completion), false at padding.</summary>
    public Tensor AttentionMask { get; }

    /// <summary>Bool, true at prompt tokens: for mean-pooled prompt embeddings (<see cref="PromptEmbeddings.MeanPooled"/>).</summary>
    public Tensor PromptMask { get; }

    /// <summary>Bool, true at completion tokens: the tokens whose log-probs count.</summary>
    public Tensor CompletionMask { get; }

    /// <summary>int64, the input ids at completion tokens and the ignore index elsewhere: pass with <see cref="LabelAlignment.ShiftByOne"/>.</summary>
    public Tensor Labels { get; }

    /// <summary>
    /// int64, the input ids at every real token (prompt and completion) and the ignore index at padding: TRL ORPOTrainer's NLL
    /// labels. Score them (with <see cref="LabelAlignment.ShiftByOne"/>) when a loss needs the prompt's log-probs too, then
    /// split the result with <see cref="SequenceLogProbsResult.Within"/> (<see cref="CompletionMask"/>, <see cref="PromptMask"/>).
    /// </summary>
    public Tensor SequenceLabels { get; }

    /// <summary>int64 position ids: 0..T-1 per padded row, or restarting at 0 in each packed sequence.</summary>
    public Tensor PositionIds { get; }

    /// <summary>The sequence boundaries of a packed batch (null when padded).</summary>
    public SequenceBoundaries? Boundaries { get; }

    /// <summary>True for a packed batch.</summary>
    public bool IsPacked => Boundaries is not null;

    /// <summary>Disposes the tensors.</summary>
    public void Dispose()
    {
        foreach (var t in _owned) t.Dispose();
    }
}
