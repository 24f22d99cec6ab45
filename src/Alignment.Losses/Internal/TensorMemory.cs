using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// Direct access to a CPU tensor's memory for the library's managed kernels (<see cref="FusedMarginPass"/>, <see cref="FusedPolicyPass"/>,
/// <see cref="LogSoftmaxRows"/>): the address of its first element, and a hint that a large fresh buffer be backed by huge
/// pages.
/// </summary>
internal static unsafe class TensorMemory
{
    private static readonly delegate* unmanaged<IntPtr, IntPtr> StorageData = Resolve();

    private static delegate* unmanaged<IntPtr, IntPtr> Resolve()
    {
        var lib = NativeLibrary.Load("LibTorchSharp", typeof(torch).Assembly, null);
        return (delegate* unmanaged<IntPtr, IntPtr>)NativeLibrary.GetExport(lib, "THSStorage_data_ptr");
    }

    /// <summary>The address of the first element of a CPU tensor (its storage plus its offset); no handle is created.</summary>
    internal static void* Address(Tensor t) => (void*)(StorageData(t.Handle) + (nint)(t.storage_offset() * t.ElementSize));

    /// <summary>A new [n] CPU tensor of <paramref name="dtype"/> (float32 or float64) holding <paramref name="values"/>.</summary>
    internal static Tensor FromValues(ReadOnlySpan<double> values, ScalarType dtype)
    {
        var t = empty(values.Length, dtype: dtype);
        if (dtype == ScalarType.Float64) values.CopyTo(new Span<double>(Address(t), values.Length));
        else
        {
            var f = new Span<float>(Address(t), values.Length);
            for (int i = 0; i < values.Length; i++) f[i] = (float)values[i];
        }
        return t;
    }

    private const int MadvHugePage = 14;        // MADV_HUGEPAGE (Linux)
    private const long HugePage = 2L << 20;

    [DllImport("libc", EntryPoint = "madvise", SetLastError = false)]
    private static extern int Madvise(nint address, nuint length, int advice);

    private static bool _unavailable;

    /// <summary>
    /// Asks Linux to back the whole 2 MiB pages inside [address, address + bytes) with transparent huge pages when they are
    /// first touched (MADV_HUGEPAGE). Call it on a fresh buffer before writing it: writing fresh memory costs a page fault
    /// per 4 KiB page otherwise, which makes the write several times slower than the memory's bandwidth. A hint only:
    /// without huge-page support, or on another OS, nothing happens.
    /// </summary>
    internal static void AdviseHugePages(void* address, long bytes)
    {
        if (_unavailable || bytes < 2 * HugePage || !OperatingSystem.IsLinux()) return;
        long start = ((long)address + HugePage - 1) & ~(HugePage - 1), end = ((long)address + bytes) & ~(HugePage - 1);
        if (end <= start) return;
        try
        {
            if (Madvise((nint)start, (nuint)(end - start), MadvHugePage) != 0) _unavailable = true;   // no THP in this kernel: stop asking
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            _unavailable = true;
        }
    }
}
