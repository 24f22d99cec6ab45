using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// A weighted combination of losses on the same batch: L = sum_k w_k * mean_i L_k,i (TRL's list of <c>loss_type</c>s with
/// <c>loss_weights</c>). MPO (Wang et al. 2024, mixed preference optimization) is sigmoid 0.8 + bco_pair 0.2 + sft 1.0:
/// <c>new WeightedLoss((new DpoLoss(), 0.8), (new BcoPairLoss(), 0.2), (new SftLoss(), 1.0))</c>.
/// </summary>
/// <remarks>
/// <para>Each part computes on the batch as it would alone (its own validation, side inputs and checks; one synchronisation
/// per part). The per-example losses are sum_k w_k L_k,i, so their mean is the loss; every part must produce the same
/// number of per-example losses.</para>
/// <para>Metrics: the standard metrics of the first part (its beta scales the rewards), then, for every part, its loss as
/// "{name}/loss" and each of its metrics as "{name}/{metric}" (a name used twice gets "#2", "#3"). It is an
/// <see cref="IPreferenceLoss"/>, so it runs in the fused path and anywhere else a single loss does.</para>
/// </remarks>
public sealed class WeightedLoss : IPreferenceLoss
{
    private readonly (IPreferenceLoss Loss, double Weight)[] _parts;
    private readonly string[] _prefixes;

    /// <summary>Creates the combination.</summary>
    /// <param name="parts">The losses and their weights (each weight in [0, 1e12]); at least one.</param>
    /// <exception cref="ArgumentException">No part, a null loss, or a weight outside [0, 1e12].</exception>
    public WeightedLoss(params (IPreferenceLoss Loss, double Weight)[] parts)
    {
        ArgumentNullException.ThrowIfNull(parts);
        if (parts.Length == 0) throw new ArgumentException("A weighted combination needs at least one loss.", nameof(parts));
        for (int k = 0; k < parts.Length; k++)
        {
            if (parts[k].Loss is null) throw new ArgumentException($"parts[{k}] has no loss.", nameof(parts));
            Guard.Weight(parts[k].Weight, $"parts[{k}].Weight");
        }
        _parts = parts.ToArray();
        var uses = new Dictionary<string, int>(StringComparer.Ordinal);
        _prefixes = _parts.Select(p =>
        {
            int n = uses[p.Loss.Name] = uses.GetValueOrDefault(p.Loss.Name) + 1;
            return n == 1 ? p.Loss.Name : $"{p.Loss.Name}#{n}";
        }).ToArray();
    }

    /// <summary>The losses and their weights.</summary>
    public IReadOnlyList<(IPreferenceLoss Loss, double Weight)> Parts => _parts;

    /// <inheritdoc />
    /// <remarks>The parts' names joined by "+", each with its weight unless 1: e.g. "0.8*dpo+0.2*bco_pair+sft".</remarks>
    public string Name => string.Join("+", _parts.Select(p => p.Weight == 1 ? p.Loss.Name
        : p.Weight.ToString("G6", System.Globalization.CultureInfo.InvariantCulture) + "*" + p.Loss.Name));

    /// <inheritdoc />
    public PreferenceLossResult Compute(PreferenceBatch batch)
    {
        ArgumentNullException.ThrowIfNull(batch);
        using var scope = NewDisposeScope();
        var results = new PreferenceLossResult[_parts.Length];
        try
        {
            // the parts' state changes (BCO's baseline) wait until the combination has passed its own checks too
            var deferred = new List<Action>();
            for (int k = 0; k < _parts.Length; k++)
                results[k] = _parts[k].Loss is IDeferredStateLoss own ? own.Compute(batch, deferred) : _parts[k].Loss.Compute(batch);
            var combined = Combine(results, scope);
            foreach (var commit in deferred) commit();
            return combined;
        }
        finally
        {
            foreach (var r in results) r?.Dispose();
        }
    }

    private PreferenceLossResult Combine(PreferenceLossResult[] results, DisposeScope scope)
    {
        var first = results[0];
        long rows = first.PerExample.shape[0];
        for (int k = 1; k < results.Length; k++)
            if (results[k].PerExample.dim() != 1 || results[k].PerExample.shape[0] != rows)
                throw new InvalidOperationException(
                    $"{_parts[k].Loss.Name} produces {Guard.Shape(results[k].PerExample)} per-example losses but {_parts[0].Loss.Name} produces [{rows}]; a combination needs the same rows from every part.");
        var dtype = first.Loss.dtype;
        var device = first.Loss.device;
        Tensor loss = first.Loss * _parts[0].Weight, perExample = first.PerExample.to_type(dtype) * _parts[0].Weight;
        for (int k = 1; k < results.Length; k++)
        {
            loss = loss + results[k].Loss.to_type(dtype) * _parts[k].Weight;
            perExample = perExample + results[k].PerExample.to_type(dtype) * _parts[k].Weight;
        }

        // every part's loss is finite (each checks its own); their weighted sum can still overflow
        using (no_grad())
            if (!isfinite(loss).item<bool>())
            {
                var parts = string.Join(", ", results.Select((r, k) =>
                    $"{_parts[k].Loss.Name} {r.Loss.detach().to_type(ScalarType.Float64).item<double>().ToString("G4", System.Globalization.CultureInfo.InvariantCulture)} x weight {_parts[k].Weight.ToString("G4", System.Globalization.CultureInfo.InvariantCulture)}"));
                throw new ArithmeticException(
                    $"The weighted combination {Name} overflowed {dtype} although every part's loss is finite ({parts}). Lower the weights (TRL's loss_weights) or the parts' scale.");
            }

        var names = new List<string>();
        var values = new List<Tensor>();
        using (no_grad())
        {
            var standard = first.MetricTensor.to(dtype, device);
            int standardCount = PreferenceTerms.StandardMetricNames.Count(n => first.MetricNames.Contains(n));
            names.AddRange(first.MetricNames.Take(standardCount));
            values.Add(standard.narrow(0, 0, standardCount));
            for (int k = 0; k < results.Length; k++)
            {
                names.Add($"{_prefixes[k]}/loss");
                values.Add(results[k].Loss.detach().to(dtype, device).reshape(1));
                names.AddRange(results[k].MetricNames.Select(m => $"{_prefixes[k]}/{m}"));
                values.Add(results[k].MetricTensor.to(dtype, device));
            }
        }
        var packed = cat(values.ToArray(), 0);
        scope.MoveToOuter(loss, perExample, packed);
        return new PreferenceLossResult(loss, perExample, packed, names.ToArray(), Name);
    }
}
