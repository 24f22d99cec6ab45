using System.Diagnostics;
using System.Text.Json;

namespace Alignment.Losses.Benchmarks;

/// <summary>
/// The extra resident memory of one step, measured the way the peers measure theirs: in a child process of this app,
/// with malloc's mmap threshold fixed (so freed buffers go back to the OS, as <c>MALLOC_MMAP_THRESHOLD_</c> makes them in
/// the peer), after a warm-up step, as the peak resident set (VmHWM, reset through <c>/proc/self/clear_refs</c>) minus the
/// resident set before the step. Linux only.
/// </summary>
internal static class PeakMemory
{
    /// <summary>Runs this app with <paramref name="childArgs"/> (a child mode that prints <c>{"extra_mib": ...}</c>) and returns its extra MiB.</summary>
    internal static double OfChild(IEnumerable<string> childArgs)
    {
        var psi = new ProcessStartInfo(Environment.ProcessPath!) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in childArgs) psi.ArgumentList.Add(a);
        psi.Environment["MALLOC_MMAP_THRESHOLD_"] = "65536";
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEnd();
        var stderr = p.StandardError.ReadToEnd();
        p.WaitForExit();
        var line = stdout.Split('\n').LastOrDefault(l => l.StartsWith('{'))
                   ?? throw new InvalidOperationException($"{string.Join(' ', childArgs)} printed no result: {stdout}{stderr}");
        return JsonDocument.Parse(line).RootElement.GetProperty("extra_mib").GetDouble();
    }

    /// <summary>In the child: one warm-up <paramref name="step"/>, the peak reset, one more step; its peak over the resident set before it, MiB.</summary>
    internal static double Measure(Action step)
    {
        step();
        GC.Collect();
        File.WriteAllText("/proc/self/clear_refs", "5");
        double before = Status("VmRSS");
        step();
        return Status("VmHWM") - before;
    }

    private static double Status(string field) =>
        File.ReadLines("/proc/self/status").Where(l => l.StartsWith(field + ":")).Select(l => double.Parse(l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024).First();
}
