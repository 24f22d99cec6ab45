using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// The batch in the compute dtype: policy log-probs (with grad), reference log-probs (detached), and the log-ratios
/// u_w = l_pol(y_w) - l_ref(y_w), u_l = l_pol(y_l) - l_ref(y_l) that every loss is written in.
/// </summary>
internal sealed class PreferenceTerms
{
    internal PreferenceTerms(PreferenceBatch batch, ScalarType dtype, DeferredChecks checks)
    {
        DType = dtype;
        Checks = checks;
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

    /// <summary>Where value checks of side inputs are registered (read back once, after the formula).</summary>
    internal DeferredChecks Checks { get; }
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

    /// <summary>The names of the standard metrics of <see cref="LossAndStandardMetrics"/>, in order.</summary>
    internal static readonly string[] StandardMetricNames =
    {
        MetricNames.RewardsChosen, MetricNames.RewardsRejected, MetricNames.RewardsMargins,
        MetricNames.RewardsAccuracies, MetricNames.LogpsChosen, MetricNames.LogpsRejected,
    };

    /// <summary>
    /// The loss value followed by the standard TRL metrics, as one detached [7] tensor in the order
    /// [loss, <see cref="StandardMetricNames"/>], without a synchronisation. Paired batches take one stacked mean over
    /// [per-example loss, u_w, u_l, h, h &gt; 0, l_w, l_l] and scale the reward rows in place: six kernels whatever B.
    /// (A loss call is launch-bound on a GPU, so metrics cost kernels, not arithmetic.)
    /// </summary>
    internal Tensor LossAndStandardMetrics(Tensor perExample, double rewardScale)
    {
        using var _ = no_grad();
        var chosen = ChosenLogRatio.detach();
        var rejected = RejectedLogRatio.detach();
        Tensor packed;
        if (IsPaired && perExample.dim() == 1 && perExample.shape[0] == chosen.shape[0])
        {
            var margin = Margin.detach();
            var wins = (margin > 0).to_type(DType);
            packed = stack(new[] { perExample.detach(), chosen, rejected, margin, wins, PolicyChosen.detach(), PolicyRejected.detach() })
                .mean(new long[] { 1 });
        }
        else
        {
            var accuracy = IsPaired
                ? (chosen > rejected).to_type(DType).mean()
                : (chosen.unsqueeze(1) > rejected.unsqueeze(0)).to_type(DType).mean();
            var (meanChosen, meanRejected) = (chosen.mean(), rejected.mean());
            packed = stack(new[]
            {
                perExample.detach().mean(), meanChosen, meanRejected, meanChosen - meanRejected, accuracy,
                PolicyChosen.detach().mean(), PolicyRejected.detach().mean(),
            });
        }
        packed.narrow(0, 1, 3).mul_(rewardScale);                             // beta * [u_w, u_l, h] = rewards and margin
        return packed;
    }
}

/// <summary>What a loss's formula produces: per-example losses (with grad) and its own metrics.</summary>
internal readonly record struct LossOutput(Tensor PerExample, IReadOnlyList<(string Name, Tensor Value)> Metrics)
{
    internal LossOutput(Tensor perExample) : this(perExample, Array.Empty<(string, Tensor)>()) { }
}
