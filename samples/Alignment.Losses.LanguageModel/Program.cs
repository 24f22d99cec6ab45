// From a preference dataset to an aligned language model, with the library's pieces end to end:
// tokenizer -> PreferenceCollator -> ReferenceLogProbCache -> FusedLinearLogProbs -> any loss -> MetricsAccumulator.
//
//   dotnet run --project samples/Alignment.Losses.LanguageModel                       # DPO and RPO, under a minute on 2 cores
//   dotnet run --project samples/Alignment.Losses.LanguageModel -- --losses ipo,hinge,rpo --device cuda
//   dotnet run --project samples/Alignment.Losses.LanguageModel -- --losses kto,orpo,simpo      # unpaired, reference-free
//   dotnet run --project samples/Alignment.Losses.LanguageModel -- --losses grpo,dapo,rloo      # online RL: sample, judge, update
//   dotnet run --project samples/Alignment.Losses.LanguageModel -- --distill                    # a wider teacher into a small student
//   mpiexec.mpich -n 2 dotnet samples/Alignment.Losses.LanguageModel/bin/Debug/net10.0/linux-x64/Alignment.Losses.LanguageModel.dll --threads 1
//                                                                                               # data-parallel over 2 MPI ranks
using System.Diagnostics;
using System.Globalization;
using System.Security.Cryptography;
using Alignment.Losses;
using Alignment.Losses.Data;
using Alignment.Losses.LanguageModel;
using Alignment.Losses.Metrics;
using Alignment.Losses.Mpi;
using ScottPlot;
using TorchSharp;
using static TorchSharp.torch;

const int ReplyTokens = Rollouts.ReplyTokens;                // the longest reply sampled (online RL, generation)
// data-parallel when launched by mpiexec: every rank runs this program; rank 0 speaks and writes the outputs
using var mpi = MpiCollectives.LaunchedByMpiexec ? new MpiCollectives(args) : null;
ICollectives ranks = mpi ?? Collectives.SingleProcess;
int world = ranks.WorldSize, rank = ranks.Rank;
if (rank > 0) Console.SetOut(TextWriter.Null);
var options = LmOptions.Parse(args);
if (options is null) return 2;
if (world > 1)
{
    if (options.Distill || options.Losses.Any(PolicyLosses.Names.Contains))
    {
        Console.Error.WriteLine("error: the data-parallel mode (under mpiexec) runs the offline preference losses; run --distill and the online losses in one process.");
        return 2;
    }
    if (options.BatchSize < world)
    {
        Console.Error.WriteLine($"error: --batch {options.BatchSize} gives some of the {world} ranks no pair; use at least one pair per rank.");
        return 2;
    }
    if (rank > 0) options = options with { Output = Path.Combine(options.Output, $"rank-{rank}") };
}
if (options.Threads > 0) set_num_threads(options.Threads);
CultureInfo.DefaultThreadCurrentCulture = CultureInfo.InvariantCulture;
var device = options.Device == "cuda" ? CUDA : CPU;
Directory.CreateDirectory(options.Output);
var clock = Stopwatch.StartNew();

// 1. data: a real tokenizer, a compact vocabulary, the collator
var corpus = new Corpus(Path.Combine(AppContext.BaseDirectory, "data"));
var train = corpus.Train.Select(corpus.Tokenise).ToList();
var heldOut = corpus.HeldOut.Select(corpus.Tokenise).ToList();
var collator = new PreferenceCollator(new PreferenceCollatorOptions { PadTokenId = Corpus.Pad, MaxPromptLength = 24, MaxLength = 48 });
Console.WriteLine($"data: {train.Count} training and {heldOut.Count} held-out pairs, {corpus.VocabularySize} token types (cl100k_base, remapped)" +
                  (world > 1 ? $"; data-parallel over {world} MPI ranks" : ""));
if (options.Distill) return Distillation.Run(options, corpus, train, heldOut, collator, device);

// 2. a small causal transformer, supervised on both kinds of reply: the reference is indifferent between them
manual_seed(options.Seed);
var model = new TinyTransformer(corpus.VocabularySize, width: 64, layers: 2, heads: 4, maxLength: 48).to(device);
var logProbOptions = new SequenceLogProbsOptions { StepStatistics = true };
var rng = new Random(options.Seed);
Supervise(model, train, options.SftSteps, options.BatchSize);
if (world > 1) FromRankZero(model.parameters());            // every rank starts alignment from rank 0's weights, bit for bit
var referenceWeights = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
string fingerprint = Fingerprint(referenceWeights);
Console.WriteLine($"sft: {options.SftSteps} steps, reference fingerprint {fingerprint} ({clock.Elapsed.TotalSeconds:F0} s)");

