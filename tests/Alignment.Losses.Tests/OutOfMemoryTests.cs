namespace Alignment.Losses.Tests;

/// <summary>
/// Allocation failures inside the library are exceptions that name the call and the sizes, never a process abort. Each
/// case runs in a child process (tests/Alignment.Losses.Probes), so a regression shows as an exit code of 134 instead of
/// killing the test host: on the original code RPO at B = 100,000, the public cosine weighting and the fused head without
/// a bias all aborted inside THSTensor_matmul, and an exception escaping a backward pass crossed native frames.
/// </summary>
public class OutOfMemoryTests
{
    /// <summary>The probe program built next to this test assembly (same configuration and runtime identifier).</summary>
    static string ProbeDll => Path.Combine(
        AppContext.BaseDirectory.Replace("Alignment.Losses.Tests" + Path.DirectorySeparatorChar + "bin", "Alignment.Losses.Probes" + Path.DirectorySeparatorChar + "bin", StringComparison.Ordinal),
        "Alignment.Losses.Probes.dll");

    [Theory]
    [InlineData("rpo-huge-batch", "RpoLoss.Compute (rpo)", "[100000, 100000]")]
    [InlineData("cosine-weighting-huge", "CosineSoftmaxWeighting.ComputeWeights", "[100000, 100000]")]
    [InlineData("fused-huge-vocabulary", "FusedLinearLogProbs.Compute", "weight [8589934592, 8]")]
    [InlineData("fused-huge-vocabulary-bias", "FusedLinearLogProbs.Compute", "weight [8589934592, 8]")]
    [InlineData("backward-failure", "The backward pass of AlignmentLosses.RpoContrast", "2.00 GiB")]
    public void An_allocation_failure_is_an_exception_naming_the_call_and_the_sizes(string probe, string call, string sizes)
    {
        Assert.True(File.Exists(ProbeDll), $"probe program not built at {ProbeDll}");
        var r = ProcessRunner.Dotnet(ProcessRunner.RepoRoot, TimeSpan.FromMinutes(3), ProbeDll, probe);
        Assert.True(r.ExitCode == 0, $"{probe}: the process ended with exit code {r.ExitCode} (134 is an abort):\n{r.Output}");
        Assert.Contains("EXCEPTION System.InsufficientMemoryException: " + call, r.Output, StringComparison.Ordinal);
        Assert.Contains(sizes, r.Output, StringComparison.Ordinal);
        if (probe == "backward-failure")   // the autograd engine raised an exception out of backward() instead of aborting
            Assert.Contains("backward threw: Function CSharpNode returned an invalid gradient", r.Output, StringComparison.Ordinal);
    }
}
