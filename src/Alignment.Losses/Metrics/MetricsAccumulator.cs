using static TorchSharp.torch;

namespace Alignment.Losses.Metrics;

/// <summary>
/// Averages a run's metrics correctly over gradient-accumulation micro-batches and logging windows, under TRL's names:
/// each loss result's metrics and loss count with the weight of its examples, and the log-prob step statistics as sums
/// over tokens, so that the average over micro-batches equals the value of the full batch wherever the objective allows
/// it (see remarks).
/// </summary>
/// <remarks>
/// <para>Train and evaluate with two accumulators: <c>new MetricsAccumulator()</c> and <c>new MetricsAccumulator("eval_")</c>
/// (TRL's evaluation prefix). Call <see cref="Add(PreferenceLossResult)"/> for every micro-batch, and
/// <see cref="Flush()"/> when you log: it returns the window's averages and starts a new window.</para>
/// <para>Exact for every objective whose loss is a mean of per-pair terms (the DPO family, IPO, hinge, EXO, NCA, BCO,
/// APO, SPO without its KL, ODPO, SPPO, CPO-style NLL terms weighted per pair): the example-weighted mean of micro-batch
/// losses and metrics equals the full batch's. Not exact where a batch term couples examples: RPO (its contrast matrix
/// spans the batch; the micro-batch weights differ from the full batch's), AOT (it sorts the batch), and metrics that
/// are means over all (chosen, rejected) combinations of unpaired batches. For those, the accumulated value is the
/// average over micro-batches, which is what a training step with accumulation optimises.</para>
/// <para>To make the accumulated gradient equal the full-batch gradient, scale each micro-batch's loss by its share of
/// the examples: <c>(result.Loss * MetricsAccumulator.Share(result, totalExamples)).backward()</c>.</para>
/// </remarks>
public sealed class MetricsAccumulator
{
    private readonly Dictionary<string, (double Sum, double Weight)> _values = new();
    private readonly List<string> _order = new();
    private LogProbStatistics? _statistics;
    private bool _unpaired;

    /// <summary>Creates an accumulator whose metric names start with <paramref name="prefix"/> ("" for training, "eval_" for evaluation).</summary>
    public MetricsAccumulator(string prefix = "")
    {
        ArgumentNullException.ThrowIfNull(prefix);
        Prefix = prefix;
    }

    /// <summary>The name prefix.</summary>
    public string Prefix { get; }

    /// <summary>Micro-batches (results) added since the last flush.</summary>
    public int Count { get; private set; }

    /// <summary>
    /// Adds a loss result: its loss and every metric, weighted by its number of examples (the length of
    /// <see cref="PreferenceLossResult.PerExample"/>). One device synchronisation.
    /// </summary>
    public void Add(PreferenceLossResult result)
    {
        ArgumentNullException.ThrowIfNull(result);
        double weight = result.PerExample.shape[0];
        double[] values;
        using (NewDisposeScope())
        using (no_grad())
            values = cat(new[] { result.Loss.detach().to(ScalarType.Float64, CPU).reshape(1), result.MetricTensor.to(ScalarType.Float64, CPU).reshape(-1) })
                .data<double>().ToArray();
        Add(MetricNames.Loss, values[0], weight);
        for (int i = 0; i < result.MetricNames.Count; i++) Add(result.MetricNames[i], values[i + 1], MetricWeight(result, result.MetricNames[i], weight));
        _unpaired |= result.UnpairedCounts is not null;
        Count++;
    }

    /// <summary>
    /// Adds a token-level loss result (GRPO and its family): its loss and every metric, weighted by the micro-batch's
    /// valid tokens (its metrics are token means; the sequence-level clip fractions and kl alike). One device synchronisation.
    /// </summary>
    public void Add(TokenLossResult result)
    {
        ArgumentNullException.ThrowIfNull(result);
        double[] values;
        using (NewDisposeScope())
        using (no_grad())
            values = cat(new[]
            {
                result.Loss.detach().to(ScalarType.Float64, CPU).reshape(1), result.TokenCount.to(ScalarType.Float64, CPU).reshape(1),
                result.MetricTensor.to(ScalarType.Float64, CPU).reshape(-1),
            }).data<double>().ToArray();
        double weight = values[1];
        Add(MetricNames.Loss, values[0], weight);
        for (int i = 0; i < result.MetricNames.Count; i++) Add(result.MetricNames[i], values[i + 2], weight);
        Count++;
    }

    /// <summary>
    /// The number of examples a metric is a mean over: the pairs (or all examples), except for unpaired batches, whose
    /// chosen-side metrics are means over the D desirable examples, rejected-side ones over the U undesirable ones, and
    /// rewards/accuracies over the D x U (desirable, undesirable) combinations. An empty side then weighs 0 instead of
    /// counting as a 0. rewards/margins is kept as chosen minus rejected (<see cref="Flush()"/>).
    /// </summary>
    private static double MetricWeight(PreferenceLossResult result, string name, double examples)
    {
        if (result.UnpairedCounts is not { } counts) return examples;
        return name switch
        {
            MetricNames.RewardsChosen or MetricNames.LogpsChosen => counts.Chosen,
            MetricNames.RewardsRejected or MetricNames.LogpsRejected => counts.Rejected,
            MetricNames.RewardsAccuracies => (double)counts.Chosen * counts.Rejected,
            _ => examples,
        };
    }

    /// <summary>Adds the log-prob step's statistics (sums over tokens; see <see cref="SequenceLogProbsResult.Statistics"/>).</summary>
    public void Add(LogProbStatistics statistics) => _statistics = _statistics is { } s ? s + statistics : statistics;