// 3. the reference pass, once: log-probs to disk (reused after a restart), and reference replies for the win-rate
SequenceLogProbsResult Reference(CollatedPreferences b) =>
    FusedLinearLogProbs.Compute(model.forward(b.InputIds, b.AttentionMask), model.Head.weight!, null, b.Labels, null, LabelAlignment.ShiftByOne);
model.eval();
var cacheOptions = new ReferenceCacheOptions { BatchSize = 32, Device = device, Description = $"tiny transformer sft {fingerprint}", Progress = null };
string trainCachePath = Path.Combine(options.Output, $"reference-train-{fingerprint}.cache");
bool reused = File.Exists(trainCachePath);
var trainCache = ReferenceLogProbCache.LoadOrBuild(train, collator, Reference, trainCachePath, cacheOptions);
var heldOutCache = ReferenceLogProbCache.LoadOrBuild(heldOut, collator, Reference, Path.Combine(options.Output, $"reference-heldout-{fingerprint}.cache"), cacheOptions);
var referenceReplies = Generate(model, heldOut, options.Seed);
double referencePoliteness = referenceReplies.Average(Corpus.Politeness);
Console.WriteLine($"reference cache: {trainCache.Count} + {heldOutCache.Count} examples {(reused ? "reused from" : "written to")} {options.Output}; reference politeness {referencePoliteness:F2}");

// 4. align a copy of the SFT model with each loss, the reference model gone (only its cached log-probs are used)
TinyTransformer? referenceModel = null;                     // built only if a loss needs reference log-probs of new pairs (KTO)
var runs = new List<Run>();
var csv = new CsvMetricsSink(Path.Combine(options.Output, "metrics.csv"));
File.WriteAllLines(Path.Combine(options.Output, "loss-curve.csv"), new[] { "loss,step,value" });    // every offline step's loss
foreach (var name in options.Losses)
{
    using (no_grad()) foreach (var (key, value) in model.state_dict()) value.copy_(referenceWeights[key]);
    var run = PolicyLosses.Names.Contains(name)
        ? AlignOnline(name, PolicyLosses.Create(name, maxCompletionLength: ReplyTokens + 1, kl: new KlPenalty(options.Beta)))
        : Align(name, LossByName(name));
    runs.Add(run);
    Console.WriteLine($"{name}: held-out reward accuracy {run.Accuracy[0]:F2} -> {run.Accuracy[^1]:F2}, win-rate vs reference {run.WinRate:F2} " +
                      $"(politeness {run.Politeness:F2} vs {referencePoliteness:F2}), sample: \"{run.Sample.Trim()}\"");
}
csv.Dispose();

// 5. report
File.WriteAllLines(Path.Combine(options.Output, "results.csv"),
    new[] { "loss,heldout_reward_accuracy_before,heldout_reward_accuracy_after,win_rate_vs_reference,politeness,reference_politeness" }
        .Concat(runs.Select(r => $"{r.Name},{r.Accuracy[0]:F4},{r.Accuracy[^1]:F4},{r.WinRate:F4},{r.Politeness:F4},{referencePoliteness:F4}")));
PlotRuns(runs, Path.Combine(options.Output, "heldout_reward_accuracy.png"));
Console.WriteLine($"wrote results.csv, metrics.csv and heldout_reward_accuracy.png to {options.Output} ({clock.Elapsed.TotalSeconds:F0} s)");
return 0;

// ---- the pieces ----

IPreferenceLoss LossByName(string name) => name switch
{
    "rpo" => new RpoLoss(new RpoOptions { Beta = options.Beta }),
    "dpo" => TrlLosses.Create("sigmoid", new TrlDpoConfig { Beta = options.Beta }),
    // TRL's CPO, ORPO, KTO and BCO trainers' objectives; BCO's running reward mean is this run's state
    "orpo" when !options.OrpoPromptLoss => new OrpoLoss(new OrpoOptions { Beta = options.Beta, NllTokens = OrpoNllTokens.Completion }),
    "bco" => TrlLosses.CreateForTrainer(name, new TrlTrainerConfig { Beta = options.Beta, BcoBaseline = new BcoRewardBaseline() }),
    _ when TrlLosses.TrainerObjectives.Contains(name) => TrlLosses.CreateForTrainer(name, new TrlTrainerConfig { Beta = options.Beta }),
    _ => TrlLosses.Create(name, new TrlDpoConfig { Beta = options.Beta }),
};

