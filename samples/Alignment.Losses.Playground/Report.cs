using System.Globalization;
using System.Text;

namespace Alignment.Losses.Playground;

internal static class Report
{
    public static string Table(IReadOnlyList<RunResult> results)
    {
        var sb = new StringBuilder();
        sb.AppendLine($"{"loss",-18} {"setting",-30} {"loss 0",9} {"loss end",9} {"reward",7} {"ref rew",7} {"win vs ref",10} {"KL",6} {"TV to opt",9} {"TV clean",8} {"train s",7}");
        sb.AppendLine(new string('-', 133));
        foreach (var (r, i) in results.Select((r, i) => (r, i)))
        {
            if (i == 0 || results[i - 1].Group != r.Group) sb.AppendLine($"[{r.Group}]");
            string dist = r.DistanceToOptimum is { } d ? d.ToString("F4", CultureInfo.InvariantCulture) : "-";
            string clean = r.DistanceToCleanDpo is { } c ? c.ToString("F4", CultureInfo.InvariantCulture) : "-";
            sb.AppendLine(string.Create(CultureInfo.InvariantCulture,
                $"{r.Name,-18} {r.Setting,-30} {r.InitialLoss,9:G4} {r.FinalLoss,9:G4} {r.Reward,7:F3} {r.ReferenceReward,7:F3} {r.WinRate,10:F3} {r.Kl,6:F3} {dist,9} {clean,8} {r.Seconds,7:F2}"));
        }
        return sb.ToString();
    }

    public const string Legend = """
        reward: E over prompts of E_{y~pi}[r(y)]; ref rew: the same for the reference (initial) policy.
        win vs ref: P(y ~ pi beats y' ~ pi_ref) under the hidden Bradley-Terry rewards (0.5 = no better than the reference).
        KL: mean KL(pi || pi_ref) over prompts. TV to opt: mean total-variation distance to the optimum the paper proves
        where its assumptions hold (clean labels: DPO -> pi_ref exp(r / beta), SPO's preference term -> softmax(r / alpha);
        labels flipped at rate eps: robust DPO with that eps -> the clean DPO optimum); '-' where none applies.
        TV clean: distance of the DPO family to the clean-label DPO optimum pi_ref exp(r / beta). With --label-noise, DPO
        fits the noisy preferences and drifts from it, while robust DPO (eps = the noise rate) is unbiased and stays near it.
        reference_free: no reference log-probs (nothing anchors these to pi_ref). unpaired: each pair split into a desirable
        (chosen) and an undesirable (rejected) example, as TRL unpairs paired data. reward_model: a Bradley-Terry reward
        table r_hat fitted to the pairs; its policy is the RLHF optimum pi_ref exp(r_hat / beta), so it shares DPO's optimum.
        train s: seconds spent in the training steps (loss, backward, optimiser), without set-up and evaluation.
        """;

    /// <summary>
    /// The runs ranked by win-rate against the reference, with the KL each paid for it and the reward gained per nat of KL
    /// (the quantity the KL-regularised objective trades): the table's answer to "which loss should I use here?".
    /// </summary>
    public static string Ranking(IReadOnlyList<RunResult> results)
    {
        var sb = new StringBuilder("Ranking by win-rate against the reference (higher is better); KL(pi || pi_ref) is what each paid for it:\n");
        int rank = 1;
        foreach (var r in results.OrderByDescending(r => r.WinRate).ThenBy(r => r.Kl))
        {
            double gain = r.Reward - r.ReferenceReward;
            string perKl = r.Kl > 1e-9 ? (gain / r.Kl).ToString("F3", CultureInfo.InvariantCulture) : "-";
            sb.AppendLine(string.Create(CultureInfo.InvariantCulture,
                $"{rank++,3}. {r.Name,-18} win {r.WinRate:F3}  reward +{gain:F3}  KL {r.Kl:F3}  reward gain per unit KL {perKl,7}  [{r.Group}]"));
        }
        var best = results.MaxBy(r => r.WinRate);
        var frugal = results.Where(r => r.Kl > 1e-9).MaxBy(r => (r.Reward - r.ReferenceReward) / r.Kl);
        if (best is not null)
            sb.AppendLine(string.Create(CultureInfo.InvariantCulture,
                $"Highest win-rate: {best.Name}. Most reward per unit KL: {frugal?.Name ?? "-"}. The reward_vs_kl.png plot shows the whole trade-off."));
        return sb.ToString();
    }

    public static void WriteCsv(IReadOnlyList<RunResult> results, string dir)
    {
        var table = new StringBuilder("loss,setting,initial_loss,final_loss,reward,reference_reward,win_rate,kl,tv_to_optimum,tv_to_clean_dpo,seconds,group\n");
        foreach (var r in results)
            table.AppendLine(string.Create(CultureInfo.InvariantCulture,
                $"{r.Name},\"{r.Setting}\",{r.InitialLoss:R},{r.FinalLoss:R},{r.Reward:R},{r.ReferenceReward:R},{r.WinRate:R},{r.Kl:R},{(r.DistanceToOptimum is { } d ? d.ToString("R", CultureInfo.InvariantCulture) : "")},{(r.DistanceToCleanDpo is { } c ? c.ToString("R", CultureInfo.InvariantCulture) : "")},{r.Seconds:R},{r.Group}"));
        File.WriteAllText(Path.Combine(dir, "results.csv"), table.ToString());

        var curves = new StringBuilder("loss,step,expected_reward,training_loss\n");
        foreach (var r in results)
            for (int s = 0; s < r.RewardCurve.Length; s++)
                curves.AppendLine(string.Create(CultureInfo.InvariantCulture,
                    $"{r.Name},{s},{r.RewardCurve[s]:R},{(s > 0 ? r.LossCurve[s - 1].ToString("R", CultureInfo.InvariantCulture) : "")}"));
        File.WriteAllText(Path.Combine(dir, "curves.csv"), curves.ToString());
    }
}
