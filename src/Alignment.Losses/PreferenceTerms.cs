using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// One batch in the compute dtype, as a loss's formula sees it: the policy log-probs l_pol (with grad), the reference
/// log-probs l_ref (detached) and the log-ratios u_w = l_pol(y_w) - l_ref(y_w), u_l = l_pol(y_l) - l_ref(y_l) that
/// every loss is written in.
/// </summary>
/// <remarks>
/// Built by <see cref="PreferenceLoss{TOptions}"/> and handed to its <c>Evaluate</c>. The compute dtype is float32
/// (bfloat16 and float16 inputs are upcast before any arithmetic), or float64 when an input is float64. Every tensor
/// here lives in the loss call's dispose scope: use them freely, do not dispose them.
/// </remarks>
public sealed class PreferenceTerms
{
    private readonly PreferenceLogps _policy;

    internal PreferenceTerms(PreferenceBatch batch, ScalarType dtype, ValueChecks checks)
    {
        DType = dtype;
        Checks = checks;
        _policy = batch.Policy;
        IsPaired = batch.Policy.IsPaired;
        PolicyChosen = Numerics.As(batch.Policy.Chosen, dtype);
        PolicyRejected = Numerics.As(batch.Policy.Rejected, dtype);
        if (batch.Reference is { } reference)
        {
            ReferenceChosen = Numerics.As(reference.Chosen.detach(), dtype);
            ReferenceRejected = Numerics.As(reference.Rejected.detach(), dtype);
            ChosenLogRatio = PolicyChosen - ReferenceChosen;
            RejectedLogRatio = PolicyRejected - ReferenceRejected;
        }
        else
        {
            ChosenLogRatio = PolicyChosen;
            RejectedLogRatio = PolicyRejected;
        }
    }

    /// <summary>The compute dtype: float32, or float64 when an input is float64.</summary>
    public ScalarType DType { get; }

    /// <summary>Where value checks of side inputs are registered (read back once, after the formula).</summary>
    public ValueChecks Checks { get; }

    /// <summary>True when row i of the chosen and rejected tensors form a pair.</summary>
    public bool IsPaired { get; }

    /// <summary>l_pol(y_w) [B] (or [M] unpaired), with grad.</summary>
    public Tensor PolicyChosen { get; }

    /// <summary>l_pol(y_l) [B] (or [N] unpaired), with grad.</summary>
    public Tensor PolicyRejected { get; }

    /// <summary>l_ref(y_w), detached; null without a reference (reference-free).</summary>
    public Tensor? ReferenceChosen { get; }

    /// <summary>l_ref(y_l), detached; null without a reference.</summary>
    public Tensor? ReferenceRejected { get; }

    /// <summary>u_w = l_pol(y_w) - l_ref(y_w) (l_pol(y_w) without a reference).</summary>
    public Tensor ChosenLogRatio { get; }

    /// <summary>u_l = l_pol(y_l) - l_ref(y_l) (l_pol(y_l) without a reference).</summary>
    public Tensor RejectedLogRatio { get; }

    /// <summary>h = u_w - u_l (paired batches only).</summary>
    public Tensor Margin => _margin ??= ChosenLogRatio - RejectedLogRatio;
    private Tensor? _margin;

    /// <summary>The scores (s_w, s_l) = (f(u_w), f(u_l)) under <paramref name="map"/> (the log-ratios themselves for reverse KL).</summary>
    public (Tensor Chosen, Tensor Rejected) Scores(ScoreMap map)
    {
        ArgumentNullException.ThrowIfNull(map);
        if (map.Kind == ScoreMapKind.ReverseKl) return (ChosenLogRatio, RejectedLogRatio);
        if (_scores is { } cached && cached.Map == map) return (cached.Chosen, cached.Rejected);
        var scores = (map, map.Apply(ChosenLogRatio), map.Apply(RejectedLogRatio));
        _scores = scores;
        return (scores.Item2, scores.Item3);
    }
    private (ScoreMap Map, Tensor Chosen, Tensor Rejected)? _scores;

    /// <summary>Delta = s_w - s_l under <paramref name="map"/> (paired batches; <see cref="Margin"/> for reverse KL).</summary>
    public Tensor ScoreMargin(ScoreMap map)
    {
        ArgumentNullException.ThrowIfNull(map);
        if (map.Kind == ScoreMapKind.ReverseKl) return Margin;
        var (chosen, rejected) = Scores(map);
        return chosen - rejected;
    }

    /// <summary>A side input (scores, weights, probabilities) detached and in the compute dtype.</summary>
    public Tensor Upcast(Tensor sideInput)
    {
        ArgumentNullException.ThrowIfNull(sideInput);
        return Numerics.As(sideInput.detach(), DType);
    }

