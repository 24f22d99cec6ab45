using Alignment.Losses;
using Alignment.Losses.Logging;
using Alignment.Losses.Metrics;
using Microsoft.Extensions.Logging;

namespace Alignment.Losses.Tests;

/// <summary>The metrics accumulator (micro-batches, windows, eval prefix) and the sinks.</summary>
public class MetricsTests
{
    static (PreferenceLogps Policy, PreferenceLogps Reference, Tensor Chosen, Tensor Rejected) Batch(int b, int seed)
    {
        manual_seed(seed);
        var chosen = (randn(b, dtype: ScalarType.Float64) * 3 - 20).requires_grad_(true);
        var rejected = (randn(b, dtype: ScalarType.Float64) * 3 - 20).requires_grad_(true);
        var reference = new PreferenceLogps(randn(b, dtype: ScalarType.Float64) * 3 - 20, randn(b, dtype: ScalarType.Float64) * 3 - 20);
        return (new PreferenceLogps(chosen, rejected), reference, chosen, rejected);
    }

    static PreferenceLogps Slice(PreferenceLogps p, long start, long length) => new(p.Chosen.narrow(0, start, length), p.Rejected.narrow(0, start, length));

    [Fact]
    public void Micro_batches_average_to_the_full_batch_loss_metrics_and_gradient_for_a_per_pair_loss()
    {
        using var scope = NewDisposeScope();
        var (policy, reference, chosen, rejected) = Batch(8, 1);
        var loss = new ConservativeDpoLoss(new ConservativeDpoOptions { Beta = 0.2, LabelSmoothing = 0.1 });
        using var full = loss.Compute(new PreferenceBatch(policy, reference));
        var fullGrad = autograd.grad(new[] { full.Loss }, new[] { chosen })[0].clone();

        var accumulator = new MetricsAccumulator();
        Tensor? grad = null;
        foreach (var (start, length) in new[] { (0L, 3L), (3L, 5L) })   // uneven micro-batches
        {
            using var part = loss.Compute(new PreferenceBatch(Slice(policy, start, length), Slice(reference, start, length)));
            accumulator.Add(part);
            var g = autograd.grad(new[] { part.Loss * MetricsAccumulator.Share(part, 8) }, new[] { chosen })[0];
            grad = grad is null ? g.clone() : grad + g;
        }
        Assert.Equal(2, accumulator.Count);
        var averaged = accumulator.Flush();
        Assert.Equal(full.Loss.ToDouble(), averaged[MetricNames.Loss], 12);
        foreach (var name in full.MetricNames)
            Assert.Equal(full[name], averaged[name], 12);
        Assert.True(allclose(fullGrad, grad!, 1e-14, 1e-14));
        Assert.Equal(0, accumulator.Count);
        Assert.Empty(accumulator.Compute());
    }

    [Fact]
    public void For_rpo_the_micro_batch_average_is_not_the_full_batch_value_as_documented()
    {
        using var scope = NewDisposeScope();
        var (policy, reference, _, _) = Batch(8, 2);
        var embeddings = randn(8, 4, dtype: ScalarType.Float64);
        using var full = RpoLoss.Compute(policy, reference, embeddings);
        var accumulator = new MetricsAccumulator();
        foreach (var (start, length) in new[] { (0L, 4L), (4L, 4L) })
        {
            using var part = RpoLoss.Compute(Slice(policy, start, length), Slice(reference, start, length), embeddings.narrow(0, start, length));
            accumulator.Add(part);
        }
        Assert.NotEqual(full.Loss.ToDouble(), accumulator.Compute()[MetricNames.Loss], 6);
    }

    [Fact]
    public void Eval_prefix_custom_values_and_step_statistics()
    {
        using var scope = NewDisposeScope();
        var (policy, reference, _, _) = Batch(4, 3);
        var eval = new MetricsAccumulator("eval_");
        using var r = DpoLoss.Compute(policy, reference);
        eval.Add(r);
        eval.Add("grad_norm", 2.0, 1);
        eval.Add("grad_norm", 4.0, 3);
        eval.Add(new LogProbStatistics(10, 5, 1, 2, 3, 4, 3));
        eval.Add(new LogProbStatistics(2, 1, 1, 2, 1, 0, 1));
        var m = eval.Flush();
        Assert.Equal(3.5, m["eval_grad_norm"], 12);
        Assert.Equal(12.0 / 6, m["eval_entropy"], 12);
        Assert.Equal(2.0 / 4, m["eval_mean_token_accuracy"], 12);
        Assert.Equal(4.0 / 4, m["eval_logits/chosen"], 12);
        Assert.Equal(4.0 / 4, m["eval_logits/rejected"], 12);
        Assert.Equal(r.Loss.ToDouble(), m["eval_loss"], 12);
        Assert.True(m.ContainsKey("eval_rewards/accuracies"));
        Assert.Throws<ArgumentException>(() => eval.Add("x", 1, -1));
        Assert.Throws<ArgumentException>(() => eval.Add("", 1));
    }

