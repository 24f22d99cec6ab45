using ScottPlot;

namespace Alignment.Losses.Playground;

internal static class Plots
{
    /// <summary>Fourteen clearly different colours: every series of a plot gets its own (no palette wrap-around at 12).</summary>
    private static readonly Color[] Palette =
    {
        Color.FromHex("#1f77b4"), Color.FromHex("#ff7f0e"), Color.FromHex("#2ca02c"), Color.FromHex("#d62728"),
        Color.FromHex("#9467bd"), Color.FromHex("#8c564b"), Color.FromHex("#e377c2"), Color.FromHex("#7f7f7f"),
        Color.FromHex("#bcbd22"), Color.FromHex("#17becf"), Color.FromHex("#393b79"), Color.FromHex("#637939"),
        Color.FromHex("#e7298a"), Color.FromHex("#000000"),
    };

    /// <summary>Marker shapes, cycled independently of the colours, so two series never share both.</summary>
    private static readonly MarkerShape[] Markers =
    {
        MarkerShape.FilledCircle, MarkerShape.FilledSquare, MarkerShape.FilledTriangleUp, MarkerShape.FilledDiamond,
        MarkerShape.FilledTriangleDown, MarkerShape.OpenCircle, MarkerShape.OpenSquare, MarkerShape.OpenTriangleUp,
        MarkerShape.OpenDiamond, MarkerShape.OpenTriangleDown, MarkerShape.Cross, MarkerShape.Eks, MarkerShape.Asterisk,
    };

