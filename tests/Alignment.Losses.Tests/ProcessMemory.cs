using System.Diagnostics;

namespace Alignment.Losses.Tests;

/// <summary>Process memory from /proc/self/status: current RSS, the peak (VmHWM) and its reset (clear_refs).</summary>
public static class ProcessMemory
{
    /// <summary>Current RSS after a full managed collection (the working set where /proc is missing).</summary>
    public static long Rss()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        return Status("VmRSS:") ?? Process.GetCurrentProcess().WorkingSet64;
    }

    /// <summary>Peak RSS since the last <see cref="ResetPeak"/>.</summary>
    public static long PeakRss() => Status("VmHWM:") ?? throw new InvalidOperationException("no VmHWM in /proc/self/status");

    /// <summary>Resets the peak to the current RSS (tests that use it are <see cref="PeakMemoryFactAttribute"/>s).</summary>
    public static void ResetPeak() => File.WriteAllText("/proc/self/clear_refs", "5");

    /// <summary>Whether the peak can be reset here (/proc/self/clear_refs writable).</summary>
    public static bool CanResetPeak()
    {
        try { ResetPeak(); return Status("VmHWM:") is not null; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return false; }
    }

    static long? Status(string key)
    {
        if (!File.Exists("/proc/self/status")) return null;
        var line = File.ReadLines("/proc/self/status").FirstOrDefault(l => l.StartsWith(key, StringComparison.Ordinal));
        return line is null ? null : long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) * 1024;
    }
}

/// <summary>A test that measures peak RSS: skipped, with the reason shown, where /proc/self/clear_refs cannot reset the peak.</summary>
public sealed class PeakMemoryFactAttribute : FactAttribute
{
    public PeakMemoryFactAttribute()
    {
        if (!Available.Value)
            Skip = "Peak RSS cannot be measured here: /proc/self/clear_refs is not writable (or /proc/self/status has no VmHWM).";
    }

    static readonly Lazy<bool> Available = new(ProcessMemory.CanResetPeak);
}