    /// <summary>
    /// The completion-token counts (n_w, n_l) in the compute dtype, for length-normalised losses; their values (finite,
    /// &gt; 0) are checked with the call's other checks.
    /// </summary>
    /// <param name="lossName">The loss's name, for the error when the counts are missing.</param>
    /// <param name="needRejected">Whether n_l is needed too (otherwise n_l is n_w when absent).</param>
    /// <exception cref="ArgumentException">The policy log-probs carry no token counts.</exception>
    public (Tensor Chosen, Tensor Rejected) TokenCounts(string lossName, bool needRejected = true) =>
        Internal.TokenCounts.Require(_policy, DType, lossName, needRejected, Checks);

    /// <summary>The names of the standard metrics of <see cref="LossAndStandardMetrics"/>, in order.</summary>
    internal static readonly string[] StandardMetricNames =
    {
        MetricNames.RewardsChosen, MetricNames.RewardsRejected, MetricNames.RewardsMargins,
        MetricNames.RewardsAccuracies, MetricNames.LogpsChosen, MetricNames.LogpsRejected,
    };

    /// <summary>
    /// Unpaired accuracy: the fraction of all D x U (chosen, rejected) pairs with chosen &gt; rejected (strict), 0 when a
    /// side is empty. Counted with a sort and a binary search per chosen reward, O((D + U) log U), not with a [D, U]
    /// comparison matrix (16.8 million entries at D = U = 4096).
    /// </summary>
    private Tensor AllPairsAccuracy(Tensor chosen, Tensor rejected)
    {
        long d = chosen.shape[0], u = rejected.shape[0];
        if (d == 0 || u == 0) return zeros(1, dtype: DType, device: chosen.device).squeeze();
        var (sorted, order) = rejected.sort();
        using (sorted)
        using (order)
        using (var below = searchsorted(sorted, chosen))          // per chosen reward: how many rejected ones are strictly smaller
        using (var count = below.sum())
            return count.to_type(DType) / ((double)d * u);
    }

    /// <summary>
    /// The loss value followed by the standard TRL metrics, as one detached [7] tensor in the order
    /// [loss, <see cref="StandardMetricNames"/>], without a synchronisation. Paired batches take one stacked mean over
    /// [per-example loss, u_w, u_l, h, h &gt; 0, l_w, l_l] and scale the reward rows in place: six kernels whatever B.
    /// (A loss call is launch-bound on a GPU, so metrics cost kernels, not arithmetic.)
    /// </summary>
    internal Tensor LossAndStandardMetrics(Tensor perExample, double rewardScale, (Tensor Chosen, Tensor Rejected)? rewards = null,
        (Tensor Chosen, Tensor Rejected)? logps = null)
    {
        using var _ = no_grad();
        {
            // on the CPU straight from the memory: no detached views, no stacked copy
            var (hc, hr, hlc, hlr) = (rewards?.Chosen ?? ChosenLogRatio, rewards?.Rejected ?? RejectedLogRatio, logps?.Chosen ?? PolicyChosen, logps?.Rejected ?? PolicyRejected);
            if (TensorMemory.HostVectors(perExample, hc, hr, hlc, hlr))
                return HostMetrics(perExample, hc, hr, hlc, hlr, rewards is null ? rewardScale : 1);
        }
        var chosen = rewards is { } r ? Numerics.As(r.Chosen.detach(), DType) : ChosenLogRatio.detach();
        var rejected = rewards is { } r2 ? Numerics.As(r2.Rejected.detach(), DType) : RejectedLogRatio.detach();
        var logpChosen = logps is { } l ? Numerics.As(l.Chosen.detach(), DType) : PolicyChosen.detach();
        var logpRejected = logps is { } l2 ? Numerics.As(l2.Rejected.detach(), DType) : PolicyRejected.detach();
        if (rewards is not null) rewardScale = 1;   // a loss's own rewards come scaled
        Tensor packed;
        if (IsPaired && perExample.dim() == 1 && perExample.shape[0] == chosen.shape[0])
        {
            var margin = rewards is null ? Margin.detach() : chosen - rejected;   // the loss's cached margin when the rewards are the log-ratios
            var wins = (margin > 0).to_type(DType);
            packed = stack(new[] { Numerics.As(perExample.detach(), DType), chosen, rejected, margin, wins, logpChosen, logpRejected })
                .mean(new long[] { 1 });
        }
        else
        {
            // an unpaired side may be empty (KTO, BCO): its means are reported as 0, never NaN
            static Tensor Mean(Tensor t) => t.shape[0] == 0 ? zeros(1, dtype: t.dtype, device: t.device).squeeze() : t.mean();
            var accuracy = IsPaired ? (chosen > rejected).to_type(DType).mean() : AllPairsAccuracy(chosen, rejected);
            var (meanChosen, meanRejected) = (Mean(chosen), Mean(rejected));
            packed = stack(new[]
            {
                Numerics.As(perExample.detach(), DType).mean(), meanChosen, meanRejected, meanChosen - meanRejected, accuracy,
                Mean(logpChosen), Mean(logpRejected),
            });
        }
        packed.narrow(0, 1, 3).mul_(rewardScale);                             // beta * [u_w, u_l, h] = rewards and margin
        return packed;
    }

