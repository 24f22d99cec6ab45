using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// What a sequence-pair loss (<see cref="IPreferenceLoss"/>) returns: the scalar loss (differentiable), the unreduced
/// per-example losses and detached metrics (see <see cref="LossResult"/> for lifetime and metrics).
/// </summary>
/// <remarks>
/// The result owns its tensors; dispose it (or let an enclosing <c>torch.NewDisposeScope()</c> do it) once the backward
/// pass is done. Reading <see cref="LossResult.Loss"/>, <see cref="PerExample"/> or metrics not yet read after the result
/// was disposed throws <see cref="ObjectDisposedException"/>.
/// </remarks>
public sealed class PreferenceLossResult : LossResult
{
    private readonly Tensor _perExample;

    /// <summary>
    /// Builds a result for a loss of your own that implements <see cref="IPreferenceLoss"/> directly (deriving from
    /// <see cref="PreferenceLoss{TOptions}"/> builds it for you, with the standard metrics). The result takes ownership
    /// of <paramref name="loss"/> and <paramref name="perExample"/>.
    /// </summary>
    /// <param name="loss">The scalar loss (with grad).</param>
    /// <param name="perExample">The unreduced per-example losses.</param>
    /// <param name="metrics">Metrics as plain values (may be empty).</param>
    public PreferenceLossResult(Tensor loss, Tensor perExample, IEnumerable<KeyValuePair<string, double>> metrics)
        : this(loss ?? throw new ArgumentNullException(nameof(loss)), perExample ?? throw new ArgumentNullException(nameof(perExample)),
            HostMetrics(metrics, out var names), names, "custom")
    {
    }

    internal PreferenceLossResult(Tensor loss, Tensor perExample, Tensor metricValues, string[] metricNames, string lossName)
        : base(loss, metricValues, metricNames, lossName)
    {
        _perExample = perExample;
    }

    /// <summary>
    /// For a loss computed on unpaired log-probs (KTO, BCO, unpaired RPO, ...): the number of desirable (chosen) and
    /// undesirable (rejected) examples, D and U. The chosen-side metrics (rewards/chosen, logps/chosen) are means over D,
    /// the rejected-side ones over U, so <see cref="Metrics.MetricsAccumulator"/> weights each by its own count. Null for
    /// paired batches (every metric is a mean over the B pairs).
    /// </summary>
    public (long Chosen, long Rejected)? UnpairedCounts { get; init; }

    /// <summary>The unreduced per-example losses [B] (per chosen row for RPO), with grad: use them for custom weighting.</summary>
    /// <exception cref="ObjectDisposedException">The result (or the dispose scope it was created in) has been disposed.</exception>
    public Tensor PerExample => Alive(_perExample);

    private protected override IEnumerable<Tensor> OwnedTensors => new[] { _perExample };
}
