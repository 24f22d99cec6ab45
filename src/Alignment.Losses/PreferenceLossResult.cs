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
