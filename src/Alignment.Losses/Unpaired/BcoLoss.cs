using System.Globalization;
using System.Text.Json;
using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// BCO's reward baseline delta: the running mean of every reward seen in training, a state the caller owns. It is updated
/// with each training batch's detached rewards (before the batch's loss uses it, as in TRL) and frozen in evaluation;
/// serialise it with the checkpoint (<see cref="ToJson"/>, <see cref="FromJson"/>) so a run resumes where it was.
/// </summary>
public sealed class BcoRewardBaseline
{
    /// <summary>A fresh baseline: no reward seen, mean 0.</summary>
    public BcoRewardBaseline() { }

    private BcoRewardBaseline(double mean, long count)
    {
        Mean = mean;
        Count = count;
    }

    /// <summary>The running mean delta (0 before any update).</summary>
    public double Mean { get; private set; }

    /// <summary>Rewards seen so far.</summary>
    public long Count { get; private set; }

    /// <summary>True while training: <see cref="BcoLoss"/> updates the baseline with each batch. Set false for evaluation (frozen).</summary>
    public bool Training { get; set; } = true;

    /// <summary>Adds rewards to the running mean (exact: mean over all rewards seen, however batches are sized).</summary>
    public void Update(IReadOnlyCollection<double> rewards)
    {
        ArgumentNullException.ThrowIfNull(rewards);
        if (rewards.Count == 0) return;
        if (rewards.Any(r => !double.IsFinite(r))) throw new ArgumentException("rewards must be finite.", nameof(rewards));
        Update(rewards.Average(), rewards.Count);
    }

    /// <summary>Adds <paramref name="count"/> rewards whose mean is <paramref name="batchMean"/> (finite, count &gt; 0).</summary>
    internal void Update(double batchMean, long count) => (Mean, Count) = Updated(Mean, Count, batchMean, count);

    /// <summary>The state after adding <paramref name="count"/> rewards of mean <paramref name="batchMean"/> to (mean, seen).</summary>
    internal static (double Mean, long Count) Updated(double mean, long seen, double batchMean, long count)
    {
        if (seen > long.MaxValue - count)
            throw new InvalidOperationException($"The BCO baseline has counted {seen} rewards and cannot count {count} more (the count would overflow Int64); start a new baseline.");
        long total = seen + count;
        return (mean + (batchMean - mean) * count / total, total);
    }

    /// <summary>The state as JSON: {"mean": ..., "count": ...} (round-trip precision).</summary>
    public string ToJson() => JsonSerializer.Serialize(new Dictionary<string, object> { ["mean"] = Mean, ["count"] = Count });

    /// <summary>Restores a state written by <see cref="ToJson"/>.</summary>
    /// <exception cref="FormatException">Not such a state (missing fields, a negative count, a non-finite mean).</exception>
    public static BcoRewardBaseline FromJson(string json)
    {
        ArgumentNullException.ThrowIfNull(json);
        double mean;
        long count;
        try
        {
            using var doc = JsonDocument.Parse(json);
            mean = doc.RootElement.GetProperty("mean").GetDouble();
            if (!doc.RootElement.GetProperty("count").TryGetInt64(out count)) throw new InvalidOperationException("count is not an integer");
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
        {
            throw new FormatException("not a BCO baseline state: expected {\"mean\": number, \"count\": integer}.", e);
        }
        if (count < 0 || !double.IsFinite(mean)) throw new FormatException($"invalid BCO baseline state (mean {mean.ToString(CultureInfo.InvariantCulture)}, count {count}).");
        return new BcoRewardBaseline(mean, count);
    }
}

/// <summary>Options of <see cref="BcoLoss"/>.</summary>
public sealed record BcoOptions : BetaOptions;

/// <summary>
/// BCO, Binary Classifier Optimization (Jung et al. 2024, arXiv 2404.04656; TRL's BCOTrainer) on unpaired thumbs-up /
/// thumbs-down data: a logistic classifier of desirable vs undesirable on the implicit reward, shifted by a running mean.
/// </summary>
/// <remarks>
/// <para>Rewards r = beta u, u = l_pol - l_ref; delta = the caller's <see cref="BcoRewardBaseline"/> (in training first updated
/// with the batch's detached rewards, as in TRL); desirable loss softplus(-(r - delta)), undesirable softplus(r - delta);
/// mean over the D + U examples (desirable first). Optional per-example weights (TRL's density-ratio "UDM" weights from an
/// embedding classifier) go in <see cref="PreferenceBatch.ExampleWeights"/>, D + U of them. Metrics: the standard ones
/// and delta. At a fixed delta, the loss is minimised where desirable rewards rise above delta and undesirable fall below
/// it; over training, delta tracks the mean reward.</para>
/// <para>The pairwise variant (TRL DPO loss_type "bco_pair") is <see cref="BcoPairLoss"/>.</para>
/// </remarks>
public sealed class BcoLoss : UnpairedPreferenceLoss<BcoOptions>
{
    /// <summary>Creates the loss around the caller's baseline state.</summary>
    public BcoLoss(BcoRewardBaseline baseline, BcoOptions? options = null) : base(options ?? new BcoOptions())
    {
        Baseline = baseline ?? throw new ArgumentNullException(nameof(baseline));
    }

    /// <summary>The running reward mean this loss reads (and updates while <see cref="BcoRewardBaseline.Training"/>).</summary>
    public BcoRewardBaseline Baseline { get; }

    /// <inheritdoc />
    public override string Name => "bco";

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        double beta = Options.Beta;
        var rewardChosen = terms.ChosenLogRatio * beta;
        var rewardRejected = terms.RejectedLogRatio * beta;
        // in training delta includes this batch's rewards (TRL updates before use); the caller's baseline is updated only when
        // the whole call has succeeded (LossOutput.Commit), so a call that fails validation leaves it as it was
        double delta = Baseline.Mean;
        Action? commit = null;
        double largest = terms.DType switch { ScalarType.Float64 => double.MaxValue, _ => float.MaxValue };
        if (Math.Abs(delta) > largest)
            throw new ArgumentException(
                $"The BCO baseline's mean ({delta:G4}) is beyond {terms.DType}'s range, so no reward can be compared with it: a restored state from another run or a corrupted checkpoint? Start a new BcoRewardBaseline.",
                "baseline");
        if (Baseline.Training)
        {
            // the batch's mean reward, summed in float64 on the device: one scalar comes back, not D + U rewards
            using var noGrad = no_grad();
            long count = rewardChosen.shape[0] + rewardRejected.shape[0];
            double batchMean = cat(new[] { rewardChosen.detach(), rewardRejected.detach() }, 0).to_type(ScalarType.Float64).sum().ToDouble() / count;
            if (double.IsFinite(batchMean))                         // non-finite inputs fail the loss's own check below
            {
                var baseline = Baseline;
                var (mean, seen) = (baseline.Mean, baseline.Count);
                delta = BcoRewardBaseline.Updated(mean, seen, batchMean, count).Mean;
                commit = () =>
                {
                    if (baseline.Mean != mean || baseline.Count != seen)
                        throw new InvalidOperationException("The BCO baseline changed during the call (another thread updated it); share one baseline per training loop.");
                    baseline.Update(batchMean, count);
                };
            }
        }
        var desirable = PreferenceMath.NegLogSigmoid(rewardChosen - delta);
        var undesirable = PreferenceMath.NegLogSigmoid(-(rewardRejected - delta));
        return new(cat(new[] { desirable, undesirable }, 0), new[] { (MetricNames.Delta, full(1, delta, dtype: terms.DType, device: rewardChosen.device).squeeze()) })
        {
            Commit = commit,
        };
    }
}
