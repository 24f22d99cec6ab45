using System.Diagnostics;
using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Playground;

/// <summary>What a loss is given each step, built from the same sampled preference pairs.</summary>
internal enum RunInput
{
    /// <summary>Paired policy and reference log-probs (the DPO family, RPO, SPO, ...).</summary>
    Paired,

    /// <summary>Paired policy log-probs with token counts and no reference (CPO, SimPO, AlphaPO, ORPO).</summary>
    ReferenceFree,

    /// <summary>
    /// The pairs unpaired as TRL does with paired datasets: the B chosen responses are the desirable examples, the B rejected
    /// ones the undesirable (KTO, apo_zero_unpaired, BCO); KTO's mismatched pairs put each prompt with the previous pair's chosen response.
    /// </summary>
    Unpaired,

    /// <summary>
    /// A reward model: the trained table is r_hat[prompt, response], fitted to the pairs; the policy shown is the KL-regularised
    /// RLHF optimum for that reward, pi ∝ pi_ref exp(r_hat / beta) (the same optimum DPO targets with the true reward).
    /// </summary>
    RewardModel,
}

/// <summary>A loss to train with, and the optimum its paper proves (if any) as a function of the reference policy.</summary>
internal sealed record RunSpec(string Name, IPreferenceLoss Loss, string Setting, Func<Tensor, Tensor, Tensor>? Optimum = null, bool NeedsKl = false, int SelfPlayIterations = 1,
    bool CompareToCleanDpo = false)
{
    /// <summary>The family the run is shown with (one table section and one curve plot per group).</summary>
    public string Group { get; init; } = "dpo";

    /// <summary>What the loss is given each step. Default paired log-probs with a reference.</summary>
    public RunInput Input { get; init; } = RunInput.Paired;
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

        // Reference-free: no KL anchor, so these move furthest from the reference. SimPO/AlphaPO/ORPO read per-token means
        // (l / n with n = 20-80 here), hence the larger beta, as with sigmoid_norm.
        const double perToken = Beta * 50;
        var free = RunInput.ReferenceFree;
        yield return new("cpo", new CpoLoss(new() { Beta = Beta }), $"beta {Beta}, cpo_alpha 1") { Group = "reference_free", Input = free };
        yield return new("simpo", new SimPoLoss(new() { Beta = perToken, Gamma = perToken * 0.01 }), $"beta {perToken}, gamma/beta 0.01") { Group = "reference_free", Input = free };
        yield return new("alphapo", new AlphaPoLoss(new() { Beta = perToken, Gamma = perToken * 0.01, Alpha = 0.25 }), $"beta {perToken}, g/b 0.01, alpha 0.25")
            { Group = "reference_free", Input = free };
        // a tabular policy has no prompt tokens to model: ORPO's NLL covers the responses (the authors' --disable_prompt_loss)
        yield return new("orpo", new OrpoLoss(new() { Beta = Beta, NllTokens = OrpoNllTokens.Completion }), $"lambda {Beta}, NLL on responses") { Group = "reference_free", Input = free };

        var unpaired = RunInput.Unpaired;
        yield return new("kto", new KtoLoss(new() { Beta = Beta }), $"beta {Beta}, lambda_D=lambda_U=1") { Group = "unpaired", Input = unpaired };
        yield return new("apo_zero_unpaired", new ApoZeroUnpairedLoss(new() { Beta = Beta }), $"beta {Beta}") { Group = "unpaired", Input = unpaired };
        yield return new("bco", new BcoLoss(new BcoRewardBaseline(), new() { Beta = Beta }), $"beta {Beta}, running-mean delta") { Group = "unpaired", Input = unpaired };

        yield return new("bradley_terry", new BradleyTerryLoss(), $"reward model; pi_ref e^(r/{Beta})", clean ? DpoOptimum : null, CompareToCleanDpo: true)
            { Group = "reward_model", Input = RunInput.RewardModel };
    }

    /// <summary>DPO's optimum on clean Bradley-Terry labels: pi* ∝ pi_ref exp(r / beta) (robust DPO's too, at any noise rate it is told).</summary>
    private static Tensor DpoOptimum(Tensor refLogits, Tensor r) => nn.functional.softmax(nn.functional.log_softmax(refLogits, 1) + r / Beta, 1);

    public static RunResult Train(SyntheticWorld world, RunSpec run, PlaygroundOptions o, Device device, Action<string> progress)
    {
        torch.manual_seed(o.Seed);
        var rng = new Random(o.Seed);
        int p = world.Prompts, k = world.Candidates, b = o.BatchSize;

        using var outer = NewDisposeScope();
        var rewards = world.RewardTensor().to(device);
        var initial = (randn(p, k, generator: null) * 0.1f).to(device);
        bool rewardModel = run.Input == RunInput.RewardModel;
        // A reward model's table starts at zero, so that its policy pi_ref e^(r/beta) starts at the reference.
        var theta = new TorchSharp.Modules.Parameter(rewardModel ? zeros_like(initial) : initial.clone(), requires_grad: true);   // takes over the handle
        var embeddings = tensor(Flat(world.Embeddings), dtype: ScalarType.Float32).reshape(p, world.Embeddings.GetLength(1)).to(device);
        var tokens = tensor(Flat(world.TokenCounts), dtype: ScalarType.Float32).reshape(p, k).to(device);
        var optimizer = optim.Adam(new[] { theta }, o.LearningRate);
        var referenceLogits = initial.clone();
        // The policy's logits: the table itself, or for a reward model the RLHF optimum's log pi_ref + r_hat / beta.
        Tensor PolicyLogits(Tensor table) => rewardModel ? nn.functional.log_softmax(initial, 1) + table / Beta : table;

        var rewardCurve = new double[o.Steps + 1];
        var lossCurve = new double[o.Steps];
        double firstLoss = double.NaN;
        int iterationLength = Math.Max(1, o.Steps / run.SelfPlayIterations);
        rewardCurve[0] = ExpectedReward(() => PolicyLogits(theta), rewards);

        var watch = Stopwatch.StartNew();                       // the training steps only: set-up and evaluation are not timed
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
            var batch = run.Input switch
            {
                RunInput.ReferenceFree => new PreferenceBatch(new PreferenceLogps(Pick(logp, chosen), Pick(logp, rejected), Pick(tokens, chosen), Pick(tokens, rejected))),
                RunInput.Unpaired => new PreferenceBatch(
                    PreferenceLogps.Unpaired(Pick(logp, chosen), Pick(logp, rejected)),
                    PreferenceLogps.Unpaired(Pick(logpRef, chosen), Pick(logpRef, rejected)))
                {
                    // KTO's reference point: each prompt with the previous pair's chosen response, as TRL's KTOTrainer shifts completions
                    Mismatched = run.Loss is KtoLoss ? new MismatchedLogps(Pick(logp, chosen.roll(1)), Pick(logpRef, chosen.roll(1))) : null,
                },
                RunInput.RewardModel => new PreferenceBatch(new PreferenceLogps(Pick(theta, chosen), Pick(theta, rejected))),
                _ => new PreferenceBatch(
                    new PreferenceLogps(Pick(logp, chosen), Pick(logp, rejected), Pick(tokens, chosen), Pick(tokens, rejected)),
                    new PreferenceLogps(Pick(logpRef, chosen), Pick(logpRef, rejected)))
                {
                    PromptEmbeddings = run.Loss is RpoLoss rpo && rpo.Options.Variant == RpoVariant.Contrast ? PromptEmbeddings.Paired(embeddings.index_select(0, prompt)) : null,
                    Scores = new ResponseScores(
                        tensor(pairs.Select(x => (float)world.Score(x.Prompt, x.Chosen)).ToArray()).to(device),
                        tensor(pairs.Select(x => (float)world.Score(x.Prompt, x.Rejected)).ToArray()).to(device)),
                    WinRates = run.Loss is SppoLoss ? WinRates(referenceLogits, rewards, prompt, chosen, rejected) : null,
                    KlDivergence = run.NeedsKl ? TokenKl.Compute(theta.unsqueeze(1), referenceLogits.unsqueeze(1), ones(p, 1, device: device)) : null,
                },
            };
            using var result = run.Loss.Compute(batch);
            optimizer.zero_grad();
            result.Loss.backward();
            optimizer.step();
            lossCurve[step] = result.Loss.ToDouble();
            if (step == 0) firstLoss = lossCurve[0];
            watch.Stop();
            rewardCurve[step + 1] = ExpectedReward(() => PolicyLogits(theta), rewards);
            if ((step + 1) % Math.Max(1, o.Steps / 10) == 0) progress(".");
            watch.Start();
        }
        watch.Stop();

        using var final = NewDisposeScope();
        var policy = nn.functional.softmax(PolicyLogits(theta.detach()), 1);
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

    private static double ExpectedReward(Func<Tensor> policyLogits, Tensor rewards)
    {
        using var _ = NewDisposeScope();
        using var __ = no_grad();
        return (nn.functional.softmax(policyLogits(), 1) * rewards).sum(1).mean().ToDouble();
    }

    private static float[] Flat<T>(T[,] a) where T : IConvertible
    {
        var r = new float[a.Length];
        int i = 0;
        foreach (var v in a) r[i++] = Convert.ToSingle(v, System.Globalization.CultureInfo.InvariantCulture);
        return r;
    }
}
