using System.Diagnostics;
using System.Globalization;
using Alignment.Losses;
using Alignment.Losses.Playground;
using TorchSharp;
using static TorchSharp.torch;

// Alignment playground: aligns a tabular policy on built-in synthetic preference data with every loss in the
// library and prints what each one does. No arguments and no downloads needed; --help lists the options.
CultureInfo.DefaultThreadCurrentCulture = CultureInfo.InvariantCulture;
CultureInfo.CurrentCulture = CultureInfo.InvariantCulture;

PlaygroundOptions options;
try
{
    options = PlaygroundOptions.Parse(args);
}
catch (ArgumentException e)
{
    Console.Error.WriteLine($"error: {e.Message}\nRun with --help for the options.");
    return 2;
}
if (options.Help)
{
    Console.WriteLine(PlaygroundOptions.HelpText);
    return 0;
}

var device = options.Device == "cuda" ? new Device(DeviceType.CUDA) : CPU;
if (options.Device == "cuda" && !cuda.is_available())
{
    Console.Error.WriteLine("error: --device cuda was requested but no CUDA device is available (is a TorchSharp CUDA backend package referenced?).");
    return 2;
}

var world = new SyntheticWorld(options.Seed, labelNoise: options.LabelNoise);
var catalogue = Trainer.Catalogue(options).ToList();
var runs = catalogue.Where(r => (options.Losses.Count == 0 || options.Losses.Contains(r.Name)) && (options.Groups.Count == 0 || options.Groups.Contains(r.Group))).ToList();
var rlCatalogue = RlTrainer.Catalogue().ToList();
var rlRuns = rlCatalogue.Where(r => (options.Losses.Count == 0 || options.Losses.Contains(r.Name)) && (options.Groups.Count == 0 || options.Groups.Contains("rl"))).ToList();
var unknown = options.Losses.Except(catalogue.Select(r => r.Name)).Except(rlCatalogue.Select(r => r.Name)).ToList();
if (unknown.Count > 0)
{
    Console.Error.WriteLine($"error: unknown loss(es): {string.Join(", ", unknown)}. Known: {string.Join(", ", catalogue.Select(r => r.Name).Concat(rlCatalogue.Select(r => r.Name)))}.");
    return 2;
}
var unknownGroups = options.Groups.Except(catalogue.Select(r => r.Group)).Except(new[] { "rl" }).ToList();
if (unknownGroups.Count > 0)
{
    Console.Error.WriteLine($"error: unknown group(s): {string.Join(", ", unknownGroups)}. Known: {string.Join(", ", catalogue.Select(r => r.Group).Distinct().Append("rl"))}.");
    return 2;
}

Console.WriteLine($"Alignment playground: {world.Prompts} prompts in 4 topics, {world.Candidates} candidates each, hidden Bradley-Terry rewards.");
Console.WriteLine($"Tabular softmax policy, reference = initial policy; {options.Steps} steps of Adam (lr {options.LearningRate}), batch {options.BatchSize}, seed {options.Seed}, device {options.Device}, label noise {options.LabelNoise}.");
Console.WriteLine();

Directory.CreateDirectory(options.OutputDirectory);
// libtorch's and the JIT's start-up cost lands on the first call: pay it before the first timed run
using (var warm = NewDisposeScope())
{
    var x = randn(new long[] { 4 }, device: device).requires_grad_(true);
    using var r = DpoLoss.Compute(new PreferenceLogps(x - 5, x.detach() - 6), new PreferenceLogps(x.detach() - 5, x.detach() - 6));
    r.Loss.backward();
}
var results = new List<RunResult>();
foreach (var run in runs)
{
    Console.Write($"  training {run.Name,-18}");
    var result = Trainer.Train(world, run, options, device, progress: p => Console.Write(p));
    Console.WriteLine($" done in {result.Seconds:F2} s");
    results.Add(result);
}

var rlResults = new List<RlResult>();
foreach (var run in rlRuns)
{
    Console.Write($"  training {run.Name,-18}");
    var result = RlTrainer.Train(run, options, device, progress: p => Console.Write(p));
    Console.WriteLine($" done in {result.Seconds:F2} s");
    rlResults.Add(result);
}

Console.WriteLine();
var written = new List<string>();
if (results.Count > 0)
{
    Console.WriteLine(Report.Table(results));
    Console.WriteLine(Report.Legend);
    Console.WriteLine(Report.Ranking(results));
    Report.WriteCsv(results, options.OutputDirectory);
    written.AddRange(new[] { "results.csv", "curves.csv" });
    written.AddRange(Plots.Write(results, world, options.OutputDirectory));
}
if (rlResults.Count > 0)
{
    Console.WriteLine(RlTrainer.Table(rlResults));
    RlTrainer.WriteCsv(rlResults, options.OutputDirectory);
    written.Add("rl_results.csv");
    written.AddRange(RlTrainer.Plot(rlResults, options.OutputDirectory));
}
Console.WriteLine($"Results written to {Path.GetFullPath(options.OutputDirectory)}: {string.Join(", ", written)}.");
return 0;