// The batch each kind of loss takes, from one collated batch of pairs (chosen rows first, then rejected rows).
PreferenceBatch BatchFor(IPreferenceLoss loss, List<PreferenceExample> examples, CollatedPreferences b, Tensor hidden, SequenceLogProbsResult logps, PreferenceLogps reference)
{
    switch (loss)
    {
        case CpoLoss or SimPoLoss or OrpoLoss:                 // reference-free: the cached reference is not used
            return new PreferenceBatch(logps.ToPreferenceLogps());
        case KtoLoss or ApoZeroUnpairedLoss or BcoLoss:        // the pairs unpaired, as TRL does with paired data
            return new PreferenceBatch(logps.ToUnpairedLogps(b.PairCount), PreferenceLogps.Unpaired(reference.Chosen, reference.Rejected))
            {
                Mismatched = loss is KtoLoss ? Mismatched(examples) : null,
            };
        default:
            // RPO's prompt embeddings without a sentence encoder: the policy's own hidden states, mean-pooled over the prompt
            var embeddings = PromptEmbeddings.MeanPooled(hidden, b.PromptMask).narrow(0, 0, b.PairCount);
            return new PreferenceBatch(logps.ToPreferenceLogps(), reference) { PromptEmbeddings = PromptEmbeddings.Paired(embeddings) };
    }
}

// KTO's reference point from mismatched (prompt, completion) pairs built as TRL builds them (the batch's 2B sequences,
// each with the previous one's completion: PreferenceCollator.CollateMismatched), under the policy (no gradient: z0 is
// detached) and under the reference model, which this needs at run time (the cache holds matched pairs only).
MismatchedLogps Mismatched(List<PreferenceExample> examples)
{
    referenceModel ??= LoadReference();
    using var m = collator.CollateMismatched(examples, device);
    using var noGrad = no_grad();
    using var policy = FusedLinearLogProbs.Compute(model.forward(m.InputIds, m.AttentionMask), model.Head.weight!, null, m.Labels, null, LabelAlignment.ShiftByOne);
    using var reference = FusedLinearLogProbs.Compute(referenceModel.forward(m.InputIds, m.AttentionMask), referenceModel.Head.weight!, null, m.Labels, null, LabelAlignment.ShiftByOne);
    return new MismatchedLogps(policy.Sum.detach().clone(), reference.Sum.detach().clone());   // all 2B rows, kept after the results go
}

TinyTransformer LoadReference()
{
    var r = new TinyTransformer(corpus.VocabularySize, width: 64, layers: 2, heads: 4, maxLength: 48).to(device);
    using (no_grad()) foreach (var (key, value) in r.state_dict()) value.copy_(referenceWeights[key]);
    r.eval();
    return r;
}

void Supervise(TinyTransformer m, List<PreferenceExample> data, int steps, int batch)
{
    var optimizer = optim.AdamW(m.parameters(), lr: 3e-3);
    m.train();
    for (int step = 1; step <= steps; step++)
    {
        using var scope = NewDisposeScope();
        using var b = collator.Collate(Sample(data, batch), device);
        // every row (chosen and rejected) is a supervised target: NLL per token
        using var logps = FusedLinearLogProbs.Compute(m.forward(b.InputIds, b.AttentionMask), m.Head.weight!, null, b.Labels, null, LabelAlignment.ShiftByOne);
        var nll = -logps.Sum.sum() / logps.TokenCounts.sum();
        optimizer.zero_grad();
        nll.backward();
        optimizer.step();
        if (step % Math.Max(1, steps / 4) == 0) Console.WriteLine($"sft step {step}/{steps}: nll per token {nll.ToDouble():F3}");
    }
}

