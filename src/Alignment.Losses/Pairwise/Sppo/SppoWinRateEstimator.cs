using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Chosen/rejected selection and win-rates for one SPPO training pair per prompt.</summary>
/// <param name="ChosenIndex">[P] int64 index of the candidate with the highest win-rate (the chosen response).</param>
/// <param name="RejectedIndex">[P] int64 index of the candidate with the lowest win-rate (the rejected response).</param>
/// <param name="WinRates">p_w, p_l of the selected candidates, for <see cref="PreferenceBatch.WinRates"/>.</param>
/// <param name="AllWinRates">[P, K] estimated win-rate of every candidate against the policy.</param>
public sealed record SppoPairSelection(Tensor ChosenIndex, Tensor RejectedIndex, SppoWinRates WinRates, Tensor AllWinRates);

/// <summary>
/// Turns preference scores of K candidates per prompt (sampled from the current policy) into SPPO win-rates, the way
/// the authors do: P(y_k beats pi) ≈ (1/K) sum_j sigmoid(score difference between k and j), the self-comparison
/// (0.5) included; the chosen response is the candidate with the highest win-rate, the rejected one the lowest.
/// </summary>
public static class SppoWinRateEstimator
{
    /// <summary>
    /// From per-candidate scalar scores s [P, K] (e.g. a reward model): P(k beats j) = sigmoid(s_k - s_j). The differences
    /// are taken in the scores' own precision (float64 stays float64, others in float32), so scores beyond float32's range
    /// still give exact probabilities; the win-rates come back in that dtype.
    /// </summary>
    /// <exception cref="ArgumentException">scores is not a floating [P, K] tensor, is empty, or holds NaN/Inf.</exception>
    public static SppoPairSelection FromScores(Tensor scores)
    {
        Guard.Usable(scores, nameof(scores));
        Guard.Rank(scores, 2, nameof(scores), "of candidate scores [prompts, K]");
        Guard.Floating(scores, nameof(scores));
        Guard.NotEmpty(scores, nameof(scores));
        return Native.Run("SppoWinRateEstimator.FromScores", () => $"scores {Native.Describe(scores)}", () =>
        {
            using var scope = NewDisposeScope();
            Guard.AllFinite((scores, nameof(scores)));
            using var noGrad = no_grad();
            var s = Numerics.As(scores.detach(), Numerics.DTypeFor(scores));
            var logits = s.unsqueeze(2) - s.unsqueeze(1);   // [P, K, K]: k against j (an overflow to +-Inf gives exactly 1 or 0)
            return Select(torch.sigmoid(logits), scope);
        });
    }

    /// <summary>
    /// From a pairwise logit matrix L [P, K, K] (e.g. PairRM): P(k beats j) = sigmoid(L_kj). The diagonal is ignored and
    /// taken as 0.5. Computed in float64 for float64 logits, float32 otherwise.
    /// </summary>
    /// <exception cref="ArgumentException">pairwiseLogits is not a floating [P, K, K] tensor, is empty, or holds NaN/Inf.</exception>
    public static SppoPairSelection FromPairwiseLogits(Tensor pairwiseLogits)
    {
        Guard.Usable(pairwiseLogits, nameof(pairwiseLogits));
        Guard.Rank(pairwiseLogits, 3, nameof(pairwiseLogits), "of pairwise logits [prompts, K, K]");
        Guard.Floating(pairwiseLogits, nameof(pairwiseLogits));
        Guard.NotEmpty(pairwiseLogits, nameof(pairwiseLogits));
        if (pairwiseLogits.shape[1] != pairwiseLogits.shape[2])
            throw new ArgumentException($"pairwiseLogits must be square in its last two dimensions; got {Guard.Shape(pairwiseLogits)}.", nameof(pairwiseLogits));
        return Native.Run("SppoWinRateEstimator.FromPairwiseLogits", () => $"pairwise logits {Native.Describe(pairwiseLogits)}", () =>
        {
            using var scope = NewDisposeScope();
            Guard.AllFinite((pairwiseLogits, nameof(pairwiseLogits)));
            using var noGrad = no_grad();
            var k = pairwiseLogits.shape[1];
            var eye = torch.eye(k, dtype: ScalarType.Bool, device: pairwiseLogits.device);
            var prob = torch.sigmoid(Numerics.As(pairwiseLogits.detach(), Numerics.DTypeFor(pairwiseLogits))).masked_fill(eye, 0.5);
            return Select(prob, scope);
        });
    }

    private static SppoPairSelection Select(Tensor probabilities, DisposeScope scope)
    {
        var winRates = probabilities.mean(new long[] { 2 });                 // [P, K]
        var best = winRates.argmax(1);
        var worst = winRates.argmin(1);
        var pw = winRates.gather(1, best.unsqueeze(1)).squeeze(1);
        var pl = winRates.gather(1, worst.unsqueeze(1)).squeeze(1);
        scope.MoveToOuter(best, worst, pw, pl, winRates);
        return new SppoPairSelection(best, worst, SppoWinRates.Individual(pw, pl), winRates);
    }
}
