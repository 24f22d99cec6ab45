using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// The sequence boundaries of a packed (padding-free) batch: S sequences laid end to end in one row of length Total,
/// described by their cumulative lengths cu_seqlens = [0, n_1, n_1 + n_2, ..., n_1 + ... + n_S] (the flash-attention
/// convention). Positions past the last boundary (padding to a multiple) belong to no sequence.
/// </summary>
/// <remarks>
/// Pass it to <see cref="SequenceLogProbs.Compute(Tensor, Tensor, Tensor?, SequenceBoundaries, LabelAlignment, SequenceLogProbsOptions?)"/>
/// or <see cref="FusedLinearLogProbs.Compute(Tensor, Tensor, Tensor?, Tensor, Tensor?, SequenceBoundaries, LabelAlignment, SequenceLogProbsOptions?)"/>:
/// each sequence's log-prob is then exactly the one its own padded row would give. With <see cref="LabelAlignment.ShiftByOne"/>
/// the logit at a sequence's last token (which would predict the next sequence's first token) is never scored. Your model
/// must not attend across boundaries either: restart positions with <see cref="PositionIds"/> and use a block-diagonal
/// attention mask (<see cref="CausalAttentionMask"/>) or a variable-length attention kernel.
/// </remarks>
public sealed class SequenceBoundaries
{
    private readonly long[] _cumulative;

    /// <summary>Boundaries from cumulative lengths [S + 1]: 0 first, strictly increasing (every sequence has at least one token).</summary>
    /// <exception cref="ArgumentException">The list is shorter than 2, does not start at 0, or is not strictly increasing.</exception>
    public SequenceBoundaries(IReadOnlyList<long> cumulativeLengths)
    {
        ArgumentNullException.ThrowIfNull(cumulativeLengths);
        if (cumulativeLengths.Count < 2)
            throw new ArgumentException($"cumulativeLengths must hold S + 1 >= 2 offsets (0, then the end of each sequence); got {cumulativeLengths.Count}.", nameof(cumulativeLengths));
        if (cumulativeLengths[0] != 0)
            throw new ArgumentException($"cumulativeLengths must start at 0; got {cumulativeLengths[0]}.", nameof(cumulativeLengths));
        for (int i = 1; i < cumulativeLengths.Count; i++)
            if (cumulativeLengths[i] <= cumulativeLengths[i - 1])
                throw new ArgumentException(
                    $"cumulativeLengths must be strictly increasing (every sequence has at least one token); offset {i} is {cumulativeLengths[i]} after {cumulativeLengths[i - 1]}.",
                    nameof(cumulativeLengths));
        _cumulative = cumulativeLengths.ToArray();
    }

    /// <summary>Boundaries from the sequences' lengths (each at least 1).</summary>
    public static SequenceBoundaries FromLengths(IEnumerable<long> lengths)
    {
        ArgumentNullException.ThrowIfNull(lengths);
        var offsets = new List<long> { 0 };
        foreach (var n in lengths)
        {
            if (n < 1) throw new ArgumentException($"every sequence length must be >= 1; sequence {offsets.Count - 1} has {n}.", nameof(lengths));
            offsets.Add(offsets[^1] + n);
        }
        return new SequenceBoundaries(offsets);
    }

    /// <summary>Boundaries from a cu_seqlens tensor [S + 1] (int32 or int64, any device).</summary>
    public static SequenceBoundaries FromTensor(Tensor cumulativeLengths)
    {
        Guard.Usable(cumulativeLengths, nameof(cumulativeLengths));
        if (cumulativeLengths.dim() != 1 || cumulativeLengths.dtype is not (ScalarType.Int32 or ScalarType.Int64))
            throw new ArgumentException($"cumulativeLengths must be a 1-D int32 or int64 tensor; got {cumulativeLengths.dtype} {Guard.Shape(cumulativeLengths)}.", nameof(cumulativeLengths));
        using var scope = NewDisposeScope();
        return new SequenceBoundaries(cumulativeLengths.to_type(ScalarType.Int64).cpu().data<long>().ToArray());
    }

    /// <summary>Number of sequences S.</summary>
    public int Count => _cumulative.Length - 1;

    /// <summary>Tokens covered by the sequences, cu_seqlens[S].</summary>
    public long TotalTokens => _cumulative[^1];

    /// <summary>The cumulative lengths [S + 1].</summary>
    public IReadOnlyList<long> CumulativeLengths => _cumulative;

    /// <summary>Length of sequence <paramref name="index"/>.</summary>
    public long Length(int index) => _cumulative[index + 1] - _cumulative[index];

    /// <summary>cu_seqlens as a tensor [S + 1] (int32 by default, as variable-length attention kernels take it).</summary>
    /// <exception cref="ArgumentException"><paramref name="dtype"/> is not Int32 or Int64, or Int32 cannot hold the total (2^31 tokens or more).</exception>
    public Tensor CumulativeLengthsTensor(Device? device = null, ScalarType dtype = ScalarType.Int32)
    {
        if (dtype is not (ScalarType.Int32 or ScalarType.Int64))
            throw new ArgumentException($"dtype must be Int32 or Int64; got {dtype}.", nameof(dtype));
        if (dtype == ScalarType.Int32 && TotalTokens > int.MaxValue)
            throw new ArgumentException($"{TotalTokens} packed tokens do not fit Int32 offsets; pass dtype: ScalarType.Int64.", nameof(dtype));
        return Numerics.FromHost(_cumulative, new[] { (long)_cumulative.Length }, dtype, device ?? CPU);
    }

