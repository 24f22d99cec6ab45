using System.ComponentModel;

namespace Alignment.Losses.Tests;

/// <summary>
/// Runs where a python3 with PyTorch is installed (on Debian: <c>apt-get install python3-torch</c>; the GPU machines'
/// pip PyTorch); otherwise skipped with the reason shown.
/// </summary>
public sealed class PeerFactAttribute : FactAttribute
{
    public PeerFactAttribute()
    {
        if (PeerCrossCheckTests.Python.Value is null)
            Skip = "No python3 with PyTorch here (apt-get install python3-torch provides one); the cross-check with the PyTorch peer runs where there is.";
    }
}

/// <summary>
/// The benchmark's PyTorch peer (benchmarks/pytorch/reference_losses.py, written the way TRL writes each loss) and the
/// library compute the same function: every loss of the benchmark suites, value and gradients, in float64 on the
/// peer's inputs (<c>--dump</c>, then the benchmark app's <c>--crosscheck</c>), to 1e-9 relative.
/// </summary>
[Collection("Processes")]
public class PeerCrossCheckTests
{
    /// <summary>A python3 that imports torch, if any (PATH first, then Debian's).</summary>
    internal static readonly Lazy<string?> Python = new(() =>
    {
        foreach (var candidate in new[] { "python3", "/usr/bin/python3" })
        {
            try
            {
                if (ProcessRunner.Run(candidate, ProcessRunner.RepoRoot, TimeSpan.FromMinutes(1), "-c", "import torch").ExitCode == 0) return candidate;
            }
            catch (Win32Exception) { }   // not installed
        }
        return null;
    });

    [PeerFact]
    public void Every_benchmarked_loss_equals_the_pytorch_peer_in_value_and_gradient() =>
        CrossCheck("reference_losses.py", "--crosscheck", "losses agree with the peer");

    /// <summary>The policy-gradient objectives against their TRL-style peer (benchmarks/pytorch/policy_losses.py), likewise.</summary>
    [PeerFact]
    public void Every_benchmarked_policy_loss_equals_the_trl_style_pytorch_peer() =>
        CrossCheck("policy_losses.py", "--pg-crosscheck", "all 7 policy losses agree with the peer");

    /// <summary>The distillation losses against their TRL-, Liger- and NeMo-style peer (benchmarks/pytorch/distillation_losses.py):
    /// TRL's generalized_jsd_loss at three betas and two temperatures, Liger's hard + soft mix, TVD, NeMo's top-k (with the tail).</summary>
    [PeerFact]
    public void Every_distillation_case_equals_the_trl_liger_nemo_style_pytorch_peer() =>
        CrossCheck("distillation_losses.py", "--distill-crosscheck", "all 10 distillation cases agree with the peer");

    /// <summary>The peer script's --dump, then the benchmark app's cross-check of it: every line a PASS.</summary>
    static void CrossCheck(string peerScript, string appFlag, string verdict)
    {
        var dir = Directory.CreateTempSubdirectory("peer-").FullName;
        try
        {
            var file = Path.Combine(dir, "peer-values.json");
            ProcessRunner.Ok(ProcessRunner.Run(Python.Value!, ProcessRunner.RepoRoot, TimeSpan.FromMinutes(2),
                $"benchmarks/pytorch/{peerScript}", "--dump", file), $"{peerScript} --dump");
            var output = ProcessRunner.Ok(ProcessRunner.Dotnet(ProcessRunner.RepoRoot, TimeSpan.FromMinutes(5),
                "run", "-c", "Release", "--project", "benchmarks/Alignment.Losses.Benchmarks", "--", appFlag, file), appFlag);
            Assert.Contains(verdict, output);
            Assert.DoesNotContain("FAIL", output);
        }
        finally { Directory.Delete(dir, recursive: true); }
    }
}
