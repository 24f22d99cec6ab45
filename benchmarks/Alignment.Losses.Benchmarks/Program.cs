using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Exporters.Json;
using BenchmarkDotNet.Running;

// BenchmarkDotNet CLI: dotnet run -c Release --project benchmarks/Alignment.Losses.Benchmarks -- --filter '*LossBenchmarks*'
// Runs in-process by default (no per-benchmark project generation: works with only a .NET runtime, e.g. on a GPU box,
// and keeps the libtorch loading of this process). Results go to benchmarks/results (not committed), as markdown and JSON.
// --cuda-check [--rehearse]: correctness on CUDA (or, rehearsing, the same checks with the CPU standing in)
if (args.Contains("--cuda-check")) return Alignment.Losses.Benchmarks.DeviceCheck.Run(args.Contains("--rehearse"));
// --crosscheck FILE: every loss against the PyTorch peer's values and gradients (reference_losses.py --dump FILE)
if (args.Length == 2 && args[0] == "--crosscheck") return Alignment.Losses.Benchmarks.PeerCrossCheck.Run(args[1]);
// --pg-crosscheck FILE / --pg-timing ...: the policy-gradient objectives against policy_losses.py, the same way
if (args.Length == 2 && args[0] == "--pg-crosscheck") return Alignment.Losses.Benchmarks.PolicyGradientBench.CrossCheck(args[1]);
if (args.Length > 0 && args[0] == "--pg-timing") return Alignment.Losses.Benchmarks.PolicyGradientBench.Timing(args[1..]);
// --distill-crosscheck FILE / --distill-timing ... / --distill-memory PATH ...: the distillation losses against distillation_losses.py
if (args.Length == 2 && args[0] == "--distill-crosscheck") return Alignment.Losses.Benchmarks.DistillationBench.CrossCheck(args[1]);
if (args.Length > 0 && args[0] == "--distill-timing") return Alignment.Losses.Benchmarks.DistillationBench.Timing(args[1..]);
if (args.Length > 1 && args[0] == "--distill-memory") return Alignment.Losses.Benchmarks.DistillationBench.Memory(args[1..]);
// --logprob-timing ...: the CPU log-prob step (kernel, chunked, naive) and the memory floor (compare-logprobs-with-pytorch.sh)
if (args.Length > 0 && args[0] == "--logprob-timing") return Alignment.Losses.Benchmarks.LogProbBench.Timing(args[1..]);
if (args.Length > 2 && args[0] == "--logprob-memory") return Alignment.Losses.Benchmarks.LogProbBench.Memory(args[1..]);
// --quick-timing ...: a few losses and sizes timed the way the PyTorch peer times them (the GPU script's short run)
if (args.Length > 0 && args[0] == "--quick-timing") return Alignment.Losses.Benchmarks.QuickTiming.Run(args[1..]);
// --cuda-memory: peak GPU memory per case (each in a child process) and the largest RPO batch; with a case: the child
// (--cuda-memory --sections logprobs,linear [--linear-t 1024] runs some sections only)
if (args.Length > 0 && args[0] == "--cuda-memory")
{
    if (args.Length == 1) return Alignment.Losses.Benchmarks.CudaMemory.Report();
    if (args[1] != "--sections") return Alignment.Losses.Benchmarks.CudaMemory.Child(args[1..]);
    int ti = Array.IndexOf(args, "--linear-t");
    return Alignment.Losses.Benchmarks.CudaMemory.Report(args.Length > 2 ? args[2].Split(',') : null,
        ti > 0 && ti + 1 < args.Length ? args[ti + 1].Split(',').Select(int.Parse).ToArray() : null);
}

var artifacts = Environment.GetEnvironmentVariable("BENCH_ARTIFACTS") ?? Path.Combine(FindRepoRoot(), "benchmarks", "results");
// In-process unless the caller chose otherwise; the job (--job short|medium|...) stays the caller's choice.
var cli = args.ToList();
if (!cli.Any(a => a is "-i" or "--inProcess" or "--cli" or "--runtimes" or "-r")) cli.Add("--inProcess");
var config = DefaultConfig.Instance
    .AddExporter(JsonExporter.Full)
    .WithArtifactsPath(artifacts)
    .WithOptions(ConfigOptions.JoinSummary);
BenchmarkSwitcher.FromAssembly(typeof(Alignment.Losses.Benchmarks.LossBenchmarks).Assembly).Run(cli.ToArray(), config);
return 0;

static string FindRepoRoot()
{
    var dir = new DirectoryInfo(AppContext.BaseDirectory);
    while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "Alignment.Losses.sln"))) dir = dir.Parent;
    return dir?.FullName ?? Directory.GetCurrentDirectory();
}