    /// <summary>Position ids [1, <paramref name="total"/>] restarting at 0 in each sequence (positions past the last boundary continue the last one).</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="total"/> is below the packed tokens or above an array's length.</exception>
    public Tensor PositionIds(long? total = null, Device? device = null)
    {
        long length = CheckTotal(total);
        var ids = new long[length];
        for (int s = 0; s < Count; s++)
            for (long p = _cumulative[s]; p < Math.Min(_cumulative[s + 1], length); p++) ids[p] = p - _cumulative[s];
        for (long p = TotalTokens; p < length; p++) ids[p] = p - _cumulative[^2];
        return Numerics.FromHost(ids, new[] { 1L, length }, ScalarType.Int64, device ?? CPU);
    }

    /// <summary>
    /// A boolean causal, block-diagonal attention mask [<paramref name="total"/>, <paramref name="total"/>]: true where a query may
    /// attend to a key (same sequence, key not after query). Positions past the last boundary attend to themselves only.
    /// For small models; large ones use a variable-length attention kernel with <see cref="CumulativeLengthsTensor"/>.
    /// </summary>
    /// <exception cref="InsufficientMemoryException">The [total, total] mask does not fit (checked before allocating on the CPU).</exception>
    public Tensor CausalAttentionMask(long? total = null, Device? device = null)
    {
        long length = CheckTotal(total);
        // the mask and its temporaries (same, causal, padding): about four [total, total] bool tensors at the peak
        Native.EnsureCpuMemory(4 * length * length, device ?? CPU, "SequenceBoundaries.CausalAttentionMask", () => $"[{length}, {length}] bool");
        return Native.Run("SequenceBoundaries.CausalAttentionMask", () => $"[{length}, {length}] bool (several temporaries of that size)",
            () => CausalAttentionMaskCore(length, device));
    }

    /// <summary>The row length a caller asks for: at least the packed tokens, and a length an array can hold.</summary>
    private long CheckTotal(long? total)
    {
        long length = total ?? TotalTokens;
        if (length < TotalTokens || length > Array.MaxLength)
            throw new ArgumentOutOfRangeException(nameof(total), length,
                $"total must be between the packed tokens ({TotalTokens}) and {Array.MaxLength} (the row's padded length).");
        return length;
    }

    private Tensor CausalAttentionMaskCore(long length, Device? device)
    {
        using var scope = NewDisposeScope();
        var ids = SegmentIds(length, device ?? CPU);
        var same = ids.unsqueeze(1) == ids.unsqueeze(0);
        var causal = ones(length, length, dtype: ScalarType.Bool, device: device ?? CPU).tril();
        var padding = (ids == Count).unsqueeze(1) & eye(length, dtype: ScalarType.Bool, device: device ?? CPU).logical_not();
        return (same & causal & padding.logical_not()).MoveToOuterDisposeScope();
    }

    /// <summary>[total] the sequence index of each position; <see cref="Count"/> for positions past the last boundary.</summary>
    internal Tensor SegmentIds(long total, Device device)
    {
        var ids = new long[total];
        for (int s = 0; s < Count; s++)
            for (long p = _cumulative[s]; p < Math.Min(_cumulative[s + 1], total); p++) ids[p] = s;
        for (long p = TotalTokens; p < total; p++) ids[p] = Count;
        return Numerics.FromHost(ids, new[] { total }, ScalarType.Int64, device);
    }
}

/// <summary>
/// How the token grid [R, T'] of a log-prob pass maps to sequences: one sequence per row (padded batches), or the
/// sequences of a packed row (segment ids, with <see cref="Count"/> marking positions that belong to none).
/// </summary>
internal sealed class Segments
{
    private readonly Tensor? _ids;   // packed: [T'] segment of each scored position

    private Segments(long count, Tensor? ids)
    {
        Count = count;
        _ids = ids;
    }

    internal static Segments PerRow(long rows) => new(rows, null);

    internal static Segments Packed(long count, Tensor scoredIds) => new(count, scoredIds);

    /// <summary>Number of sequences.</summary>
    internal long Count { get; }

    /// <summary>The tensors this holds (a packed batch's segment ids), for the owner that releases them.</summary>
    internal IEnumerable<Tensor> Tensors => _ids is null ? Enumerable.Empty<Tensor>() : new[] { _ids };

    /// <summary>The same segments on a new handle (a second owner can release its own).</summary>
    internal Segments Alias() => _ids is null ? this : new Segments(Count, _ids.alias());

    internal bool IsPacked => _ids is not null;

    /// <summary>[R, T'] per-token values summed per sequence: [Count]. Differentiable.</summary>
    internal Tensor Reduce(Tensor perToken)
    {
        if (_ids is null) return perToken.sum(1);
        var flat = perToken.reshape(-1);
        return zeros(Count + 1, dtype: flat.dtype, device: flat.device).index_add(0, _ids, flat, 1).narrow(0, 0, Count);
    }

    /// <summary>[Count] per-sequence values spread over the grid: [R, T'] (0 at positions of no sequence).</summary>
    internal Tensor Expand(Tensor perSequence)
    {
        if (_ids is null) return perSequence.unsqueeze(1);
        var padded = cat(new[] { perSequence, zeros(1, dtype: perSequence.dtype, device: perSequence.device) }, 0);
        return padded.index_select(0, _ids).unsqueeze(0);
    }
}
