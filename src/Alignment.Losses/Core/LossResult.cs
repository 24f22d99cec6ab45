using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// What every loss returns, whichever its contract: the scalar loss (differentiable) and detached metrics under TRL's
/// names. <see cref="PreferenceLossResult"/> (sequence pairs) and <see cref="TokenLossResult"/> (per-token objectives) add
/// their unreduced losses.
/// </summary>
/// <remarks>
/// The result owns its tensors; dispose it (or let an enclosing <c>torch.NewDisposeScope()</c> do it) once the backward
/// pass is done. Metrics are kept on the loss's device as one small tensor and copied to the host the first time
/// <see cref="Metrics"/> is read, so computing a loss never forces a device synchronisation for metrics. Reading a tensor,
/// or metrics not yet read, after the result was disposed (directly, or by the end of the dispose scope it was created in)
/// throws <see cref="ObjectDisposedException"/>.
/// </remarks>
public abstract class LossResult : IDisposable
{
    private readonly Tensor _loss;
    private readonly Tensor _metricValues;
    private readonly string[] _metricNames;
    private IReadOnlyDictionary<string, double>? _metrics;
    private bool _disposed;

    /// <summary>Takes ownership of the loss and the packed metric values.</summary>
    private protected LossResult(Tensor loss, Tensor metricValues, string[] metricNames, string lossName)
    {
        _loss = loss;
        _metricValues = metricValues;
        _metricNames = metricNames;
        LossName = lossName;
    }

    /// <summary>Metrics given as plain values, as a float64 CPU tensor outside any dispose scope.</summary>
    private protected static Tensor HostMetrics(IEnumerable<KeyValuePair<string, double>> metrics, out string[] names)
    {
        ArgumentNullException.ThrowIfNull(metrics);
        var list = metrics.ToList();
        names = list.Select(m => m.Key).ToArray();
        var values = tensor(list.Select(m => m.Value).ToArray(), dtype: ScalarType.Float64);
        values.DetachFromDisposeScope();
        return values;
    }

    /// <summary>The name of the loss that produced this result (as in <see cref="IPreferenceLoss.Name"/> / <see cref="ITokenLoss.Name"/>).</summary>
    public string LossName { get; }

    /// <summary>The scalar loss, float32 (float64 for float64 inputs), on the inputs' device, with grad.</summary>
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
                $"The {LossName} loss has no gradient: none of the policy log-probs requires grad (they were created without requires_grad, " +
                "detached, or computed under torch.no_grad()). An evaluation call is fine; to train, pass policy log-probs that require grad.");
        _loss.backward();
    }

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

    /// <summary>The metric values as one tensor, in <see cref="MetricNames"/> order.</summary>
    internal Tensor MetricTensor => Alive(_metricValues);

    /// <summary>The tensors the derived result owns besides the loss and the metrics.</summary>
    private protected abstract IEnumerable<Tensor> OwnedTensors { get; }

    /// <summary>Moves the result's tensors out of <paramref name="scope"/> (to the enclosing scope, or to no scope).</summary>
    internal void MoveToOuter(DisposeScope scope) => scope.MoveToOuter(OwnedTensors.Append(_loss).Append(_metricValues).ToArray());

    /// <summary>Throws <see cref="ObjectDisposedException"/> when the result or <paramref name="t"/> is gone.</summary>
    private protected Tensor Alive(Tensor t)
    {
        if (_disposed || t.IsInvalid)
            throw new ObjectDisposedException($"{GetType().Name} ({LossName})",
                $"This {LossName} loss result has been disposed, by Dispose() or by the end of the dispose scope it was created in. " +
                "Read the loss and metrics (or call backward) before the scope ends, or move the result's tensors to an outer scope.");
        return t;
    }

    /// <summary>Releases the native memory of the loss, the unreduced losses and the metrics (and gradients the library's
    /// backward passes returned on this thread outside any dispose scope).</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _loss.Dispose();
        foreach (var t in OwnedTensors) t.Dispose();
        _metricValues.Dispose();
        BackwardLeftovers.Release();
        GC.SuppressFinalize(this);
    }
}
