using System.Diagnostics;
using System.Globalization;
using System.Text;
using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Playground;

/// <summary>An online RL run: a policy-gradient objective and the advantage estimator it trains with.</summary>
internal sealed record RlRunSpec(string Name, ITokenLoss Loss, string Setting, Func<Tensor, GroupIds, AdvantageResult> Advantages);

internal sealed record RlResult(string Name, string Setting, double Reward, double ReferenceReward, double ExactMatch, double ReferenceExactMatch,
    double Kl, double Seconds, double[] RewardCurve);

/// <summary>
/// The playground's RL group: a verifiable-reward task on a small autoregressive tabular policy. Prompt p's answer is a
/// short digit string s_p (1 to 4 digits, then EOS); a completion is sampled token by token from pi(y_t | p, t) until
/// EOS or 5 tokens, and scored by rule: 1 for the exact answer, else the fraction of answer positions (EOS included)
/// it got right. Each step samples G completions for each of B prompts, computes the advantages, and takes two
/// optimisation steps on them (the second with the sampling log-probs as l_old, so the clip is active).
/// </summary>
internal static class RlTrainer
{
    private const int Prompts = 24, MaxTokens = 5, Vocab = 6, Eos = Vocab - 1, Group = 8, BatchPrompts = 8;

    public static IEnumerable<RlRunSpec> Catalogue()
    {
        static AdvantageResult Grpo(Tensor r, GroupIds g) => Advantages.Grpo(r, g);
        yield return new("grpo", PolicyLosses.Create("grpo"), "clip 0.2, seq-mean-token-mean", Grpo);
        yield return new("dapo", PolicyLosses.Create("dapo"), "clip 0.2/0.28, token mean", Grpo);
        yield return new("dr_grpo", PolicyLosses.Create("dr_grpo", maxCompletionLength: MaxTokens), "A = r - mean, S * L_max", Advantages.DrGrpo);
        yield return new("gspo", PolicyLosses.Create("gspo"), "sequence ratio, clip 3e-4/4e-4", Grpo);
        yield return new("cispo", PolicyLosses.Create("cispo"), "IS weight capped at 5", Grpo);
        yield return new("sapo", PolicyLosses.Create("sapo"), "soft gate, tau 1/1.05", Grpo);
        yield return new("gmpo", PolicyLosses.Create("gmpo"), "geometric mean, log clip 0.4", Grpo);
        yield return new("rloo", PolicyLosses.Create("rloo"), "leave-one-out baseline", (r, g) => Advantages.Rloo(r, g));
        yield return new("reinforce", PolicyLosses.Create("reinforce"), "-A l, GRPO advantages", Grpo);
        yield return new("grpo_kl", PolicyLosses.Create("grpo", kl: new KlPenalty(0.1)), "grpo + 0.1 k3 KL", Grpo);
    }

    private static int[] Answer(int p)
    {
        int n = 1 + p % 4;
        return Enumerable.Range(0, n).Select(t => (p + 2 * t) % Eos).Append(Eos).ToArray();
    }

    private static double Reward(int p, int[] y)
    {
        var s = Answer(p);
        if (y.SequenceEqual(s)) return 1;
        int correct = 0;
        for (int t = 0; t < Math.Min(y.Length, s.Length); t++) if (y[t] == s[t]) correct++;
        return (double)correct / s.Length * 0.8;
    }

    /// <summary>Samples one completion per (prompt) row from the policy's probabilities [P, T, V] (host copy).</summary>
    private static int[] Sample(float[] probs, int p, Random rng, bool greedy = false)
    {
        var y = new List<int>();
        for (int t = 0; t < MaxTokens; t++)
        {
            int offset = (p * MaxTokens + t) * Vocab, token = Vocab - 1;
            if (greedy)
            {
                token = 0;
                for (int v = 1; v < Vocab; v++) if (probs[offset + v] > probs[offset + token]) token = v;
            }
            else
            {
                double u = rng.NextDouble(), c = 0;
                for (int v = 0; v < Vocab; v++) { c += probs[offset + v]; if (u < c) { token = v; break; } }
            }
            y.Add(token);
            if (token == Eos) break;
        }
        return y.ToArray();
    }

