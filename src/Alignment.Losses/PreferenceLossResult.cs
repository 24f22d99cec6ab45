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
/// </remarks>
public sealed class PreferenceLossResult : IDisposable
{
    private readonly Tensor _metricValues;
    private readonly string[] _metricNames;
    private IReadOnlyDictionary<string, double>? _metrics;
    private bool _disposed;

    /// <summary>
    /// Builds a result for a loss of your own (an <see cref="IPreferenceLoss"/> implemented outside this library).
    /// The result takes ownership of <paramref name="loss"/> and <paramref name="perExample"/>.
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
        Loss = loss;
        PerExample = perExample;
        _metricNames = list.Select(m => m.Key).ToArray();
        _metricValues = tensor(list.Select(m => m.Value).ToArray(), dtype: ScalarType.Float64);
        _metricValues.DetachFromDisposeScope();
    }

    internal PreferenceLossResult(Tensor loss, Tensor perExample, Tensor metricValues, string[] metricNames)
    {
        Loss = loss;
        PerExample = perExample;
        _metricValues = metricValues;
        _metricNames = metricNames;
    }

    /// <summary>The scalar loss (mean of <see cref="PerExample"/>), float32 (float64 for float64 inputs), on the inputs' device, with grad.</summary>
    public Tensor Loss { get; }

    /// <summary>The unreduced per-example losses [B] (per chosen row for RPO), with grad: use them for custom weighting.</summary>
    public Tensor PerExample { get; }

    /// <summary>Names of the metrics, in the order they were computed.</summary>
    public IReadOnlyList<string> MetricNames => _metricNames;

    /// <summary>
    /// Detached metrics as plain doubles, keyed by TRL-style names (see <see cref="Losses.MetricNames"/>).
    /// The first read copies them from the device (one synchronisation); later reads are free.
    /// </summary>
    public IReadOnlyDictionary<string, double> Metrics
    {
        get
        {
            ObjectDisposedException.ThrowIf(_disposed && _metrics is null, this);
            if (_metrics is not null) return _metrics;
            using var host = _metricValues.to(float64, CPU);
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

    /// <summary>Moves the result's tensors out of <paramref name="scope"/> (to the enclosing scope, or to no scope).</summary>
    internal void MoveToOuter(DisposeScope scope) => scope.MoveToOuter(Loss, PerExample, _metricValues);

    /// <summary>Releases the native memory of the loss, the per-example losses and the metrics.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        Loss.Dispose();
        PerExample.Dispose();
        _metricValues.Dispose();
    }
}
