using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// What a loss returns: the scalar loss (differentiable), the unreduced per-example losses and detached metrics.
/// </summary>
/// <remarks>
/// The result owns its tensors; dispose it (or let an enclosing <c>torch.NewDisposeScope()</c> do it) once the
/// backward pass is done. Metrics are kept on the loss's device as one small tensor and copied to the host the
/// first time <see cref="Metrics"/> is read, so computing a loss never forces a device synchronisation for metrics.
/// Reading <see cref="Loss"/>, <see cref="PerExample"/> or metrics not yet read after the result was disposed (directly,
/// or by the end of the dispose scope it was created in) throws <see cref="ObjectDisposedException"/>.
/// </remarks>
public sealed class PreferenceLossResult : IDisposable
{
    private readonly Tensor _loss;
    private readonly Tensor _perExample;
    private readonly Tensor _metricValues;
    private readonly string[] _metricNames;
    private readonly string _lossName;
    private IReadOnlyDictionary<string, double>? _metrics;
    private bool _disposed;

    /// <summary>
    /// Builds a result for a loss of your own that implements <see cref="IPreferenceLoss"/> directly (deriving from
    /// <see cref="PreferenceLoss{TOptions}"/> builds it for you, with the standard metrics). The result takes ownership
    /// of <paramref name="loss"/> and <paramref name="perExample"/>.
    /// </summary>
    /// <param name="loss">The scalar loss (with grad).</param>
    /// <param name="perExample">The unreduced per-example losses.</param>
    /// <param name="metrics">Metrics as plain values (may be empty).</param>
    public PreferenceLossResult(Tensor loss, Tensor perExample, IEnumerable<KeyValuePair<string, double>> metrics)
    {
        ArgumentNullException.ThrowIfNull(loss);
        ArgumentNullException.ThrowIfNull(perExample);
        ArgumentNullException.ThrowIfNull(metrics);
        var list = metrics.ToList();
        _loss = loss;
        _perExample = perExample;
        _lossName = "custom";
        _metricNames = list.Select(m => m.Key).ToArray();
        _metricValues = tensor(list.Select(m => m.Value).ToArray(), dtype: ScalarType.Float64);
        _metricValues.DetachFromDisposeScope();
    }

    internal PreferenceLossResult(Tensor loss, Tensor perExample, Tensor metricValues, string[] metricNames, string lossName)
    {
        _loss = loss;
        _perExample = perExample;
        _metricValues = metricValues;
        _metricNames = metricNames;
        _lossName = lossName;
    }

    /// <summary>
    /// For a loss computed on unpaired log-probs (KTO, BCO, unpaired RPO, ...): the number of desirable (chosen) and
    /// undesirable (rejected) examples, D and U. The chosen-side metrics (rewards/chosen, logps/chosen) are means over D,
    /// the rejected-side ones over U, so <see cref="Metrics.MetricsAccumulator"/> weights each by its own count. Null for
    /// paired batches (every metric is a mean over the B pairs).
    /// </summary>
    public (long Chosen, long Rejected)? UnpairedCounts { get; init; }

    /// <summary>The scalar loss (mean of <see cref="PerExample"/>), float32 (float64 for float64 inputs), on the inputs' device, with grad.</summary>
    /// <exception cref="ObjectDisposedException">The result (or the dispose scope it was created in) has been disposed.</exception>
    public Tensor Loss => Alive(_loss);

    /// <summary>
    /// Whether <see cref="Loss"/> has a gradient to give: false when no policy input requires grad, as in an evaluation
    /// call (which is allowed). Calling <c>Loss.backward()</c> then fails in libtorch with "element 0 of tensors does not
    /// require grad and does not have a grad_fn"; <see cref="Backward"/> says what is wrong instead.
    /// </summary>
    public bool RequiresGrad => Alive(_loss).requires_grad;

    /// <summary>Runs the backward pass of <see cref="Loss"/> (the same as <c>Loss.backward()</c>), with a clear error when there is no gradient.</summary>
    /// <exception cref="InvalidOperationException">No policy input requires grad: create the policy log-probs with
    /// <c>requires_grad: true</c> (or from a model in training mode, outside <c>torch.no_grad()</c>).</exception>
    public void Backward()
    {
        if (!RequiresGrad)
            throw new InvalidOperationException(
                $"The {_lossName} loss has no gradient: none of the policy log-probs requires grad (they were created without requires_grad, " +
                "detached, or computed under torch.no_grad()). An evaluation call is fine; to train, pass policy log-probs that require grad.");
        _loss.backward();
    }

    /// <summary>The unreduced per-example losses [B] (per chosen row for RPO), with grad: use them for custom weighting.</summary>
    /// <exception cref="ObjectDisposedException">The result (or the dispose scope it was created in) has been disposed.</exception>
    public Tensor PerExample => Alive(_perExample);

    /// <summary>Names of the metrics, in the order they were computed.</summary>
    public IReadOnlyList<string> MetricNames => _metricNames;

    /// <summary>
    /// Detached metrics as plain doubles, keyed by TRL-style names (see <see cref="Losses.MetricNames"/>).
    /// The first read copies them from the device (one synchronisation); later reads are free, even after disposal.
    /// </summary>
    /// <exception cref="ObjectDisposedException">The result was disposed before the metrics were first read.</exception>
    public IReadOnlyDictionary<string, double> Metrics
    {
        get
        {
            if (_metrics is not null) return _metrics;
            using var host = Alive(_metricValues).to(float64, CPU);
            var values = host.data<double>().ToArray();
            var dict = new Dictionary<string, double>(_metricNames.Length);
            for (int i = 0; i < _metricNames.Length; i++) dict[_metricNames[i]] = values[i];
            _metrics = dict;
            return dict;
        }
    }

    /// <summary>The value of one metric.</summary>
    /// <exception cref="KeyNotFoundException">The loss does not report that metric.</exception>
    public double this[string metric] => Metrics.TryGetValue(metric, out var v)
        ? v
        : throw new KeyNotFoundException($"No metric named '{metric}'. Available: {string.Join(", ", _metricNames)}.");

    /// <summary>The metric values as one tensor, in <see cref="MetricNames"/> order (float64 on the CPU for public-constructor results).</summary>
    internal Tensor MetricTensor => Alive(_metricValues);

    /// <summary>Moves the result's tensors out of <paramref name="scope"/> (to the enclosing scope, or to no scope).</summary>
    internal void MoveToOuter(DisposeScope scope) => scope.MoveToOuter(_loss, _perExample, _metricValues);

    private Tensor Alive(Tensor t)
    {
        if (_disposed || t.IsInvalid)
            throw new ObjectDisposedException($"PreferenceLossResult ({_lossName})",
                $"This {_lossName} loss result has been disposed, by Dispose() or by the end of the dispose scope it was created in. " +
                "Read the loss and metrics (or call backward) before the scope ends, or move the result's tensors to an outer scope.");
        return t;
    }

    /// <summary>Releases the native memory of the loss, the per-example losses and the metrics (and gradients the library's
    /// backward passes returned on this thread outside any dispose scope).</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _loss.Dispose();
        _perExample.Dispose();
        _metricValues.Dispose();
        BackwardLeftovers.Release();
    }
}