Run Align(string name, IPreferenceLoss loss)
{
    var optimizer = optim.AdamW(model.parameters(), lr: options.LearningRate);
    var accumulator = new MetricsAccumulator();
    var progress = new ConsoleMetricsSink(names: new[] { "loss", "rewards/accuracies", "rewards/margins", "entropy", "mean_token_accuracy" }, totalSteps: options.Steps);
    var accuracy = new List<double> { HeldOutAccuracy() };
    var evalSteps = new List<int> { 0 };
    var curve = new List<string>();
    var global = world > 1 ? loss.AcrossRanks(ranks) : loss;  // the loss of the whole step's batch, gathered over the ranks
    for (int step = 1; step <= options.Steps; step++)
    {
        model.train();
        using (var scope = NewDisposeScope())
        {
            // every rank draws the same global batch (same seed) and keeps its shard: pair i on rank i % world
            var examples = Sample(train, options.BatchSize).Where((_, i) => i % world == rank).ToList();
            using var b = collator.Collate(examples, device);
            var reference = trainCache.Lookup(b);
            var hidden = model.forward(b.InputIds, b.AttentionMask);
            // ORPO's NLL runs over prompt and completion tokens (TRL's): score every token once, then split the result
            bool promptToo = loss is OrpoLoss { Options.NllTokens: OrpoNllTokens.PromptAndCompletion };
            using var scored = FusedLinearLogProbs.Compute(hidden, model.Head.weight!, null, promptToo ? b.SequenceLabels : b.Labels, null, LabelAlignment.ShiftByOne, logProbOptions);
            using var logps = promptToo ? scored.Within(b.CompletionMask) : scored;
            using var prompt = promptToo ? scored.Within(b.PromptMask) : null;
            using var result = global.Compute(BatchFor(loss, examples, b, hidden, logps, reference) with { Prompt = prompt?.ToPromptLogps() });
            optimizer.zero_grad();
            result.Loss.backward();
            if (world > 1) ranks.AverageGradients(model.parameters());
            optimizer.step();
            accumulator.Add(result);
            accumulator.Add(logps.Statistics());
            curve.Add(FormattableString.Invariant($"{name},{step},{result.Loss.ToDouble():R}"));
        }
        if (step % options.LogEvery == 0 || step == options.Steps) Evaluate(name, step, accumulator, progress, accuracy, evalSteps);
    }
    File.AppendAllLines(Path.Combine(options.Output, "loss-curve.csv"), curve);
    return Finish(name, evalSteps, accuracy);
}

// Online RL (GRPO and its family): sample G replies per prompt from the policy, reward each with the judge
// (Corpus.Politeness), and update on the replies' per-token log-probs, with a k3 KL to the SFT reference (beta --beta).
Run AlignOnline(string name, ITokenLoss loss)
{
    const int G = 4;
    referenceModel ??= LoadReference();
    var optimizer = optim.AdamW(model.parameters(), lr: options.LearningRate);
    var progress = new ConsoleMetricsSink(names: new[] { "loss", "reward", "reward_std", "kl", "clip_ratio/region_mean" }, totalSteps: options.Steps);
    var accumulator = new MetricsAccumulator();
    var accuracy = new List<double> { HeldOutAccuracy() };
    var evalSteps = new List<int> { 0 };
    var groups = GroupIds.Contiguous(G);
    var generator = new Generator((ulong)options.Seed + 1, device);
    int promptsPerStep = Math.Max(2, options.BatchSize / G);
    for (int step = 1; step <= options.Steps; step++)
    {
        using var scope = NewDisposeScope();
        var prompts = Sample(train, promptsPerStep).Select(e => e.Prompt).ToList();
        var rollouts = prompts.SelectMany(p => Rollouts.Sample(model, p, G, generator, device).Select(reply => (Prompt: p.ToArray(), Reply: reply))).ToList();
        var rewards = tensor(rollouts.Select(r => (float)Corpus.Politeness(corpus.Decode(r.Reply))).ToArray()).to(device);
        using var advantages = name switch
        {
            "dr_grpo" => Advantages.DrGrpo(rewards, groups),
            "rloo" => Advantages.Rloo(rewards, groups),
            _ => Advantages.Grpo(rewards, groups),
        };
        var (ids, attention, labels) = Rollouts.Collate(rollouts, device);
        SequenceLogProbsResult referencePass;
        using (no_grad())
            referencePass = FusedLinearLogProbs.Compute(referenceModel.forward(ids, attention), referenceModel.Head.weight!, null, labels, null, LabelAlignment.ShiftByOne);
        using var _ = referencePass;
        model.train();
        using var policy = FusedLinearLogProbs.Compute(model.forward(ids, attention), model.Head.weight!, null, labels, null, LabelAlignment.ShiftByOne, logProbOptions);
        using var result = loss.Compute(TokenBatch.FromLogProbs(policy, advantages.Values, reference: referencePass));
        optimizer.zero_grad();
        result.Backward();
        optimizer.step();
        accumulator.Add(result);
        foreach (var (metric, value) in advantages.Metrics) accumulator.Add(metric, value);
        if (step % options.LogEvery == 0 || step == options.Steps) Evaluate(name, step, accumulator, progress, accuracy, evalSteps);
    }
    return Finish(name, evalSteps, accuracy);
}

// every LogEvery steps: the window's metrics and the held-out reward accuracy, to the console and metrics.csv
void Evaluate(string name, int step, MetricsAccumulator accumulator, ConsoleMetricsSink progress, List<double> accuracy, List<int> evalSteps)
{
    var metrics = accumulator.Flush(ranks).ToDictionary(kv => kv.Key, kv => kv.Value);   // the global batch's, on every rank
    accuracy.Add(HeldOutAccuracy());
    evalSteps.Add(step);
    metrics["eval_rewards/accuracies"] = accuracy[^1];
    progress.Write(step, metrics);
    csv.Write(step, metrics.ToDictionary(kv => name + "/" + kv.Key, kv => kv.Value));
}