    /// <summary>Adds one value of a metric of your own with a weight (e.g. its number of examples).</summary>
    /// <exception cref="ArgumentException">The name is empty, or the weight is negative or not finite.</exception>
    public void Add(string name, double value, double weight = 1)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        if (!(weight >= 0) || double.IsInfinity(weight))
            throw new ArgumentException($"weight must be finite and >= 0; got {weight}.", nameof(weight));
        if (!_values.TryGetValue(name, out var current)) _order.Add(name);
        // a weight of 0 (an empty side of an unpaired batch) contributes nothing, not even its NaN
        _values[name] = weight == 0 ? current : (current.Sum + value * weight, current.Weight + weight);
    }

    /// <summary>The window's weighted averages so far, prefixed, in the order names first appeared (statistics last).</summary>
    public IReadOnlyDictionary<string, double> Compute() =>
        Averages(_order.Select(n => _values[n]).ToArray(), _statistics, _unpaired);

    /// <summary>
    /// The window's weighted averages over every rank: each metric's weighted sum and weight, the log-prob statistics'
    /// sums and the unpaired flag are all-reduced (one all-reduce, plus one all-gather that checks the ranks report the same
    /// metrics in the same order), so the result is the global batch's, identical on every rank. A collective: every rank
    /// calls it at the same point.
    /// </summary>
    /// <param name="collectives">The ranks.</param>
    /// <exception cref="InvalidOperationException">The ranks hold different metric names (or orders).</exception>
    public IReadOnlyDictionary<string, double> Compute(ICollectives collectives)
    {
        ArgumentNullException.ThrowIfNull(collectives);
        var fingerprint = _order.Select(NameCode).Prepend(_order.Count).ToArray();
        var all = collectives.AllGather(fingerprint);
        int differs = Array.FindIndex(all, f => !f.SequenceEqual(all[0]));
        if (differs >= 0)
            throw new InvalidOperationException(
                $"Rank {differs} reports other metrics than rank 0 (this rank, {collectives.Rank}, has {string.Join(", ", _order)}): every rank must add the same " +
                "losses and metrics in the same order before a global Compute.");
        var local = new List<double>();
        foreach (var name in _order) { var (sum, weight) = _values[name]; local.Add(sum); local.Add(weight); }
        var st = _statistics ?? default;
        local.AddRange(new[] { st.EntropySum, st.Tokens, st.ChosenCorrect, st.ChosenTokens, st.ChosenLogitSum, st.RejectedLogitSum, st.RejectedTokens });
        local.Add(_statistics is null ? 0 : 1);
        local.Add(_unpaired ? 1 : 0);
        var g = collectives.AllReduceSum(local.ToArray());
        var values = Enumerable.Range(0, _order.Count).Select(i => (g[2 * i], g[2 * i + 1])).ToArray();
        int at = 2 * _order.Count;
        LogProbStatistics? statistics = g[at + 7] > 0 ? new LogProbStatistics(g[at], g[at + 1], g[at + 2], g[at + 3], g[at + 4], g[at + 5], g[at + 6]) : null;
        return Averages(values, statistics, g[at + 8] > 0);
    }

    /// <summary>Returns <see cref="Compute(ICollectives)"/> over every rank and starts a new window.</summary>
    public IReadOnlyDictionary<string, double> Flush(ICollectives collectives)
    {
        var result = Compute(collectives);
        Reset();
        return result;
    }

    private Dictionary<string, double> Averages((double Sum, double Weight)[] values, LogProbStatistics? statistics, bool unpaired)
    {
        var result = new Dictionary<string, double>();
        for (int i = 0; i < _order.Count; i++)
        {
            var (sum, weight) = values[i];
            result[Prefix + _order[i]] = weight > 0 ? sum / weight : double.NaN;
        }
        // unpaired: the margin of the window is its chosen mean minus its rejected mean, each over its own examples
        if (unpaired && result.TryGetValue(Prefix + MetricNames.RewardsMargins, out _)
            && result.TryGetValue(Prefix + MetricNames.RewardsChosen, out var chosen) && result.TryGetValue(Prefix + MetricNames.RewardsRejected, out var rejected))
            result[Prefix + MetricNames.RewardsMargins] = chosen - rejected;
        if (statistics is { } s)
            foreach (var (name, value) in s.ToMetrics()) result[Prefix + name] = value;
        return result;
    }

    /// <summary>A name as an exact double (52 bits of FNV-1a), for checking that ranks hold the same metrics.</summary>
    private static double NameCode(string name)
    {
        ulong h = 14695981039346656037UL;
        foreach (char c in name) { h ^= c; h *= 1099511628211UL; }
        return h & ((1UL << 52) - 1);
    }

    /// <summary>Returns <see cref="Compute()"/> and starts a new window.</summary>
    public IReadOnlyDictionary<string, double> Flush()
    {
        var result = Compute();
        Reset();
        return result;
    }

    /// <summary>Forgets everything added.</summary>
    public void Reset()
    {
        _values.Clear();
        _order.Clear();
        _statistics = null;
        _unpaired = false;
        Count = 0;
    }

    /// <summary>
    /// The factor that makes gradient accumulation exact for per-example-mean losses: a micro-batch's examples divided by
    /// the examples of the whole step. Multiply the micro-batch's loss by it before <c>backward()</c>.
    /// </summary>
    public static double Share(PreferenceLossResult result, long totalExamples)
    {
        ArgumentNullException.ThrowIfNull(result);
        if (totalExamples < 1) throw new ArgumentOutOfRangeException(nameof(totalExamples), totalExamples, "totalExamples must be >= 1.");
        return (double)result.PerExample.shape[0] / totalExamples;
    }
}
