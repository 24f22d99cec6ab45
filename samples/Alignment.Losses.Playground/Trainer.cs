using System.Diagnostics;
using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Playground;

/// <summary>A loss to train with, and the optimum its paper proves (if any) as a function of the reference policy.</summary>
internal sealed record RunSpec(string Name, IPreferenceLoss Loss, string Setting, Func<Tensor, Tensor, Tensor>? Optimum = null, bool NeedsKl = false, int SelfPlayIterations = 1,
    bool CompareToCleanDpo = false)
{
    /// <summary>The family the run is shown with (one table section and one curve plot per group).</summary>
    public string Group { get; init; } = "dpo";
}

internal sealed record RunResult(
    string Name, string Group, string Setting, double InitialLoss, double FinalLoss, double Reward, double ReferenceReward,
    double WinRate, double Kl, double? DistanceToOptimum, double? DistanceToCleanDpo, double Seconds, double[] RewardCurve, double[] LossCurve,
    float[] FinalPolicy, float[]? OptimalPolicy);

internal static class Trainer
{
    private const double Beta = 0.5;

    /// <summary>Every loss of the library, with the settings the playground trains it with.</summary>
    public static IEnumerable<RunSpec> Catalogue(PlaygroundOptions o)
    {
        // DPO's optimum under Bradley-Terry: pi* ∝ pi_ref exp(r / beta); robust DPO is unbiased, so it shares it.
        const double alpha = 0.7;
        // The theorems hold for the population they assume: DPO's for clean labels, robust DPO's (the clean optimum)
        // when labels are flipped at exactly its eps. So robust DPO uses eps = the label-noise rate when there is noise.
        bool clean = o.LabelNoise == 0;
        double robustEps = clean ? 0.1 : o.LabelNoise;
        yield return new("dpo", new DpoLoss(new() { Beta = Beta }), $"beta {Beta}", clean ? DpoOptimum : null, CompareToCleanDpo: true);
        yield return new("cdpo", new ConservativeDpoLoss(new() { Beta = Beta, LabelSmoothing = 0.1 }), $"beta {Beta}, eps 0.1", CompareToCleanDpo: true);
        yield return new("robust_dpo", new RobustDpoLoss(new() { Beta = Beta, LabelSmoothing = robustEps }), $"beta {Beta}, eps {robustEps}", clean ? null : DpoOptimum,
            CompareToCleanDpo: true);
        yield return new("ipo", new IpoLoss(new() { Beta = Beta }), $"beta {Beta}");
        yield return new("hinge", new HingeLoss(new() { Beta = Beta }), $"beta {Beta}");
        yield return new("dpo_nll", new DpoNllLoss(new() { Beta = Beta, NllWeight = 1 }), $"beta {Beta}, alpha 1");
        yield return new("sigmoid_norm", new SigmoidNormLoss(new() { Beta = Beta * 50 }), $"beta {Beta * 50} (per token)");
        yield return new("exo_pair", new ExoPairLoss(new() { Beta = Beta, LabelSmoothing = 0.01 }), $"beta {Beta}, eps 0.01");
        yield return new("discopop", new DiscoPopLoss(new() { Beta = Beta }), $"beta {Beta}, tau 0.05");
        yield return new("dpo_js", new DpoLoss(new() { Beta = Beta, ScoreMap = ScoreMap.JensenShannon }), $"beta {Beta}, Jensen-Shannon");
        yield return new("dpo_forward_kl", new DpoLoss(new() { Beta = Beta, ScoreMap = ScoreMap.ForwardKl }), $"beta {Beta}, forward KL");

        yield return new("nca_pair", new NcaPairLoss(new() { Beta = Beta }), $"beta {Beta}") { Group = "absolute" };
        yield return new("bco_pair", new BcoPairLoss(new() { Beta = Beta }), $"beta {Beta}") { Group = "absolute" };
        yield return new("apo_zero", new ApoLoss(new() { Beta = Beta }), $"beta {Beta}") { Group = "absolute" };
        yield return new("apo_down", new ApoLoss(new() { Beta = Beta, Anchor = ApoAnchor.Down }), $"beta {Beta}") { Group = "absolute" };
        yield return new("mpo", new WeightedLoss((new DpoLoss(new() { Beta = Beta }), 0.8), (new BcoPairLoss(new() { Beta = Beta }), 0.2), (new SftLoss(), 1.0)),
            "0.8 dpo + 0.2 bco_pair + sft") { Group = "absolute" };

        yield return new("rpo", new RpoLoss(new() { Beta = Beta, Temperature = 0.5 }), $"beta {Beta}, tau 0.5") { Group = "batch" };
        yield return new("rpo_diagonal", new RpoLoss(new() { Beta = Beta, Variant = RpoVariant.Diagonal }), $"beta {Beta}, lambda 0.8") { Group = "batch" };
        yield return new("aot", new AotLoss(new() { Beta = Beta }), $"beta {Beta}, sorted margins") { Group = "batch" };
        yield return new("aot_unpaired", new AotLoss(new() { Beta = Beta, Form = AotForm.Unpaired }), $"beta {Beta}, sorted log-ratios") { Group = "batch" };

        yield return new("spo", new SpoLoss(new() { Alpha = alpha, KlWeight = 0.05 }), $"alpha {alpha}, beta_r 0.05", NeedsKl: true) { Group = "other" };
        yield return new("spo_no_kl", new SpoLoss(new() { Alpha = alpha, KlWeight = 0 }), $"alpha {alpha}, no KL",
            clean ? (_, r) => nn.functional.softmax(r / alpha, 1) : null) { Group = "other" };
        yield return new("odpo", new OdpoLoss(new() { Beta = Beta, Alpha = 0.5, MinimumScoreGap = 0.01 }), $"beta {Beta}, alpha 0.5") { Group = "other" };
        yield return new("sppo", new SppoLoss(new() { Beta = 1.0 }), "beta 1 (eta 1), 5 iterations", SelfPlayIterations: 5) { Group = "other" };
    }