    [Fact]
    public void Csv_sink_widens_its_header_when_eval_metrics_appear()
    {
        var dir = Directory.CreateTempSubdirectory("alignment-metrics-");
        try
        {
            var path = Path.Combine(dir.FullName, "run", "metrics.csv");
            using (var csv = new CsvMetricsSink(path))
            {
                csv.Write(1, new Dictionary<string, double> { ["loss"] = 0.5, ["rewards/accuracies"] = 0.25 });
                csv.Write(2, new Dictionary<string, double> { ["loss"] = 0.125, ["rewards/accuracies"] = 0.75 });
                csv.Write(2, new Dictionary<string, double> { ["eval_loss"] = 0.1 / 3 });
            }
            var lines = File.ReadAllLines(path);
            Assert.Equal(new[] { "step,loss,rewards/accuracies,eval_loss", "1,0.5,0.25,", "2,0.125,0.75,", "2,,," + (0.1 / 3).ToString("R", System.Globalization.CultureInfo.InvariantCulture) }, lines);
        }
        finally { dir.Delete(true); }
    }

    [Fact]
    public void Console_sink_writes_one_progress_line()
    {
        var writer = new StringWriter();
        using var sink = new ConsoleMetricsSink(writer, new[] { "loss", "rewards/accuracies" }, totalSteps: 10);
        sink.Write(3, new Dictionary<string, double> { ["loss"] = 0.69314718, ["rewards/accuracies"] = 0.5, ["other"] = 1 });
        var line = writer.ToString().Trim();
        Assert.StartsWith("step 3/10 | loss 0.6931 | rewards/accuracies 0.5 | ", line);
        Assert.DoesNotContain("other", line);
        Assert.Contains("left ~", line);
    }

    [Fact]
    public void TensorBoard_sink_writes_event_records_tensorboard_can_read()
    {
        var dir = Directory.CreateTempSubdirectory("alignment-tb-");
        try
        {
            using (var sink = new TensorBoardMetricsSink(dir.FullName))
            {
                sink.Write(5, new Dictionary<string, double> { ["loss"] = 0.25, ["rewards/margins"] = 1.5 });
                sink.Write(6, new Dictionary<string, double> { ["loss"] = 0.125 });
            }
            var file = Directory.GetFiles(dir.FullName, "events.out.tfevents.*").Single();
            // TFRecord framing: uint64 length, uint32 crc, payload, uint32 crc; payload = tensorboard.Event
            var bytes = File.ReadAllBytes(file);
            var scalars = new List<(long Step, string Tag, float Value)>();
            for (int p = 0; p < bytes.Length;)
            {
                long length = BitConverter.ToInt64(bytes, p);
                var e = Tensorboard.Event.Parser.ParseFrom(bytes, p + 12, (int)length);
                if (e.Summary is not null)
                    foreach (var v in e.Summary.Value) scalars.Add((e.Step, v.Tag, v.SimpleValue));
                p += 12 + (int)length + 4;
            }
            Assert.Equal(new[] { (5L, "loss", 0.25f), (5L, "rewards/margins", 1.5f), (6L, "loss", 0.125f) }, scalars);
        }
        finally { dir.Delete(true); }
    }

    sealed class RecordingLogger : ILogger
    {
        public List<(LogLevel Level, string Message, IReadOnlyList<KeyValuePair<string, object?>> State)> Entries { get; } = new();
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Information;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
            Entries.Add((logLevel, formatter(state, exception), (IReadOnlyList<KeyValuePair<string, object?>>)state!));
    }

    [Fact]
    public void Logger_sink_writes_structured_entries()
    {
        var logger = new RecordingLogger();
        using var sink = new LoggerMetricsSink(logger);
        sink.Write(12, new Dictionary<string, double> { ["loss"] = 0.5, ["rewards/accuracies"] = 0.75 });
        var entry = Assert.Single(logger.Entries);
        Assert.Equal(LogLevel.Information, entry.Level);
        Assert.Equal("step 12: loss=0.5 rewards/accuracies=0.75", entry.Message);
        Assert.Contains(new KeyValuePair<string, object?>("Step", 12L), entry.State);
        Assert.Contains(new KeyValuePair<string, object?>("rewards/accuracies", 0.75), entry.State);
        new LoggerMetricsSink(logger, LogLevel.Debug).Write(13, new Dictionary<string, double> { ["loss"] = 1 });
        Assert.Single(logger.Entries);   // below the logger's level: nothing
        Assert.Throws<ArgumentOutOfRangeException>(() => new LoggerMetricsSink(logger, LogLevel.None));
        // metrics named like the entry's own keys do not replace them
        sink.Write(14, new Dictionary<string, double> { ["Step"] = 3, ["{OriginalFormat}"] = 4 });
        var clash = logger.Entries[^1].State;
        Assert.Single(clash, kv => kv.Key == "Step");
        Assert.Contains(new KeyValuePair<string, object?>("Step", 14L), clash);
        Assert.Contains(new KeyValuePair<string, object?>("metric:Step", 3.0), clash);
        Assert.Contains(new KeyValuePair<string, object?>("metric:{OriginalFormat}", 4.0), clash);
        Assert.Single(clash, kv => kv.Key == "{OriginalFormat}");
    }
}