    private static float[] Probabilities(Tensor logits)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        return nn.functional.softmax(logits, 2).cpu().data<float>().ToArray();
    }

    private static (double Reward, double Exact, double Kl) Evaluate(Tensor logits, Tensor referenceLogits, int seed)
    {
        var rng = new Random(seed);
        var probs = Probabilities(logits);
        var refProbs = Probabilities(referenceLogits);
        double reward = 0, kl = 0;
        int samples = 64;
        for (int p = 0; p < Prompts; p++)
            for (int k = 0; k < samples; k++)
            {
                var y = Sample(probs, p, rng);
                reward += Reward(p, y);
                for (int t = 0; t < y.Length; t++)
                {
                    int at = (p * MaxTokens + t) * Vocab + y[t];
                    kl += Math.Log(probs[at]) - Math.Log(refProbs[at]);     // k1 on samples of pi: unbiased sequence KL
                }
            }
        double exact = Enumerable.Range(0, Prompts).Average(p => Sample(probs, p, rng, greedy: true).SequenceEqual(Answer(p)) ? 1.0 : 0.0);
        return (reward / (Prompts * samples), exact, kl / (Prompts * samples));
    }

    public static RlResult Train(RlRunSpec run, PlaygroundOptions o, Device device, Action<string> progress)
    {
        manual_seed(o.Seed);
        var rng = new Random(o.Seed);
        using var outer = NewDisposeScope();
        var initial = (randn(Prompts, MaxTokens, Vocab) * 0.1f).to(device);
        var theta = new TorchSharp.Modules.Parameter(initial.clone(), requires_grad: true);
        var optimizer = optim.Adam(new[] { theta }, o.LearningRate);
        var referenceLogProbs = nn.functional.log_softmax(initial, 2);
        var (refReward, refExact, _) = Evaluate(initial, initial, o.Seed + 1);
        int steps = Math.Max(1, o.Steps / 2);
        var curve = new double[steps + 1];
        curve[0] = refReward;
        var groups = GroupIds.Contiguous(Group);
        var watch = Stopwatch.StartNew();
        for (int step = 0; step < steps; step++)
        {
            using var scope = NewDisposeScope();
            var probs = Probabilities(theta);
            var prompts = Enumerable.Range(0, BatchPrompts).Select(_ => rng.Next(Prompts)).ToArray();
            var rows = prompts.SelectMany(p => Enumerable.Range(0, Group).Select(_ => (Prompt: p, Y: Sample(probs, p, rng)))).ToArray();
            int n = rows.Length;
            var tokens = new long[n * MaxTokens];
            var valid = new bool[n * MaxTokens];
            for (int i = 0; i < n; i++)
                for (int t = 0; t < rows[i].Y.Length; t++) { tokens[i * MaxTokens + t] = rows[i].Y[t]; valid[i * MaxTokens + t] = true; }
            var tokenTensor = tensor(tokens, new long[] { n, MaxTokens }).to(device);
            var mask = tensor(valid, new long[] { n, MaxTokens }).to(device);
            var promptIndex = tensor(rows.Select(r => (long)r.Prompt).ToArray()).to(device);
            using var advantages = run.Advantages(tensor(rows.Select(r => Reward(r.Prompt, r.Y)).ToArray(), dtype: ScalarType.Float32).to(device), groups);
            Tensor TokenLogProbs(Tensor logProbTable) => logProbTable.index_select(0, promptIndex).gather(2, tokenTensor.unsqueeze(2)).squeeze(2);
            var reference = TokenLogProbs(referenceLogProbs);
            Tensor? old = null;
            for (int inner = 0; inner < 2; inner++)
            {
                var logp = TokenLogProbs(nn.functional.log_softmax(theta, 2));
                old ??= logp.detach().clone();                               // the sampling policy's log-probs
                using var result = run.Loss.Compute(new TokenBatch(logp, mask)
                {
                    OldLogProbs = inner == 0 ? null : old, ReferenceLogProbs = reference, Advantages = advantages.Values,
                });
                optimizer.zero_grad();
                result.Backward();
                optimizer.step();
            }
            watch.Stop();
            curve[step + 1] = Evaluate(theta, initial, o.Seed + 2 + step).Reward;
            if ((step + 1) % Math.Max(1, steps / 10) == 0) progress(".");
            watch.Start();
        }
        watch.Stop();
        var (reward, exact, kl) = Evaluate(theta, initial, o.Seed + 1);
        return new RlResult(run.Name, run.Setting, reward, refReward, exact, refExact, kl, watch.Elapsed.TotalSeconds, curve);
    }

    public static string Table(IReadOnlyList<RlResult> results)
    {
        var sb = new StringBuilder();
        sb.AppendLine($"{"loss",-18} {"setting",-32} {"reward",7} {"ref rew",7} {"exact",6} {"ref ex",6} {"KL",6} {"train s",7}");
        sb.AppendLine(new string('-', 98));
        sb.AppendLine("[rl]");
        foreach (var r in results)
            sb.AppendLine(string.Create(CultureInfo.InvariantCulture,
                $"{r.Name,-18} {r.Setting,-32} {r.Reward,7:F3} {r.ReferenceReward,7:F3} {r.ExactMatch,6:F2} {r.ReferenceExactMatch,6:F2} {r.Kl,6:F3} {r.Seconds,7:F2}"));
        sb.AppendLine("""
            RL group: a verifiable-reward task (spell each prompt's digit answer, then EOS; reward 1 for the exact answer, else 0.8 x the
            fraction of positions right). reward: mean reward of sampled completions; exact: greedy decoding's exact-match rate over the
            24 prompts; KL: sequence KL(pi || pi_ref) estimated on samples (k1). G = 8 completions for each of 8 prompts per step.
            """);
        return sb.ToString();
    }

    public static void WriteCsv(IReadOnlyList<RlResult> results, string dir)
    {
        var lines = new List<string> { "loss,setting,reward,reference_reward,exact_match,reference_exact_match,kl,train_seconds" };
        lines.AddRange(results.Select(r => string.Create(CultureInfo.InvariantCulture,
            $"{r.Name},\"{r.Setting}\",{r.Reward:G6},{r.ReferenceReward:G6},{r.ExactMatch:G6},{r.ReferenceExactMatch:G6},{r.Kl:G6},{r.Seconds:G4}")));
        File.WriteAllLines(Path.Combine(dir, "rl_results.csv"), lines);
    }

    public static IReadOnlyList<string> Plot(IReadOnlyList<RlResult> results, string dir)
    {
        if (results.Count == 0) return Array.Empty<string>();
        return new[]
        {
            Plots.Curves(results.Select(r => (r.Name, r.RewardCurve)).ToList(), "RL group: mean reward of sampled completions during training",
                "generation step (two optimiser steps each)", "mean reward", dir, "reward_curves_rl.png"),
            Plots.TradeOff(results.Select(r => (r.Name, r.Kl, r.Reward - r.ReferenceReward)).ToList(), "RL group: reward gained vs KL to the reference",
                "sequence KL(pi || pi_ref), estimated on samples", dir, "reward_vs_kl_rl.png"),
        };
    }
}
