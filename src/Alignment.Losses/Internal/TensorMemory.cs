using System.Runtime.Intrinsics;
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

    /// <summary>
    /// The values of a 1-D CPU tensor as float64 into <paramref name="into"/> (its length): contiguous float32, float64,
    /// int64 and int32 memory is read in place (no handle); another dtype or layout through one converted copy.
    /// </summary>
    internal static void ReadDoubles(Tensor t, Span<double> into)
    {
        var dtype = t.dtype;
        if (dtype is ScalarType.Float32 or ScalarType.Float64 or ScalarType.Int64 or ScalarType.Int32 && t.is_contiguous())
        {
            Copy(t, dtype, into);                                // the memory as it is: no handle, no copy in libtorch
            return;
        }
        using var scope = NewDisposeScope();
        var x = t.detach().to_type(dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32).contiguous();
        Copy(x, x.dtype, into);
    }

    private static void Copy(Tensor x, ScalarType dtype, Span<double> into)
    {
        int n = into.Length;
        if (dtype == ScalarType.Float64)
            new ReadOnlySpan<double>(Address(x), n).CopyTo(into);
        else if (dtype == ScalarType.Int64)                      // token counts, as a collator gives them
        {
            var v = new ReadOnlySpan<long>(Address(x), n);
            for (int i = 0; i < n; i++) into[i] = v[i];
        }
        else if (dtype == ScalarType.Int32)
        {
            var v = new ReadOnlySpan<int>(Address(x), n);
            for (int i = 0; i < n; i++) into[i] = v[i];
        }
        else
        {
            var f = (float*)Address(x);
            int i = 0;
            if (Vector256.IsHardwareAccelerated)
                for (; i + 8 <= n; i += 8)                       // eight floats widened to two vectors of four doubles (exact)
                {
                    var v = Vector256.Load(f + i);
                    Vector256.WidenLower(v).CopyTo(into.Slice(i, 4));
                    Vector256.WidenUpper(v).CopyTo(into.Slice(i + 4, 4));
                }
            for (; i < n; i++) into[i] = f[i];
        }
    }

    /// <summary>Whether every given tensor (nulls aside) is a 1-D CPU tensor: what <see cref="ReadDoubles"/> reads.</summary>
    internal static bool HostVectors(params Tensor?[] tensors)
    {
        foreach (var t in tensors)
            if (t is not null && (t.device_type != DeviceType.CPU || t.dim() != 1)) return false;
        return true;
    }

    /// <summary>The values of a 1-D CPU tensor as float64, in a pooled array of at least its length (return it to the pool).</summary>
    internal static double[] RentDoubles(Tensor t)
    {
        var values = System.Buffers.ArrayPool<double>.Shared.Rent((int)t.shape[0]);
        ReadDoubles(t, values.AsSpan(0, (int)t.shape[0]));
        return values;
    }

    /// <summary>Whether a 1-D CPU tensor holds a value above <paramref name="limit"/> (NaN is not above anything).</summary>
    internal static bool AnyAbove(Tensor t, double limit)
    {
        int n = (int)t.shape[0];
        var values = RentDoubles(t);
        try
        {
            var span = values.AsSpan(0, n);
            var (v, above) = (Vector256.Create(limit), Vector256<double>.Zero);
            int i = 0;
            for (; i + 4 <= n; i += 4) above |= Vector256.GreaterThan(Vector256.Create(span.Slice(i, 4)), v);
            bool any = above != Vector256<double>.Zero;
            for (; i < n; i++) any |= span[i] > limit;
            return any;
        }
        finally
        {
            System.Buffers.ArrayPool<double>.Shared.Return(values);
        }
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
