using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// The batch in the compute dtype: policy log-probs (with grad), reference log-probs (detached), and the log-ratios
/// u_w = l_pol(y_w) - l_ref(y_w), u_l = l_pol(y_l) - l_ref(y_l) that every loss is written in.
/// </summary>
internal sealed class PreferenceTerms
{
    internal PreferenceTerms(PreferenceBatch batch, ScalarType dtype)
    {
        DType = dtype;
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

    internal ScalarType DType { get; }
    internal bool IsPaired { get; }
    internal Tensor PolicyChosen { get; }
    internal Tensor PolicyRejected { get; }
    internal Tensor? ReferenceChosen { get; }
    internal Tensor? ReferenceRejected { get; }

    /// <summary>u_w.</summary>
    internal Tensor ChosenLogRatio { get; }

    /// <summary>u_l.</summary>
    internal Tensor RejectedLogRatio { get; }

    /// <summary>h = u_w - u_l (paired batches only).</summary>
    internal Tensor Margin => _margin ??= ChosenLogRatio - RejectedLogRatio;
    private Tensor? _margin;

    /// <summary>The standard TRL metrics, detached, as 0-d tensors (no synchronisation).</summary>
    internal IEnumerable<(string Name, Tensor Value)> StandardMetrics(double rewardScale)
    {
        using var _ = no_grad();
        var chosen = ChosenLogRatio.detach();
        var rejected = RejectedLogRatio.detach();
        var rewardsChosen = chosen.mean() * rewardScale;
        var rewardsRejected = rejected.mean() * rewardScale;
        var accuracy = IsPaired
            ? (chosen > rejected).to_type(DType).mean()
            : (chosen.unsqueeze(1) > rejected.unsqueeze(0)).to_type(DType).mean();
        return new (string, Tensor)[]
        {
            (MetricNames.RewardsChosen, rewardsChosen),
            (MetricNames.RewardsRejected, rewardsRejected),
            (MetricNames.RewardsMargins, rewardsChosen - rewardsRejected),
            (MetricNames.RewardsAccuracies, accuracy),
            (MetricNames.LogpsChosen, PolicyChosen.detach().mean()),
            (MetricNames.LogpsRejected, PolicyRejected.detach().mean()),
        };
    }
}

/// <summary>What a loss's formula produces: per-example losses (with grad) and its own metrics.</summary>
internal readonly record struct LossOutput(Tensor PerExample, IReadOnlyList<(string Name, Tensor Value)> Metrics)
{
    internal LossOutput(Tensor perExample) : this(perExample, Array.Empty<(string, Tensor)>()) { }
}
