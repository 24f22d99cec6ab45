using System.Diagnostics;
using Alignment.Losses.Internal;

namespace Alignment.Losses;

/// <summary>
/// Why a backward pass of the library failed. libtorch offers a custom backward no way to raise an error, so a failing
/// pass returns empty gradients and <c>loss.backward()</c> throws an exception saying that a function "returned an
/// invalid gradient ... got [0]"; the real cause (for example running out of memory) is kept here and traced.
/// </summary>
public static class BackwardFailures
{
    private static Exception? _last;

    /// <summary>The most recent backward failure of a library function (any thread), or null.</summary>
    public static Exception? Last => Volatile.Read(ref _last);

    /// <summary>Forgets <see cref="Last"/>.</summary>
    public static void Clear() => Volatile.Write(ref _last, null);

    internal static void Record(string function, Exception e)
    {
        Exception failure = Native.IsAllocationFailure(e)
            ? Native.OutOfMemory($"The backward pass of {function}", "see the forward call's inputs", e)
            : new InvalidOperationException($"The backward pass of {function} failed: {e.Message}", e);
        Volatile.Write(ref _last, failure);
        Trace.TraceError("Alignment.Losses: " + failure.Message);
    }
}
