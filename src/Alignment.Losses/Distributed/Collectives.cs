using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// The few collective operations the library needs to make batch-coupled statistics those of the global batch (spec
/// §14): the rank and world size, an element-wise sum of a small vector over ranks, and an all-gather of small
/// vectors. Implement it over your engine; <see cref="Collectives.SingleProcess"/> is the default (nothing changes on one
/// device), <see cref="Collectives.InProcess"/> simulates R ranks on R threads, and the <c>Alignment.Losses.Mpi</c>
/// package runs it over MPI.
/// </summary>
/// <remarks>
/// Every rank must make the same calls in the same order (they are collective). The library only exchanges counts,
/// sums and per-completion scalars (rewards, group ids): a few numbers per sequence, never tensors of activations.
/// </remarks>
public interface ICollectives
{
    /// <summary>This process's rank, 0 .. <see cref="WorldSize"/> - 1.</summary>
    int Rank { get; }

    /// <summary>The number of ranks.</summary>
    int WorldSize { get; }

    /// <summary>The element-wise sum of <paramref name="values"/> over all ranks (every rank passes the same length and gets the sum).</summary>
    double[] AllReduceSum(double[] values);

    /// <summary>Every rank's <paramref name="values"/> in rank order (lengths may differ between ranks).</summary>
    double[][] AllGather(double[] values);
}

/// <summary>The built-in <see cref="ICollectives"/> and the operations built on them.</summary>
public static class Collectives
{
    /// <summary>One process, one rank: the sums and gathers of a world of one.</summary>
    public static ICollectives SingleProcess { get; } = new Single();

    /// <summary>
    /// <paramref name="worldSize"/> ranks inside this process, one per thread (each thread uses its element): for tests,
    /// and for trying a data-parallel setup without launching processes. A collective that does not complete within
    /// <paramref name="timeout"/> (a rank failed, or the ranks called collectives in different orders) throws
    /// <see cref="TimeoutException"/> on the ranks that waited, instead of hanging.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="worldSize"/> is below 1.</exception>
    public static ICollectives[] InProcess(int worldSize, TimeSpan? timeout = null)
    {
        if (worldSize < 1) throw new ArgumentOutOfRangeException(nameof(worldSize), worldSize, "worldSize must be >= 1.");
        var group = new InProcessGroup(worldSize, timeout ?? TimeSpan.FromSeconds(60));
        return Enumerable.Range(0, worldSize).Select(r => (ICollectives)new InProcessRank(group, r)).ToArray();
    }

    /// <summary>
    /// Averages the parameters' gradients over the ranks (sum, then divide by the world size), in place: the data-parallel
    /// step an engine without DDP needs after backward. Parameters without a gradient count as zeros and stay without one
    /// only if every rank has none. One all-reduce of every gradient, through the host (for small models and tests).
    /// </summary>
    public static void AverageGradients(this ICollectives collectives, IEnumerable<Tensor> parameters)
    {
        ArgumentNullException.ThrowIfNull(collectives);
        ArgumentNullException.ThrowIfNull(parameters);
        var list = parameters.ToList();
        if (collectives.WorldSize == 1) return;
        using var scope = NewDisposeScope();
        var sizes = list.Select(p => p.numel()).ToArray();
        var flat = new double[sizes.Sum() + list.Count];
        long at = 0;
        for (int i = 0; i < list.Count; i++)
        {
            var g = list[i].grad;
            if (g is not null)
            {
                using var host = g.detach().to(ScalarType.Float64, CPU).contiguous();
                host.data<double>().ToArray().CopyTo(flat, at);
                flat[flat.Length - list.Count + i] = 1;                  // "has a gradient" flag
            }
            at += sizes[i];
        }
        var sum = collectives.AllReduceSum(flat);
        at = 0;
        using var noGrad = no_grad();
        for (int i = 0; i < list.Count; i++)
        {
            var p = list[i];
            bool any = sum[flat.Length - list.Count + i] > 0;
            if (any)
            {
                var mean = new double[sizes[i]];
                for (long k = 0; k < sizes[i]; k++) mean[k] = sum[at + k] / collectives.WorldSize;
                using var values = tensor(mean, p.shape, dtype: ScalarType.Float64).to(p.dtype, p.device);
                if (p.grad is { } g) g.copy_(values);
                else p.grad = values.clone().DetachFromDisposeScope();
            }
            at += sizes[i];
        }
    }

    /// <summary>This rank's rows of a gathered vector: the offset of its part and its length.</summary>
    internal static (int Offset, int Length, double[] All) Concatenate(double[][] parts, int rank)
    {
        int offset = parts.Take(rank).Sum(p => p.Length);
        return (offset, parts[rank].Length, parts.SelectMany(p => p).ToArray());
    }

    private sealed class Single : ICollectives
    {
        public int Rank => 0;
        public int WorldSize => 1;
        public double[] AllReduceSum(double[] values) => (double[])(values ?? throw new ArgumentNullException(nameof(values))).Clone();
        public double[][] AllGather(double[] values) => new[] { (double[])(values ?? throw new ArgumentNullException(nameof(values))).Clone() };
        public override string ToString() => "single process";
    }

    /// <summary>The shared state of in-process ranks: one slot per rank and a barrier per exchange.</summary>
    /// <remarks>The barrier lives as long as the ranks (it holds no native resource once no thread waits on it).</remarks>
    [System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "shared by the ranks for their lifetime; no wait handle is allocated unless a rank blocks")]
    private sealed class InProcessGroup(int world, TimeSpan timeout)
    {
        private readonly Barrier _barrier = new(world);
        private readonly double[][] _slots = new double[world][];
        public int World => world;

        public double[][] Exchange(int rank, double[] values)
        {
            ArgumentNullException.ThrowIfNull(values);
            _slots[rank] = (double[])values.Clone();
            Wait(rank);
            var all = _slots.Select(s => (double[])s.Clone()).ToArray();
            Wait(rank);                                                  // nobody overwrites a slot before everyone has read it
            return all;
        }

        private void Wait(int rank)
        {
            if (!_barrier.SignalAndWait(timeout))
                throw new TimeoutException(
                    $"in-process rank {rank} of {world} waited {timeout.TotalSeconds:G3} s for the other ranks at a collective: a rank failed or stopped, " +
                    "or the ranks called collectives in different orders.");
        }
    }

    private sealed class InProcessRank(InProcessGroup group, int rank) : ICollectives
    {
        public int Rank => rank;
        public int WorldSize => group.World;

        public double[] AllReduceSum(double[] values)
        {
            var all = group.Exchange(rank, values);
            if (all.Any(a => a.Length != values.Length))
                throw new ArgumentException($"AllReduceSum needs the same length on every rank; got {string.Join(", ", all.Select(a => a.Length))}.", nameof(values));
            var sum = new double[values.Length];
            foreach (var a in all)                                        // rank order on every rank: bitwise-identical sums
                for (int i = 0; i < sum.Length; i++) sum[i] += a[i];
            return sum;
        }

        public double[][] AllGather(double[] values) => group.Exchange(rank, values);

        public override string ToString() => $"in-process rank {rank} of {group.World}";
    }
}