    /// <summary>Writes the PNG plots (training curves; learned vs optimal distributions) and returns their file names.</summary>
    public static IReadOnlyList<string> Write(IReadOnlyList<RunResult> results, SyntheticWorld world, string dir)
    {
        var written = new List<string>();
        if (results.Count == 0) return written;

        // one curve plot per group: each stays readable (at most a dozen series), and DPO is drawn in every one as the baseline
        var baseline = results.FirstOrDefault(r => r.Name == "dpo");
        foreach (var group in results.GroupBy(r => r.Group))
        {
            var curves = new Plot();
            var series = group.ToList();
            if (baseline is not null && !series.Contains(baseline)) series.Insert(0, baseline);
            for (int s = 0; s < series.Count; s++)
            {
                var r = series[s];
                // about 40 points per curve: enough for the shape, few enough that each marker is readable
                int stride = Math.Max(1, (r.RewardCurve.Length - 1) / 40);
                var steps = Enumerable.Range(0, r.RewardCurve.Length).Where(i => i % stride == 0 || i == r.RewardCurve.Length - 1).ToArray();
                var line = curves.Add.Scatter(steps.Select(i => (double)i).ToArray(), steps.Select(i => r.RewardCurve[i]).ToArray());
                Style(line, s, ReferenceEquals(r, baseline) && group.Key != r.Group ? "dpo (baseline)" : r.Name);
            }
            curves.Title($"Expected reward of the policy during training: {group.Key}");
            curves.XLabel("step");
            curves.YLabel("E_pi[r], averaged over prompts");
            curves.ShowLegend(Edge.Right);                              // outside the data area: it never hides a curve
            var file = $"reward_curves_{group.Key}.png";
            curves.SavePng(Path.Combine(dir, file), 1100, 620);
            written.Add(file);
        }

        // the trade-off every KL-regularised objective makes: reward gained against KL(pi || pi_ref) paid, one point per run
        written.Add(TradeOff(results.Select(r => (r.Name, r.Kl, r.Reward - r.ReferenceReward)).ToList(),
            "Reward gained vs KL to the reference, one point per loss (up and to the left is better)", "KL(pi || pi_ref), mean over prompts",
            dir, "reward_vs_kl.png"));

        // learned vs optimal distribution on the first prompt, for the losses with a proven optimum; with label noise the
        // DPO family is drawn against the clean-label DPO optimum, which robust DPO keeps and DPO does not
        int k = world.Candidates;
        var shown = results.Where(r => r.OptimalPolicy is not null || (world.LabelNoise > 0 && r.DistanceToCleanDpo is not null)).ToList();
        var dist = new Plot();
        double[] xs = Enumerable.Range(0, k).Select(i => (double)i).ToArray();
        var drawnOptima = new HashSet<string>();
        for (int s = 0; s < shown.Count; s++)
        {
            var r = shown[s];
            var learned = dist.Add.Scatter(xs, r.FinalPolicy.Take(k).Select(v => (double)v).ToArray());
            Style(learned, results.ToList().IndexOf(r), $"{r.Name}: learned");
            if (r.OptimalPolicy is null) continue;
            var values = r.OptimalPolicy.Take(k).Select(v => (double)v).ToArray();
            var key = string.Join(",", values.Select(v => v.ToString("F4", System.Globalization.CultureInfo.InvariantCulture)));
            if (!drawnOptima.Add(key)) continue;                          // robust DPO's optimum is DPO's: draw it once
            var optimum = dist.Add.Scatter(xs, values);
            optimum.LegendText = $"optimum of {r.Name}{(world.LabelNoise > 0 && r.Name == "robust_dpo" ? " (= clean DPO's)" : "")}";
            optimum.LinePattern = LinePattern.Dashed;
            optimum.Color = learned.Color;
            optimum.MarkerShape = MarkerShape.OpenCircle;
            optimum.MarkerSize = 12;
        }
        dist.Title(world.LabelNoise > 0
            ? $"Prompt 0 with {world.LabelNoise:P0} of labels flipped: learned policies vs the clean-label optimum"
            : "Prompt 0: learned policy vs the optimum the paper proves");
        dist.XLabel("candidate response");
        dist.YLabel("probability");
        dist.ShowLegend(Edge.Right);
        dist.SavePng(Path.Combine(dir, "learned_vs_optimal.png"), 1100, 620);
        written.Add("learned_vs_optimal.png");
        return written;
    }

    /// <summary>Reward gained against KL paid, one labelled point per run; returns the file name.</summary>
    internal static string TradeOff(IReadOnlyList<(string Name, double Kl, double Gain)> points, string title, string xLabel, string dir, string file)
    {
        var plot = new Plot();
        for (int s = 0; s < points.Count; s++)
        {
            var (name, kl, gain) = points[s];
            var point = plot.Add.Scatter(new[] { kl }, new[] { gain });
            Style(point, s, name);
            point.MarkerSize = 9;
            var label = plot.Add.Text(name, kl, gain);
            label.LabelFontSize = 10;
            label.OffsetX = 6;
        }
        plot.Title(title);
        plot.XLabel(xLabel);
        plot.YLabel("E_pi[r] - E_pi_ref[r]");
        plot.ShowLegend(Edge.Right);
        plot.SavePng(Path.Combine(dir, file), 1100, 620);
        return file;
    }

    /// <summary>One curve per run (about 40 points each); returns the file name.</summary>
    internal static string Curves(IReadOnlyList<(string Name, double[] Values)> series, string title, string xLabel, string yLabel, string dir, string file)
    {
        var plot = new Plot();
        for (int s = 0; s < series.Count; s++)
        {
            var (name, values) = series[s];
            int stride = Math.Max(1, (values.Length - 1) / 40);
            var steps = Enumerable.Range(0, values.Length).Where(i => i % stride == 0 || i == values.Length - 1).ToArray();
            Style(plot.Add.Scatter(steps.Select(i => (double)i).ToArray(), steps.Select(i => values[i]).ToArray()), s, name);
        }
        plot.Title(title);
        plot.XLabel(xLabel);
        plot.YLabel(yLabel);
        plot.ShowLegend(Edge.Right);
        plot.SavePng(Path.Combine(dir, file), 1100, 620);
        return file;
    }

    private static void Style(ScottPlot.Plottables.Scatter series, int index, string label)
    {
        series.LegendText = label;
        series.Color = Palette[index % Palette.Length];
        series.MarkerShape = Markers[index % Markers.Length];
        series.MarkerSize = 6;
        series.LineWidth = 1.5f;
    }
}
