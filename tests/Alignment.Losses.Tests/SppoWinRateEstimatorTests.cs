using Alignment.Losses;

namespace Alignment.Losses.Tests;

public class SppoWinRateEstimatorTests
{
    static double S(double x) => 1 / (1 + Math.Exp(-x));

    [Fact]
    public void Win_rates_average_sigmoid_score_differences_with_self_comparison_and_pick_best_and_worst()
    {
        using var scope = NewDisposeScope();
        // prompt 0: scores 0, 1, 2; prompt 1: 3, -1, 0.5
        var sel = SppoWinRateEstimator.FromScores(tensor(new float[] { 0, 1, 2, 3, -1, 0.5f }).reshape(2, 3));
        double[] expected0 = { (0.5 + S(-1) + S(-2)) / 3, (S(1) + 0.5 + S(-1)) / 3, (S(2) + S(1) + 0.5) / 3 };
        double[] expected1 = { (0.5 + S(4) + S(2.5)) / 3, (S(-4) + 0.5 + S(-1.5)) / 3, (S(-2.5) + S(1.5) + 0.5) / 3 };
        var all = TensorUtil.Values(sel.AllWinRates.flatten());
        for (int k = 0; k < 3; k++)
        {
            Assert.Equal(expected0[k], all[k], 6);
            Assert.Equal(expected1[k], all[3 + k], 6);
        }
        Assert.Equal(new long[] { 2, 0 }, sel.ChosenIndex.data<long>().ToArray());
        Assert.Equal(new long[] { 0, 1 }, sel.RejectedIndex.data<long>().ToArray());
        Assert.Equal(expected0[2], TensorUtil.Values(sel.WinRates.Chosen!)[0], 6);
        Assert.Equal(expected1[1], TensorUtil.Values(sel.WinRates.Rejected!)[1], 6);
    }

    [Fact]
    public void Pairwise_logits_ignore_the_diagonal_and_match_scores_when_consistent()
    {
        using var scope = NewDisposeScope();
        var s = tensor(new float[] { 0.2f, -1, 1.3f, 0.7f }).reshape(1, 4);
        var logits = (s.unsqueeze(2) - s.unsqueeze(1)).clone();
        logits.diagonal(0, 1, 2).fill_(123);                        // garbage on the diagonal is ignored
        var a = SppoWinRateEstimator.FromScores(s);
        var b = SppoWinRateEstimator.FromPairwiseLogits(logits);
        Assert.True(allclose(a.AllWinRates, b.AllWinRates, 1e-6, 1e-6));
    }
}