    /// <summary>
    /// <see cref="LossAndStandardMetrics"/> on the CPU: the same seven values from the tensors' memory, summed in float64
    /// in one managed pass, the unpaired accuracy by sorting both sides (<see cref="PairCount"/>): no tensor ops but the result's.
    /// </summary>
    private Tensor HostMetrics(Tensor perExample, Tensor chosen, Tensor rejected, Tensor logpChosen, Tensor logpRejected, double rewardScale)
    {
        var pool = System.Buffers.ArrayPool<double>.Shared;
        var arrays = new[] { perExample, chosen, rejected, logpChosen, logpRejected }.Select(TensorMemory.RentDoubles).ToArray();
        try
        {
            int np = (int)perExample.shape[0], nc = (int)chosen.shape[0], nr = (int)rejected.shape[0];
            ReadOnlySpan<double> pe = arrays[0].AsSpan(0, np), c = arrays[1].AsSpan(0, nc), r = arrays[2].AsSpan(0, nr),
                lc = arrays[3].AsSpan(0, (int)logpChosen.shape[0]), lr = arrays[4].AsSpan(0, (int)logpRejected.shape[0]);
            static double Sum(ReadOnlySpan<double> x)
            {
                double total = 0;
                foreach (var v in x) total += v;
                return total;
            }
            static double Mean(ReadOnlySpan<double> x) => x.Length == 0 ? 0 : Sum(x) / x.Length;   // an empty unpaired side: 0, never NaN
            double meanChosen = Mean(c), meanRejected = Mean(r), meanMargin, accuracy;
            if (IsPaired)
            {
                // margin and wins per pair (the sign of c - r in float64 is that of the float32 difference, so the same wins)
                double margins = 0, wins = 0;
                for (int i = 0; i < nc; i++)
                {
                    double m = c[i] - r[i];
                    margins += m;
                    if (m > 0) wins++;
                }
                meanMargin = np == nc ? margins / nc : meanChosen - meanRejected;
                accuracy = wins / nc;
            }
            else
            {
                meanMargin = meanChosen - meanRejected;
                accuracy = nc == 0 || nr == 0 ? 0 : PairCount.Above(c, r) / ((double)nc * nr);
            }
            double[] values = { Sum(pe) / np, meanChosen * rewardScale, meanRejected * rewardScale, meanMargin * rewardScale, accuracy, Mean(lc), Mean(lr) };
            return TensorMemory.FromValues(values, DType);
        }
        finally
        {
            foreach (var a in arrays) pool.Return(a);
        }
    }

}

/// <summary>What a loss's formula produces: per-example losses (with grad) and its own metrics.</summary>
/// <param name="PerExample">[B] per-example losses (per chosen row for RPO); the loss is their mean.</param>
/// <param name="Metrics">The loss's own metrics as 0-d tensors (detached or not), reported after the standard ones.</param>
public readonly record struct LossOutput(Tensor PerExample, IReadOnlyList<(string Name, Tensor Value)> Metrics)
{
    /// <summary>Per-example losses without metrics of the loss's own.</summary>
    public LossOutput(Tensor perExample) : this(perExample, Array.Empty<(string, Tensor)>()) { }

    /// <summary>
    /// The rewards the standard metrics report (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies),
    /// already scaled, when they are not RewardScale times the log-ratios: e.g. beta times per-token means for SimPO, as
    /// TRL logs them. Null (default): RewardScale * (u_w, u_l).
    /// </summary>
    public (Tensor Chosen, Tensor Rejected)? Rewards { get; init; }

    /// <summary>
    /// The log-probs the standard metrics logps/chosen and logps/rejected report, when they are not the summed policy
    /// log-probs: e.g. the per-token means that SimPO, CPO's ipo and simpo types and ORPO compute with, as TRL logs them.
    /// Null (default): the summed policy log-probs.
    /// </summary>
    public (Tensor Chosen, Tensor Rejected)? Logps { get; init; }

    /// <summary>
    /// A change to state the caller owns (BCO's running reward mean), run only after the call has passed every check
    /// (inputs, example weights, a finite result), just before the result is returned: a call that throws leaves that
    /// state as it was, so a retry does not count a batch twice. Null (default): the loss changes no state.
    /// </summary>
    public Action? Commit { get; init; }
}
