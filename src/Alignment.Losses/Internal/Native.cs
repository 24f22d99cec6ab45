using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// Allocation failures inside the library surface as <see cref="InsufficientMemoryException"/> naming the call and the
/// sizes involved, never as a process abort or a bare libtorch message.
/// </summary>
/// <remarks>
/// Two mechanisms. (1) Every public entry point runs its body through <see cref="Run{T}"/>, which turns libtorch's
/// allocation errors ("can't allocate memory", "CUDA out of memory") into that exception. This relies on the ops being
/// wrapped by TorchSharp's native error handler; <c>THSTensor_matmul</c> is not (an allocation failure inside it aborts
/// the process), so the library never calls <c>matmul</c>: it uses <c>mm</c>, <c>addmm</c> and <c>mv</c>, which are.
/// (2) On the CPU, Linux grants an allocation larger than the free memory and then kills the process when the pages are
/// touched, which no handler can catch; so before quadratic work (RPO's [M, N] matrices) <see cref="EnsureCpuMemory"/>
/// compares the estimate with the kernel's MemAvailable and throws first.
/// </remarks>
internal static class Native
{
    private const long CheckAbove = 1L << 30;   // smaller work is not worth reading /proc/meminfo for

    /// <summary>Runs <paramref name="body"/>; an allocation failure becomes an <see cref="InsufficientMemoryException"/>.</summary>
    internal static T Run<T>(string call, Func<string> sizes, Func<T> body)
    {
        BackwardLeftovers.Release();                            // the previous step's gradients on this thread
        try
        {
            return body();
        }
        catch (Exception e) when (IsAllocationFailure(e))
        {
            throw OutOfMemory(call, SafeDescribe(sizes), e);
        }
    }

    internal static bool IsAllocationFailure(Exception e) => e switch
    {
        InsufficientMemoryException => false,                // already ours: let it through unchanged
        OutOfMemoryException => true,
        ExternalException x => x.Message.Contains("can't allocate memory", StringComparison.OrdinalIgnoreCase)
                               || x.Message.Contains("out of memory", StringComparison.OrdinalIgnoreCase)
                               || x.Message.Contains("not enough memory", StringComparison.OrdinalIgnoreCase)
                               || x.Message.Contains("failed to allocate", StringComparison.OrdinalIgnoreCase),
        _ => false,
    };

    internal static InsufficientMemoryException OutOfMemory(string call, string sizes, Exception inner) =>
        new($"{call} ran out of memory ({sizes}): {FirstLine(inner.Message)} " +
            "Reduce the batch size (or the sequence length, or ChunkTokens), or use a device with more memory.", inner);

    /// <summary>
    /// Throws before quadratic CPU work whose estimated size exceeds the memory the kernel reports as available, where
    /// the allocation itself might succeed and the process be killed later.
    /// </summary>
    internal static void EnsureCpuMemory(long bytes, Device device, string call, Func<string> sizes)
    {
        if (device.type != DeviceType.CPU || bytes < CheckAbove) return;
        long? available = MemAvailable();
        if (available is null || bytes <= available) return;
        throw new InsufficientMemoryException(
            $"{call} needs about {GiB(bytes)} of working memory ({SafeDescribe(sizes)}) but only {GiB(available.Value)} is available. " +
            "Reduce the batch size, or use a device with more memory.");
    }

    internal static string GiB(long bytes) => $"{bytes / (double)(1L << 30):F1} GiB";

    /// <summary>"[8, 1024] float32 on cpu".</summary>
    internal static string Describe(Tensor? t) =>
        t is null ? "none" : t.IsInvalid ? "(disposed)" : $"{Guard.Shape(t)} {t.dtype} on {t.device}";

    private static string SafeDescribe(Func<string> sizes)
    {
        try { return sizes(); }
        catch (Exception e) when (e is ObjectDisposedException or ExternalException or InvalidOperationException) { return "sizes unavailable"; }
    }

    private static string FirstLine(string message)
    {
        var line = message.Split('\n')[0].Trim();
        return line.EndsWith('.') ? line : line + ".";
    }

    private static long? MemAvailable()
    {
        try
        {
            if (!File.Exists("/proc/meminfo")) return null;
            var line = File.ReadLines("/proc/meminfo").FirstOrDefault(l => l.StartsWith("MemAvailable:", StringComparison.Ordinal));
            return line is null ? null : long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], System.Globalization.CultureInfo.InvariantCulture) * 1024;
        }
        catch (IOException) { return null; }
        catch (UnauthorizedAccessException) { return null; }
    }
}