// after training: held-out replies judged against the reference's
Run Finish(string name, List<int> evalSteps, List<double> accuracy)
{
    var replies = Generate(model, heldOut, options.Seed);
    double wins = replies.Zip(referenceReplies, (p, r) => Math.Sign(Corpus.Politeness(p) - Corpus.Politeness(r)) switch { 1 => 1.0, 0 => 0.5, _ => 0.0 }).Average();
    return new Run(name, evalSteps.ToArray(), accuracy.ToArray(), wins, replies.Average(Corpus.Politeness), replies[0]);
}

double HeldOutAccuracy()
{
    model.eval();
    using var scope = NewDisposeScope();
    using var noGrad = no_grad();
    using var b = collator.Collate(heldOut, device);
    var reference = heldOutCache.Lookup(b);
    using var logps = FusedLinearLogProbs.Compute(model.forward(b.InputIds, b.AttentionMask), model.Head.weight!, null, b.Labels, null, LabelAlignment.ShiftByOne);
    var policy = logps.ToPreferenceLogps();
    return ((policy.Chosen - reference.Chosen) > (policy.Rejected - reference.Rejected)).to_type(ScalarType.Float64).mean().ToDouble();
}

List<string> Generate(TinyTransformer m, List<PreferenceExample> prompts, int seed)
{
    m.eval();
    var generator = new Generator((ulong)seed, device);
    var replies = new List<string>();
    using var noGrad = no_grad();
    foreach (var e in prompts)
    {
        using var scope = NewDisposeScope();
        var ids = e.Prompt.Select(i => (long)i).ToList();
        var reply = new List<int>();
        while (ids.Count < m.MaxLength && reply.Count < 24)
        {
            var input = tensor(ids.ToArray(), device: device).unsqueeze(0);
            var logits = m.Logits(input, ones_like(input, dtype: ScalarType.Bool))[0, -1];
            int next = (int)multinomial(logits.softmax(0), 1, generator: generator).item<long>();
            if (next == Corpus.Eos) break;
            reply.Add(next);
            ids.Add(next);
        }
        replies.Add(corpus.Decode(reply));
    }
    return replies;
}

List<PreferenceExample> Sample(List<PreferenceExample> data, int count) => Enumerable.Range(0, count).Select(_ => data[rng.Next(data.Count)]).ToList();

// a broadcast from rank 0 through the all-reduce: the other ranks add zeros
void FromRankZero(IEnumerable<Tensor> parameters)
{
    using var scope = NewDisposeScope();
    using var noGrad = no_grad();
    foreach (var p in parameters)
    {
        var values = rank == 0 ? p.detach().to(ScalarType.Float64, CPU).contiguous().data<double>().ToArray() : new double[p.numel()];
        p.copy_(tensor(ranks.AllReduceSum(values), p.shape, dtype: ScalarType.Float64).to(p.dtype, p.device));
    }
}

static string Fingerprint(Dictionary<string, Tensor> weights)
{
    using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
    foreach (var (key, value) in weights.OrderBy(kv => kv.Key, StringComparer.Ordinal))
    {
        sha.AppendData(System.Text.Encoding.UTF8.GetBytes(key));
        using var cpu = value.to_type(ScalarType.Float32).cpu().contiguous();
        sha.AppendData(System.Runtime.InteropServices.MemoryMarshal.AsBytes(cpu.data<float>().ToArray().AsSpan()));
    }
    return Convert.ToHexString(sha.GetHashAndReset(), 0, 6).ToLowerInvariant();
}

static void PlotRuns(List<Run> runs, string file)
{
    var plot = new Plot();
    foreach (var r in runs)
    {
        var line = plot.Add.Scatter(r.Steps.Select(s => (double)s).ToArray(), r.Accuracy);
        line.LegendText = $"{r.Name} (win-rate {r.WinRate:F2})";
    }
    plot.Title("Held-out reward accuracy during alignment (tiny transformer, polite vs rude replies)");
    plot.XLabel("alignment step");
    plot.YLabel("reward accuracy (held-out pairs)");
    plot.Axes.SetLimitsY(-0.05, 1.05);
    plot.ShowLegend(Edge.Right);
    plot.SavePng(file, 1000, 560);
}

internal sealed record Run(string Name, int[] Steps, double[] Accuracy, double WinRate, double Politeness, string Sample);
