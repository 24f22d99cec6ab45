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

    /// <summary>Peak RSS since the last <see cref="TryResetPeak"/>.</summary>
    public static long PeakRss() => Status("VmHWM:") ?? throw new InvalidOperationException("no VmHWM in /proc/self/status");

    /// <summary>Resets the peak to the current RSS; false where /proc/self/clear_refs cannot be written (nothing to measure then).</summary>
    public static bool TryResetPeak()
    {
        try { File.WriteAllText("/proc/self/clear_refs", "5"); return true; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return false; }
    }

    static long? Status(string key)
    {
        if (!File.Exists("/proc/self/status")) return null;
        var line = File.ReadLines("/proc/self/status").FirstOrDefault(l => l.StartsWith(key, StringComparison.Ordinal));
        return line is null ? null : long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) * 1024;
    }
}
