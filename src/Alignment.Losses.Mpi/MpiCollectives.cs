using System.Runtime.InteropServices;
using MPI;

namespace Alignment.Losses.Mpi;

/// <summary>
/// <see cref="ICollectives"/> over MPI (MPI.NET): the ranks of <c>MPI_COMM_WORLD</c>. MPICH on Linux
/// (<c>apt-get install mpich</c>; launch with <c>mpiexec.mpich -n 4 dotnet app.dll</c>), MS-MPI on Windows
/// (<c>mpiexec -n 4 app.exe</c>). Create one per process, before the first collective, and dispose it at the end
/// (that finalises MPI).
/// </summary>
/// <remarks>
/// <para>MPI.NET's native calls name MS-MPI's <c>msmpi</c>; on Linux they are redirected to MPICH's <c>libmpich.so.12</c>,
/// which keeps the same ABI (integer handles). Open MPI's ABI differs (pointer handles) and does not work with MPI.NET:
/// if both are installed, launch with <c>mpiexec.mpich</c>.</para>
/// <para>A rank that dies makes MPI's launcher end the whole job (hydra reports "BAD TERMINATION"); a collective never
/// returns on a live rank whose peer stopped calling collectives, so keep every rank's sequence of calls identical.</para>
/// </remarks>
public sealed class MpiCollectives : ICollectives, IDisposable
{
    private static readonly object Gate = new();
    private static bool _resolverSet;
    private readonly MPI.Environment _environment;
    private readonly Intracommunicator _world;
    private bool _disposed;

    /// <summary>Initialises MPI (MPI_Init) and takes the world communicator.</summary>
    /// <param name="args">The program's arguments (MPI may remove its own); null: none.</param>
    /// <exception cref="DllNotFoundException">No MPI runtime is installed (install MPICH, or MS-MPI on Windows).</exception>
    public MpiCollectives(string[]? args = null)
    {
        UseMpichOnLinux();
        var a = args ?? Array.Empty<string>();
        try
        {
            _environment = new MPI.Environment(ref a);
        }
        catch (DllNotFoundException e)
        {
            throw new DllNotFoundException(
                (RuntimeInformation.IsOSPlatform(OSPlatform.Windows)
                    ? "MS-MPI's msmpi.dll was not found: install the MS-MPI runtime."
                    : "MPICH's libmpich.so.12 was not found: install MPICH (Debian/Ubuntu: apt-get install mpich).") + " " + e.Message, e);
        }
        _world = Communicator.world;
    }

    /// <summary>Whether this process was started by an MPI launcher (mpiexec), judged by the environment it sets.</summary>
    public static bool LaunchedByMpiexec => LauncherVariables.Any(v => System.Environment.GetEnvironmentVariable(v) is not null);

    private static readonly string[] LauncherVariables = { "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_SIZE" };

    /// <inheritdoc />
    public int Rank => Alive()._world.Rank;

    /// <inheritdoc />
    public int WorldSize => Alive()._world.Size;

    /// <inheritdoc />
    public double[] AllReduceSum(double[] values)
    {
        ArgumentNullException.ThrowIfNull(values);
        var lengths = Alive()._world.Allgather(values.Length);
        if (lengths.Any(l => l != values.Length))
            throw new ArgumentException($"AllReduceSum needs the same length on every rank; got {string.Join(", ", lengths)}.", nameof(values));
        return values.Length == 0 ? Array.Empty<double>() : _world.Allreduce(values, Operation<double>.Add);
    }

    /// <inheritdoc />
    public double[][] AllGather(double[] values)
    {
        ArgumentNullException.ThrowIfNull(values);
        var counts = Alive()._world.Allgather(values.Length);
        var flat = counts.Sum() == 0 ? Array.Empty<double>() : _world.AllgatherFlattened(values, counts);
        var parts = new double[counts.Length][];
        for (int r = 0, at = 0; r < counts.Length; at += counts[r], r++) parts[r] = flat.AsSpan(at, counts[r]).ToArray();
        return parts;
    }

    /// <summary>Throws a clear error when the job was launched with another number of ranks than the program expects.</summary>
    /// <exception cref="InvalidOperationException">The world size differs from <paramref name="expected"/>.</exception>
    public void RequireWorldSize(int expected)
    {
        if (WorldSize != expected)
            throw new InvalidOperationException(
                $"This job runs on {WorldSize} MPI rank(s) but expects {expected}: launch it with mpiexec -n {expected} (or change the expected size).");
    }

    /// <summary>Finalises MPI (MPI_Finalize). No collective may follow.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _environment.Dispose();
    }

    /// <inheritdoc />
    public override string ToString() => _disposed ? "MPI (finalised)" : $"MPI rank {Rank} of {WorldSize}";

    private MpiCollectives Alive() => _disposed ? throw new ObjectDisposedException(nameof(MpiCollectives), "MPI has been finalised (Dispose).") : this;

    private static void UseMpichOnLinux()
    {
        lock (Gate)
        {
            if (_resolverSet || RuntimeInformation.IsOSPlatform(OSPlatform.Windows)) return;
            NativeLibrary.SetDllImportResolver(typeof(MPI.Environment).Assembly, (name, assembly, path) =>
                name.Contains("msmpi", StringComparison.OrdinalIgnoreCase) && NativeLibrary.TryLoad("libmpich.so.12", out var handle) ? handle : IntPtr.Zero);
            _resolverSet = true;
        }
    }
}
