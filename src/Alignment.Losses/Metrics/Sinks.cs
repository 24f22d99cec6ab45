using System.Globalization;
using System.Text;

namespace Alignment.Losses.Metrics;

/// <summary>Somewhere metrics go when a run logs: the console, a CSV file, TensorBoard, Microsoft.Extensions.Logging (second package), or your own.</summary>
public interface IMetricsSink : IDisposable
{
    /// <summary>Writes the metrics of one logging step.</summary>
    /// <param name="step">The global (optimizer) step.</param>
    /// <param name="metrics">Name to value, e.g. from <see cref="MetricsAccumulator.Flush()"/>.</param>
    void Write(long step, IReadOnlyDictionary<string, double> metrics);
}

/// <summary>Writes to several sinks at once.</summary>
public sealed class MetricsSinks : IMetricsSink
{
    private readonly IMetricsSink[] _sinks;

    /// <summary>Combines <paramref name="sinks"/>; disposing this disposes them.</summary>
    public MetricsSinks(params IMetricsSink[] sinks)
    {
        ArgumentNullException.ThrowIfNull(sinks);
        _sinks = sinks.Select((s, i) => s ?? throw new ArgumentException($"sink {i} is null.", nameof(sinks))).ToArray();
    }

    /// <inheritdoc/>
    public void Write(long step, IReadOnlyDictionary<string, double> metrics)
    {
        // every sink gets the row even when one throws; then the failures are reported together
        List<Exception>? failures = null;
        foreach (var sink in _sinks)
        {
            try { sink.Write(step, metrics); }
            catch (Exception e) { (failures ??= new()).Add(e); }
        }
        if (failures is not null)
        {
            if (failures.Count == 1) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(failures[0]).Throw();
            throw new AggregateException($"{failures.Count} metric sinks failed at step {step}.", failures);
        }
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        foreach (var sink in _sinks) sink.Dispose();
    }
}

/// <summary>
/// One progress line per logging step: <c>step 120/500 | loss 0.5312 | rewards/accuracies 0.8125 | ...</c>, with the
/// elapsed time and, when the total is known, an estimate of the time left.
/// </summary>
public sealed class ConsoleMetricsSink : IMetricsSink
{
    private readonly TextWriter _writer;
    private readonly string[]? _names;
    private readonly long? _totalSteps;
    private readonly System.Diagnostics.Stopwatch _clock = System.Diagnostics.Stopwatch.StartNew();

    /// <summary>Creates the sink.</summary>
    /// <param name="writer">Where the lines go (default standard output).</param>
    /// <param name="names">The metrics to show, in order (default all, in the order given).</param>
    /// <param name="totalSteps">The run's steps, for "step k/n" and the time left.</param>
    public ConsoleMetricsSink(TextWriter? writer = null, IEnumerable<string>? names = null, long? totalSteps = null)
    {
        _writer = writer ?? Console.Out;
        _names = names?.ToArray();
        _totalSteps = totalSteps;
    }

    /// <inheritdoc/>
    public void Write(long step, IReadOnlyDictionary<string, double> metrics)
    {
        ArgumentNullException.ThrowIfNull(metrics);
        var line = new StringBuilder(_totalSteps is { } total ? $"step {step}/{total}" : $"step {step}");
        foreach (var name in _names ?? metrics.Keys)
            if (metrics.TryGetValue(name, out var value)) line.Append(CultureInfo.InvariantCulture, $" | {name} {value:G4}");
        var elapsed = _clock.Elapsed;
        line.Append(" | ").Append(Duration(elapsed.TotalSeconds));
        if (_totalSteps is { } n && step > 0 && step <= n)
            line.Append(" (left ~").Append(Duration(elapsed.TotalSeconds / step * (n - step))).Append(')');
        _writer.WriteLine(line.ToString());
    }

    /// <summary>Flushes the writer (it is not closed: it may be the console).</summary>
    public void Dispose() => _writer.Flush();

    /// <summary>h:mm:ss with total hours (a run of days reads 49:05:12, not 01:05:12); any size of estimate, no overflow.</summary>
    internal static string Duration(double seconds)
    {
        if (!double.IsFinite(seconds) || seconds < 0) return "?";
        if (seconds >= 3600.0 * 1e6) return $"{seconds / 3600:G3} h";
        long s = (long)Math.Round(seconds);
        return string.Create(CultureInfo.InvariantCulture, $"{s / 3600:00}:{s / 60 % 60:00}:{s % 60:00}");
    }
}

