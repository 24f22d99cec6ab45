using ScottPlot;

namespace Alignment.Losses.Playground;

internal static class Plots
{
    /// <summary>Writes the PNG plots (training curves; learned vs optimal distributions) and returns their file names.</summary>
    public static IReadOnlyList<string> Write(IReadOnlyList<RunResult> results, SyntheticWorld world, string dir)
    {
        var written = new List<string>();
        if (results.Count == 0) return written;

        var curves = new Plot();
        foreach (var r in results)
        {
            var line = curves.Add.Scatter(Enumerable.Range(0, r.RewardCurve.Length).Select(i => (double)i).ToArray(), r.RewardCurve);
            line.LegendText = r.Name;
            line.MarkerSize = 0;
            line.LineWidth = 1.5f;
        }
        curves.Title("Expected reward of the policy during training");
        curves.XLabel("step");
        curves.YLabel("E_pi[r], averaged over prompts");
        curves.ShowLegend(ScottPlot.Alignment.UpperLeft);
        curves.SavePng(Path.Combine(dir, "reward_curves.png"), 900, 560);
        written.Add("reward_curves.png");

        // learned vs optimal distribution on the first prompt, for the losses with a proven optimum
        int k = world.Candidates;
        var dist = new Plot();
        double[] xs = Enumerable.Range(0, k).Select(i => (double)i).ToArray();
        foreach (var r in results.Where(r => r.OptimalPolicy is not null))
        {
            var learned = dist.Add.Scatter(xs, r.FinalPolicy.Take(k).Select(v => (double)v).ToArray());
            learned.LegendText = $"{r.Name}: learned";
            learned.MarkerSize = 8;
            var optimum = dist.Add.Scatter(xs, r.OptimalPolicy!.Take(k).Select(v => (double)v).ToArray());
            optimum.LegendText = $"{r.Name}: optimum";
            optimum.LinePattern = LinePattern.Dashed;
            optimum.Color = learned.Color;
            optimum.MarkerShape = MarkerShape.OpenCircle;
        }
        dist.Title("Prompt 0: learned policy vs the optimum the paper proves");
        dist.XLabel("candidate response");
        dist.YLabel("probability");
        dist.ShowLegend(ScottPlot.Alignment.UpperRight);
        dist.SavePng(Path.Combine(dir, "learned_vs_optimal.png"), 900, 560);
        written.Add("learned_vs_optimal.png");
        return written;
    }
}
