using Alignment.Losses;
using ScottPlot;
using TorchSharp;
using static TorchSharp.torch;

// Plots each loss and its derivative against the pair margin h (reference-free, l_w = h, l_l = 0), computed by the
// library itself through autograd, at default hyperparameters. Usage: dotnet run --project samples/Alignment.Losses.LossPlots -- [output folder]
var dir = args.Length > 0 ? args[0] : Path.Combine("docs", "plots");
Directory.CreateDirectory(dir);
const int n = 801;
double[] h = Enumerable.Range(0, n).Select(i => -40.0 + 80.0 * i / (n - 1)).ToArray();

var cases = new (string File, string Title, Func<PreferenceLogps, PreferenceLossResult> Loss)[]
{
    ("dpo", "DPO (beta 0.1)", p => DpoLoss.Compute(p)),
    ("cdpo", "cDPO (beta 0.1, eps 0.1)", p => ConservativeDpoLoss.Compute(p)),
    ("robust_dpo", "Robust DPO (beta 0.1, eps 0.1)", p => RobustDpoLoss.Compute(p)),
    ("ipo", "IPO (beta 0.1, summed log-probs)", p => IpoLoss.Compute(p)),
    ("hinge", "Hinge (beta 0.1)", p => HingeLoss.Compute(p)),
    ("spo", "SPO preference term (alpha 1)", p => SpoLoss.Compute(p, null, new SpoOptions { KlWeight = 0 })),
    ("odpo", "ODPO (beta 0.1, alpha 1, score gap e: offset 1)", p => OdpoLoss.Compute(p, null,
        new ResponseScores(full(n, Math.E + 1, dtype: ScalarType.Float64), ones(n, dtype: ScalarType.Float64)))),
    ("sppo", "SPPO (beta 0.1, p_w 0.8, p_l 0.2, u_l = 0)", p => SppoLoss.Compute(p, null,
        SppoWinRates.Individual(full(n, 0.8, dtype: ScalarType.Float64), full(n, 0.2, dtype: ScalarType.Float64)), new SppoOptions { Beta = 0.1 })),
    ("exo_pair", "EXO (beta 0.1, eps 1e-3)", p => ExoPairLoss.Compute(p)),
    ("nca_pair", "NCA pairwise (beta 0.1, u_l = 0)", p => NcaPairLoss.Compute(p)),
    ("bco_pair", "BCO pairwise (beta 0.1, u_l = 0)", p => BcoPairLoss.Compute(p)),
    ("apo_zero", "APO-zero (beta 0.1, u_l = 0)", p => ApoLoss.Compute(p)),
    ("apo_down", "APO-down (beta 0.1, u_l = 0: the terms cancel)", p => ApoLoss.Compute(p, null, new ApoOptions { Anchor = ApoAnchor.Down })),
    ("discopop", "DiscoPOP (beta 0.1, tau 0.05)", p => DiscoPopLoss.Compute(p)),
    ("dpo_js", "DPO with the Jensen-Shannon score map (beta 0.1)", p => DpoLoss.Compute(p, null, new DpoOptions { ScoreMap = ScoreMap.JensenShannon })),
};

foreach (var (file, title, compute) in cases)
{
    using var scope = NewDisposeScope();
    var chosen = tensor(h, dtype: ScalarType.Float64).requires_grad_(true);
    var rejected = zeros(n, dtype: ScalarType.Float64);
    using var result = compute(new PreferenceLogps(chosen, rejected));
    // per-example losses; d(sum of per-example losses)/d l_w,i = dL_i/dh_i since the other rows do not depend on h_i
    result.PerExample.sum().backward();
    var loss = result.PerExample.detach().data<double>().ToArray();
    var grad = chosen.grad!.data<double>().ToArray();

    Draw(file, title, loss, grad);
}

// RPO couples the rows of a batch, so each margin gets its own batch: 4 pairs with identical prompts (W = 1/4), every
// chosen at l_w = h and every rejected at 0. The derivative is that of the loss when all four margins move together.
{
    var loss = new double[n];
    var grad = new double[n];
    for (int i = 0; i < n; i++)
    {
        using var scope = NewDisposeScope();
        var chosen = full(4, h[i], dtype: ScalarType.Float64).requires_grad_(true);
        using var result = RpoLoss.Compute(new PreferenceLogps(chosen, zeros(4, dtype: ScalarType.Float64)), null, ones(4, 8));
        result.Loss.backward();
        loss[i] = result.Loss.ToDouble();
        grad[i] = chosen.grad!.sum().ToDouble();
    }
    Draw("rpo_identical_prompts", "RPO, 4 pairs with identical prompts (beta 0.1, W = 1/4)", loss, grad);
}

void Draw(string file, string title, double[] loss, double[] grad)
{
    var plot = new Plot();
    var l = plot.Add.Scatter(h, loss);
    l.LegendText = "loss (left axis)";
    l.MarkerSize = 0;
    l.LineWidth = 2;
    l.Color = Colors.Blue;
    // the gradient on its own (right) axis: its scale differs from the loss's by orders of magnitude for most losses
    var g = plot.Add.Scatter(h, grad);
    g.LegendText = "d loss / d h (right axis)";
    g.MarkerSize = 0;
    g.LineWidth = 2;
    g.Color = Colors.OrangeRed;
    g.LinePattern = LinePattern.Dashed;
    g.Axes.YAxis = plot.Axes.Right;
    var zero = plot.Add.HorizontalLine(0, 1, Colors.OrangeRed.WithAlpha(0.5));
    zero.Axes.YAxis = plot.Axes.Right;
    zero.LinePattern = LinePattern.Dotted;
    plot.Axes.Left.Label.Text = "loss";
    plot.Axes.Left.Label.ForeColor = Colors.Blue;
    plot.Axes.Right.Label.Text = "d loss / d h";
    plot.Axes.Right.Label.ForeColor = Colors.OrangeRed;
    plot.Title(title);
    plot.XLabel("margin h = u_w - u_l");
    plot.ShowLegend(Edge.Bottom);                                   // outside the data area: it never hides a curve
    plot.SavePng(Path.Combine(dir, file + ".png"), 640, 430);
    Console.WriteLine($"wrote {Path.Combine(dir, file + ".png")}");
}