/// <summary>
/// A CSV file with a header "step,name1,name2,..." and one row per logging step (invariant culture, round-trip precision;
/// empty where a row lacks a metric). When a metric appears that the header lacks (the first evaluation, say), the file
/// is rewritten with the wider header; rows are otherwise appended and flushed as they come.
/// </summary>
public sealed class CsvMetricsSink : IMetricsSink
{
    private readonly string _path;
    private readonly List<string> _columns = new();

    /// <summary>Creates (or overwrites) the file at <paramref name="path"/>; its folder is created.</summary>
    public CsvMetricsSink(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        _path = Path.GetFullPath(path);
        var folder = Path.GetDirectoryName(_path);
        if (!string.IsNullOrEmpty(folder)) Directory.CreateDirectory(folder);
        File.WriteAllText(_path, "step\n");
    }

    /// <summary>The file.</summary>
    public string FilePath => _path;

    /// <inheritdoc/>
    /// <remarks>Rows are appended; a metric seen for the first time adds a column, which rewrites the file once, streaming
    /// (earlier rows get empty cells): nothing is kept in memory but the column names. A file deleted during the run is
    /// recreated with its header.</remarks>
    public void Write(long step, IReadOnlyDictionary<string, double> metrics)
    {
        ArgumentNullException.ThrowIfNull(metrics);
        var added = metrics.Keys.Where(k => !_columns.Contains(k)).ToList();
        _columns.AddRange(added);
        if (!File.Exists(_path))
            File.WriteAllText(_path, Header() + Line(step, metrics));
        else if (added.Count > 0)
        {
            var temporary = _path + ".tmp-" + Environment.ProcessId;
            using (var writer = new StreamWriter(temporary))
            {
                writer.Write(Header());
                var padding = new string(',', added.Count);
                foreach (var line in File.ReadLines(_path).Skip(1)) writer.Write(line + padding + "\n");
                writer.Write(Line(step, metrics));
            }
            File.Move(temporary, _path, overwrite: true);
        }
        else
            File.AppendAllText(_path, Line(step, metrics));
    }

    private string Header() => "step" + string.Concat(_columns.Select(c => "," + Quote(c))) + "\n";

    private string Line(long step, IReadOnlyDictionary<string, double> values) =>
        step.ToString(CultureInfo.InvariantCulture) +
        string.Concat(_columns.Select(c => "," + (values.TryGetValue(c, out var v) ? v.ToString("R", CultureInfo.InvariantCulture) : ""))) + "\n";

    private static string Quote(string name) => !name.Contains(',') && !name.Contains('"') && !name.Contains('\n') ? name : "\"" + name.Replace("\"", "\"\"") + "\"";

    /// <summary>Nothing to release: every write is already on disk.</summary>
    public void Dispose() { }
}

/// <summary>
/// TensorBoard event files, through TorchSharp's own <c>torch.utils.tensorboard.SummaryWriter</c> (no other dependency):
/// one scalar per metric and step, tagged with the metric's name ("rewards/accuracies" groups under "rewards").
/// </summary>
public sealed class TensorBoardMetricsSink : IMetricsSink
{
    private readonly TorchSharp.Modules.SummaryWriter _writer;

    /// <summary>Writes event files into <paramref name="logDirectory"/> (created if missing).</summary>
    public TensorBoardMetricsSink(string logDirectory)
    {
        ArgumentException.ThrowIfNullOrEmpty(logDirectory);
        _writer = TorchSharp.torch.utils.tensorboard.SummaryWriter(logDirectory);
    }

    /// <summary>The folder the event files are in.</summary>
    public string LogDirectory => _writer.LogDir;

    /// <inheritdoc/>
    public void Write(long step, IReadOnlyDictionary<string, double> metrics)
    {
        ArgumentNullException.ThrowIfNull(metrics);
        if (step > int.MaxValue) throw new ArgumentOutOfRangeException(nameof(step), step, "TorchSharp's SummaryWriter records steps as int32.");
        foreach (var (name, value) in metrics) _writer.add_scalar(name, (float)value, (int)step);
    }

    /// <summary>Nothing to release: the writer writes each event to disk as it comes.</summary>
    public void Dispose() { }
}
