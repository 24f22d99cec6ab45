using System.ComponentModel;

namespace Alignment.Losses.Tests;

/// <summary>
/// The pieces of the GPU script's one short run (<c>benchmarks/gpu/run.sh lottery</c>) that can be proven without a GPU:
/// the bundled test runner runs the CUDA test classes with xunit's own discovery (here their CUDA cases skip, with the
/// reason), and the summary reads every step's files and reports what is missing instead of inventing it.
/// </summary>
[Collection("Processes")]
public class DeviceRunTests
{
    static string Configuration => AppContext.BaseDirectory.Contains($"{Path.DirectorySeparatorChar}Release{Path.DirectorySeparatorChar}", StringComparison.Ordinal) ? "Release" : "Debug";

    [Fact]
    public void The_bundled_runner_runs_the_cuda_test_classes_through_xunit_discovery()
    {
        var output = ProcessRunner.Ok(ProcessRunner.Dotnet(ProcessRunner.RepoRoot, TimeSpan.FromMinutes(5),
            "run", "--project", "tests/Alignment.Losses.TestRunner", "-c", Configuration, "--",
            "--class", "Alignment.Losses.Tests.CudaKernelPlumbingTests", "--class", "Alignment.Losses.Tests.CudaTests"), "test runner");
        // the CPU-side plumbing tests pass; the CUDA ones are discovered and skipped with their reason, never silently dropped
        Assert.Contains("PASS Alignment.Losses.Tests.CudaKernelPlumbingTests.Cpu_logits_use_the_chunked_path_and_never_touch_cuda", output);
        Assert.Contains("SKIP Alignment.Losses.Tests.CudaTests.Values_and_gradients_match_the_oracle_on_cuda_and_stay_on_the_device: No CUDA device", output);
        // 8 cases: 3 pass on any machine, two more where NVRTC is found (.ci/run fetches it), the rest skip
        var totals = System.Text.RegularExpressions.Regex.Match(output, @"\n(\d+) passed, 0 failed, (\d+) skipped");
        Assert.True(totals.Success, output);
        int passed = int.Parse(totals.Groups[1].Value), skipped = int.Parse(totals.Groups[2].Value);
        Assert.Equal(8, passed + skipped);
        Assert.InRange(passed, 3, 5);                                   // the compile check and the compile-error test need NVRTC

        var unknown = ProcessRunner.Dotnet(ProcessRunner.RepoRoot, TimeSpan.FromMinutes(5),
            "run", "--project", "tests/Alignment.Losses.TestRunner", "-c", Configuration, "--", "--class", "No.Such.Class");
        Assert.Equal(2, unknown.ExitCode);
        Assert.Contains("no tests in class(es) No.Such.Class", unknown.Output);
    }

    [Fact]
    public void The_summary_reports_failures_ratios_and_missing_steps_from_the_files_only()
    {
        string? python = null;
        foreach (var candidate in new[] { "python3", "/usr/bin/python3" })
            try
            {
                if (ProcessRunner.Run(candidate, ProcessRunner.RepoRoot, TimeSpan.FromMinutes(1), "-c", "import json").ExitCode == 0) { python = candidate; break; }
            }
            catch (Win32Exception) { }
        Assert.True(python is not null, "python3 is needed to summarise a GPU run (it is on the GPU machines and on CI).");
        var work = Directory.CreateTempSubdirectory("lottery-").FullName;
        try
        {
            File.WriteAllText(Path.Combine(work, "machine.txt"), "NVIDIA H200, 580.159, 143771 MiB\n");
            File.WriteAllText(Path.Combine(work, "steps.tsv"), "tests\t1\t40\ncheck\t0\t30\ntiming-ours\t124\t60\nmemory\tnot-run\t0\n");
            File.WriteAllText(Path.Combine(work, "tests.log"), "PASS a\nFAIL Alignment.Losses.Tests.CudaTests.X(loss: \"dpo\") (0.10 s)\n  boom\n51 passed, 1 failed, 0 skipped (9.0 s)\n");
            File.WriteAllText(Path.Combine(work, "check.log"), "PASS dpo on CUDA float32 vs float64 cpu: ok\nFAIL rpo on CUDA float32 vs float64 cpu: value rel err 0.3\n" +
                                                              "INFO copy bf16 8x1024x128256: 1.00 ms (4200 GB/s read + written)\ncuda-check: 1 check(s) FAILED\n");
            string Records(double dpo64) => $$"""{"records": [{"loss": "dpo", "B": 64, "dtype": "float32", "device": "cuda", "method": "ForwardBackward", "median_us": {{dpo64}}}]}""";
            File.WriteAllText(Path.Combine(work, "timing-ours.json"), Records(150));
            File.WriteAllText(Path.Combine(work, "timing-peer.json"), Records(200));
            var summary = ProcessRunner.Ok(ProcessRunner.Run(python!, ProcessRunner.RepoRoot, TimeSpan.FromMinutes(1), "benchmarks/gpu/summarize.py", work), "summarize.py");
            Assert.Contains("NVIDIA H200", summary);
            Assert.Contains("| tests | 1 |", summary);
            Assert.Contains("| timing-ours | 124 (timed out) |", summary);
            Assert.Contains("| memory | not run |", summary);
            Assert.Contains("51 passed, 1 failed, 0 skipped", summary);
            Assert.Contains("FAIL Alignment.Losses.Tests.CudaTests.X", summary);
            Assert.Contains("1 passed, 1 failed; cuda-check: 1 check(s) FAILED", summary);
            Assert.Contains("FAIL rpo on CUDA", summary);
            Assert.Contains("| dpo | 64 | float32 | cuda | ForwardBackward | 150.0 | 200.0 | 0.75 |", summary);
            Assert.Contains("copy bf16 8x1024x128256: 1.00 ms", summary);
            Assert.Contains("no closing line (see cross.log)", summary);
            Assert.Contains("not measured (no memory.log", summary);
        }
        finally { Directory.Delete(work, recursive: true); }
    }
}
