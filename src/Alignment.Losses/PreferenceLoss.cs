using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Base of the library's losses: validates the batch, upcasts to the compute dtype, scopes native memory, computes
/// the standard metrics, and leaves the formula to the derived loss.
/// </summary>
/// <typeparam name="TOptions">The loss's immutable options record.</typeparam>
/// <remarks>
/// Only the returned <see cref="PreferenceLossResult"/> survives a call: every temporary is disposed before
/// <see cref="Compute(PreferenceBatch)"/> returns, whether or not the caller has a dispose scope of its own.
/// To plug in a loss of your own, implement <see cref="IPreferenceLoss"/> directly.
/// </remarks>
public abstract class PreferenceLoss<TOptions> : IPreferenceLoss where TOptions : PreferenceLossOptions
{
    private protected PreferenceLoss(TOptions options)
    {
        Options = options ?? throw new ArgumentNullException(nameof(options));
    }

    /// <summary>The options this loss was created with.</summary>
    public TOptions Options { get; }

    /// <inheritdoc />
    public abstract string Name { get; }

    /// <summary>The scale of the reward metrics (beta for most losses).</summary>
    private protected abstract double RewardScale { get; }

    /// <summary>Whether the loss accepts unpaired log-probs (M chosen, N rejected).</summary>
    private protected virtual bool SupportsUnpaired => false;

    /// <inheritdoc />
    public PreferenceLossResult Compute(PreferenceBatch batch)
    {
        ArgumentNullException.ThrowIfNull(batch);
        ArgumentNullException.ThrowIfNull(batch.Policy, "batch.Policy");
        ValidateCommon(batch);

        using var scope = NewDisposeScope();
        var checks = new DeferredChecks();
        var extraTensors = Validate(batch, checks);
        var dtype = Numerics.DTypeFor(batch.Policy.Chosen, batch.Policy.Rejected, batch.Reference?.Chosen, batch.Reference?.Rejected);
        var terms = new PreferenceTerms(batch, dtype, checks);
        var output = Evaluate(terms, batch);
        var loss = output.PerExample.mean();

        // [loss, standard metrics, loss-specific metrics] in one device tensor: a handful of kernels and no synchronisation
        Tensor packed;
        string[] names;
        using (no_grad())
        {
            packed = terms.LossAndStandardMetrics(output.PerExample, RewardScale);
            names = PreferenceTerms.StandardMetricNames;
            if (output.Metrics.Count > 0)
            {
                var parts = new List<Tensor>(1 + output.Metrics.Count) { packed };
                parts.AddRange(output.Metrics.Select(m => Numerics.As(m.Value.detach(), dtype).reshape(1)));
                packed = cat(parts, 0);
                names = names.Concat(output.Metrics.Select(m => m.Name)).ToArray();
            }
        }
        if (Options.CheckFinite)
        {
            using (no_grad())
                checks.Add(isfinite(packed).all(), () => NotFinite(batch, extraTensors));
        }
        checks.Verify();
        var metricValues = packed.narrow(0, 1, names.Length);
        scope.MoveToOuter(loss, output.PerExample, metricValues);
        return new PreferenceLossResult(loss, output.PerExample, metricValues, names);
    }

    /// <summary>
    /// Never a silent NaN, at the cost of one small check: every non-finite input reaches the loss or a metric (an
    /// infinite log-prob that zeroes the loss still makes the reward metrics infinite), so one isfinite over
    /// [loss, metrics], read back with the other deferred checks in a single synchronisation, suffices. Only when it
    /// fails are the inputs examined one by one, so that the error names the offending argument.
    /// </summary>
    private static Exception NotFinite(PreferenceBatch batch, IEnumerable<(Tensor? Tensor, string Name)> extraTensors)
    {
        var inputs = new List<(Tensor?, string)>
        {
            (batch.Policy.Chosen, "policy.Chosen"), (batch.Policy.Rejected, "policy.Rejected"),
            (batch.Policy.ChosenTokenCounts, "policy.ChosenTokenCounts"), (batch.Policy.RejectedTokenCounts, "policy.RejectedTokenCounts"),
            (batch.Reference?.Chosen, "reference.Chosen"), (batch.Reference?.Rejected, "reference.Rejected"),
        };
        inputs.AddRange(extraTensors);
        Guard.AllFinite(inputs.ToArray());
        return new ArithmeticException(
            "The loss or a metric is not finite although every input is finite: the log-probs are too large for the compute dtype. " +
            "Check the scale of the inputs (summed log-probs of real sequences are rarely beyond 1e6).");
    }

    /// <summary>
    /// Checks the loss-specific inputs and returns the extra tensors whose values must be finite (examined when the result
    /// is not finite). Structural problems (shape, dtype, device, missing inputs) throw at once; checks of values on the
    /// device are registered in <paramref name="checks"/>, read back after the formula in the call's single synchronisation.
    /// </summary>
    private protected virtual IEnumerable<(Tensor? Tensor, string Name)> Validate(PreferenceBatch batch, DeferredChecks checks) =>
        Array.Empty<(Tensor?, string)>();

    /// <summary>The formula: per-example losses and loss-specific metrics, computed from the upcast terms.</summary>
    private protected abstract LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch);

    private void ValidateCommon(PreferenceBatch batch)
    {
        var policy = batch.Policy;
        if (!policy.IsPaired && !SupportsUnpaired)
            throw new ArgumentException(
                $"The {Name} loss needs paired log-probs (row i of chosen and rejected answer the same prompt); got unpaired ones.",
                "policy");
        if (batch.Reference is not { } reference) return;
        if (reference.IsPaired != policy.IsPaired)
            throw new ArgumentException(
                $"reference is {(reference.IsPaired ? "paired" : "unpaired")} but policy is {(policy.IsPaired ? "paired" : "unpaired")}; build both the same way.",
                "reference");
        Guard.SameLength(policy.Chosen, "policy.Chosen", reference.Chosen, "reference.Chosen");
        Guard.SameLength(policy.Rejected, "policy.Rejected", reference.Rejected, "reference.Rejected");
        policy.CheckSameDevice(reference.Chosen, "reference.Chosen");
    }

    /// <summary>Validates a per-example side input: 1-D, floating, one row per pair, on the policy's device.</summary>
    private protected static void CheckPerExample(Tensor? t, PreferenceBatch batch, string name, string meaning)
    {
        if (t is null)
            throw new ArgumentException($"{name} is required: {meaning}.", name);
        Guard.NotDisposed(t, name);
        Guard.Rank(t, 1, name, $"[batch] ({meaning})");
        Guard.Floating(t, name);
        Guard.SameLength(batch.Policy.Chosen, "policy.Chosen", t, name);
        batch.Policy.CheckSameDevice(t, name);
    }
}
