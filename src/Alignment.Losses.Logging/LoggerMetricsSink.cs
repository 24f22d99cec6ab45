using System.Globalization;
using Alignment.Losses.Metrics;
using Microsoft.Extensions.Logging;

namespace Alignment.Losses.Logging;

/// <summary>
/// Writes each logging step's metrics to an <see cref="ILogger"/> as one structured entry: the message
/// "step 120: loss=0.5312 rewards/accuracies=0.8125 ...", and as state the step ("Step") and every metric under its
/// own name, so that structured providers (Serilog, OpenTelemetry, Application Insights, JSON console) keep them as
/// fields. A metric named like one of the entry's own keys ("Step", "{OriginalFormat}") is kept as "metric:Step".
/// </summary>
public sealed class LoggerMetricsSink : IMetricsSink
{
    private readonly ILogger _logger;
    private readonly LogLevel _level;
    private readonly EventId _eventId;

    /// <summary>Creates the sink.</summary>
    /// <param name="logger">The logger.</param>
    /// <param name="level">The level of the entries. Default <see cref="LogLevel.Information"/>.</param>
    /// <param name="eventId">The event id of the entries. Default 1 named "AlignmentMetrics".</param>
    public LoggerMetricsSink(ILogger logger, LogLevel level = LogLevel.Information, EventId? eventId = null)
    {
        ArgumentNullException.ThrowIfNull(logger);
        if (!Enum.IsDefined(level) || level == LogLevel.None)
            throw new ArgumentOutOfRangeException(nameof(level), level, "level must be Trace, Debug, Information, Warning, Error or Critical.");
        _logger = logger;
        _level = level;
        _eventId = eventId ?? new EventId(1, "AlignmentMetrics");
    }

    /// <inheritdoc/>
    public void Write(long step, IReadOnlyDictionary<string, double> metrics)
    {
        ArgumentNullException.ThrowIfNull(metrics);
        if (!_logger.IsEnabled(_level)) return;
        var state = new MetricsState(step, metrics);
        _logger.Log(_level, _eventId, state, null, static (s, _) => s.ToString());
    }

    /// <summary>Nothing to release: the logger belongs to its provider.</summary>
    public void Dispose() { }

    /// <summary>Structured state: Step, each metric, and the original format, as Microsoft.Extensions.Logging expects.</summary>
    private sealed class MetricsState : IReadOnlyList<KeyValuePair<string, object?>>
    {
        private readonly List<KeyValuePair<string, object?>> _items;
        private readonly string _message;

        public MetricsState(long step, IReadOnlyDictionary<string, double> metrics)
        {
            _items = new List<KeyValuePair<string, object?>> { new("Step", step) };
            // a metric whose name is one of the entry's own keys (Step, {OriginalFormat}) is kept under "metric:" + its name,
            // so that it neither replaces the step nor breaks providers that read the format
            _items.AddRange(metrics.Select(m => new KeyValuePair<string, object?>(Reserved(m.Key) ? "metric:" + m.Key : m.Key, m.Value)));
            _message = $"step {step}:" + string.Concat(metrics.Select(m => " " + m.Key + "=" + m.Value.ToString("G6", CultureInfo.InvariantCulture)));
            _items.Add(new("{OriginalFormat}", _message));
        }

        private static bool Reserved(string name) =>
            string.Equals(name, "Step", StringComparison.OrdinalIgnoreCase) || name == "{OriginalFormat}";

        public KeyValuePair<string, object?> this[int index] => _items[index];

        public int Count => _items.Count;

        public IEnumerator<KeyValuePair<string, object?>> GetEnumerator() => _items.GetEnumerator();

        System.Collections.IEnumerator System.Collections.IEnumerable.GetEnumerator() => GetEnumerator();

        public override string ToString() => _message;
    }
}
