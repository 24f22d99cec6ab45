using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Which completions answer the same prompt (a group, for the group-relative advantage estimators): contiguous groups
/// of G (TRL's layout: num_generations completions per prompt, one after the other) or an id per completion (verl's uid).
/// </summary>
public sealed class GroupIds
{
    private readonly int _size;
    private readonly long[]? _ids;

    private GroupIds(int size, long[]? ids) => (_size, _ids) = (size, ids);

    /// <summary>Rows 0..G-1 are group 0, G..2G-1 group 1, and so on (the batch size must be a multiple of G).</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="groupSize"/> is below 1.</exception>
    public static GroupIds Contiguous(int groupSize) => groupSize >= 1
        ? new GroupIds(groupSize, null)
        : throw new ArgumentOutOfRangeException(nameof(groupSize), groupSize, "the group size (num_generations) must be >= 1.");

    /// <summary>One id per completion; equal ids form a group (any order, any group sizes).</summary>
    public static GroupIds FromIds(IReadOnlyList<long> ids)
    {
        ArgumentNullException.ThrowIfNull(ids);
        return new GroupIds(0, ids.ToArray());
    }

    /// <summary>One integer id per completion, from a 1-D integer tensor on any device.</summary>
    public static GroupIds FromTensor(Tensor ids)
    {
        Guard.Usable(ids, nameof(ids));
        if (ids.dim() != 1 || ids.is_floating_point() || ids.is_complex() || ids.dtype == ScalarType.Bool)
            throw new ArgumentException($"ids must be a 1-D integer tensor (one group id per completion); got {ids.dtype} {Guard.Shape(ids)}.", nameof(ids));
        using var host = ids.to(ScalarType.Int64, CPU);
        return new GroupIds(0, host.data<long>().ToArray());
    }

    /// <summary>The ids (null for contiguous groups).</summary>
    internal long[]? Ids => _ids;

    /// <summary>The group size of contiguous groups (0 for ids).</summary>
    internal int Size => _size;

    /// <summary>The group index (0..groups-1) of each of <paramref name="n"/> completions, and the number of groups.</summary>
    internal (int[] Group, int Count) Resolve(long n, string name)
    {
        var group = new int[n];
        if (_ids is null)
        {
            if (n % _size != 0)
                throw new ArgumentException(
                    $"{name} has {n} completions, which is not a multiple of the group size {_size} (num_generations): every prompt needs its {_size} completions.", name);
            for (long i = 0; i < n; i++) group[i] = (int)(i / _size);
            return (group, (int)(n / _size));
        }
        if (_ids.Length != n)
            throw new ArgumentException($"the group ids hold {_ids.Length} entries but {name} has {n} completions; give one id per completion.", "groups");
        var index = new Dictionary<long, int>();
        for (long i = 0; i < n; i++)
        {
            if (!index.TryGetValue(_ids[i], out var g)) index[_ids[i]] = g = index.Count;
            group[i] = g;
        }
        return (group, index.Count);
    }

    /// <inheritdoc />
    public override string ToString() => _ids is null ? $"contiguous groups of {_size}" : $"{_ids.Length} ids";
}