    /// <summary>DPO's optimum on clean Bradley-Terry labels: pi* ∝ pi_ref exp(r / beta) (robust DPO's too, at any noise rate it is told).</summary>
    private static Tensor DpoOptimum(Tensor refLogits, Tensor r) => nn.functional.softmax(nn.functional.log_softmax(refLogits, 1) + r / Beta, 1);

    public static RunResult Train(SyntheticWorld world, RunSpec run, PlaygroundOptions o, Device device, Action<string> progress)
    {
        torch.manual_seed(o.Seed);
        var rng = new Random(o.Seed);
        var watch = Stopwatch.StartNew();
        int p = world.Prompts, k = world.Candidates, b = o.BatchSize;

        using var outer = NewDisposeScope();
        var rewards = world.RewardTensor().to(device);
        var initial = (randn(p, k, generator: null) * 0.1f).to(device);
        var theta = new TorchSharp.Modules.Parameter(initial.clone(), requires_grad: true);   // takes over the clone's handle
        var embeddings = tensor(Flat(world.Embeddings), dtype: ScalarType.Float32).reshape(p, world.Embeddings.GetLength(1)).to(device);
        var tokens = tensor(Flat(world.TokenCounts), dtype: ScalarType.Float32).reshape(p, k).to(device);
        var optimizer = optim.Adam(new[] { theta }, o.LearningRate);
        var referenceLogits = initial.clone();

        var rewardCurve = new double[o.Steps + 1];
        var lossCurve = new double[o.Steps];
        double firstLoss = double.NaN;
        int iterationLength = Math.Max(1, o.Steps / run.SelfPlayIterations);
        rewardCurve[0] = ExpectedReward(theta, rewards);

        for (int step = 0; step < o.Steps; step++)
        {
            if (run.SelfPlayIterations > 1 && step > 0 && step % iterationLength == 0)
            {
                referenceLogits.Dispose();
                referenceLogits = theta.detach().clone();       // SPPO: the reference is the policy at the start of the iteration
            }
            using var scope = NewDisposeScope();
            var pairs = Enumerable.Range(0, b).Select(_ => world.SamplePair()).ToArray();
            var prompt = tensor(pairs.Select(x => (long)x.Prompt).ToArray()).to(device);
            var chosen = tensor(pairs.Select(x => (long)x.Chosen).ToArray()).to(device);
            var rejected = tensor(pairs.Select(x => (long)x.Rejected).ToArray()).to(device);

            var logp = nn.functional.log_softmax(theta, 1);
            Tensor Pick(Tensor table, Tensor index) => table[prompt, index];
            var logpRef = nn.functional.log_softmax(referenceLogits, 1);
            var batch = new PreferenceBatch(
                new PreferenceLogps(Pick(logp, chosen), Pick(logp, rejected), Pick(tokens, chosen), Pick(tokens, rejected)),
                new PreferenceLogps(Pick(logpRef, chosen), Pick(logpRef, rejected)))
            {
                PromptEmbeddings = run.Loss is RpoLoss rpo && rpo.Options.Variant == RpoVariant.Contrast ? PromptEmbeddings.Paired(embeddings.index_select(0, prompt)) : null,
                Scores = new ResponseScores(
                    tensor(pairs.Select(x => (float)world.Score(x.Prompt, x.Chosen)).ToArray()).to(device),
                    tensor(pairs.Select(x => (float)world.Score(x.Prompt, x.Rejected)).ToArray()).to(device)),
                WinRates = run.Loss is SppoLoss ? WinRates(referenceLogits, rewards, prompt, chosen, rejected) : null,
                KlDivergence = run.NeedsKl ? TokenKl.Compute(theta.unsqueeze(1), referenceLogits.unsqueeze(1), ones(p, 1, device: device)) : null,
            };
            using var result = run.Loss.Compute(batch);
            optimizer.zero_grad();
            result.Loss.backward();
            optimizer.step();
            lossCurve[step] = result.Loss.ToDouble();
            if (step == 0) firstLoss = lossCurve[0];
            rewardCurve[step + 1] = ExpectedReward(theta, rewards);
            if ((step + 1) % Math.Max(1, o.Steps / 10) == 0) progress(".");
        }

        using var final = NewDisposeScope();
        var policy = nn.functional.softmax(theta.detach(), 1);
        var reference = nn.functional.softmax(initial, 1);
        double reward = (policy * rewards).sum(1).mean().ToDouble();
        double referenceReward = (reference * rewards).sum(1).mean().ToDouble();
        // P(y ~ pi beats y' ~ pi_ref) under Bradley-Terry, averaged over prompts
        var beats = sigmoid(rewards.unsqueeze(2) - rewards.unsqueeze(1));
        double winRate = (policy.unsqueeze(2) * reference.unsqueeze(1) * beats).sum(new long[] { 1, 2 }).mean().ToDouble();
        double kl = (policy * (policy.log() - reference.log())).sum(1).mean().ToDouble();
        Tensor? optimum = run.Optimum?.Invoke(initial, rewards);
        double? distance = optimum is null ? null : 0.5 * (policy - optimum).abs().sum(1).mean().ToDouble();
        double? toCleanDpo = run.CompareToCleanDpo ? 0.5 * (policy - DpoOptimum(initial, rewards)).abs().sum(1).mean().ToDouble() : null;
        watch.Stop();
        return new RunResult(run.Name, run.Group, run.Setting, firstLoss, lossCurve[^1], reward, referenceReward, winRate, kl, distance, toCleanDpo,
            watch.Elapsed.TotalSeconds, rewardCurve, lossCurve,
            policy.cpu().data<float>().ToArray(), optimum?.cpu().data<float>().ToArray());
    }

    /// <summary>Exact win-rate of each response against the reference policy: P(y beats pi_ref) = sum_k pi_ref(k) sigmoid(r_y - r_k).</summary>
    private static SppoWinRates WinRates(Tensor referenceLogits, Tensor rewards, Tensor prompt, Tensor chosen, Tensor rejected)
    {
        var pi = nn.functional.softmax(referenceLogits, 1);
        var rate = (sigmoid(rewards.unsqueeze(2) - rewards.unsqueeze(1)) * pi.unsqueeze(1)).sum(2);   // [P, K]
        return SppoWinRates.Individual(rate[prompt, chosen], rate[prompt, rejected]);
    }

    private static double ExpectedReward(Tensor theta, Tensor rewards)
    {
        using var _ = NewDisposeScope();
        using var __ = no_grad();
        return (nn.functional.softmax(theta, 1) * rewards).sum(1).mean().ToDouble();
    }

    private static float[] Flat<T>(T[,] a) where T : IConvertible
    {
        var r = new float[a.Length];
        int i = 0;
        foreach (var v in a) r[i++] = Convert.ToSingle(v, System.Globalization.CultureInfo.InvariantCulture);
        return r;
    }
}
