namespace Alignment.Losses;

/// <summary>
/// A preference-alignment objective computed from per-sequence log-probabilities.
/// </summary>
/// <remarks>
/// Every loss in the library implements this interface, so training code can switch losses without changing
/// anything else, and generic machinery (benchmarks, the fused log-prob path) can drive any of them. Each loss
/// also has a static <c>Compute(...)</c> with default options for one-line use.
/// </remarks>
public interface IPreferenceLoss
{
    /// <summary>A short name for tables and logs, e.g. "dpo" or "rpo".</summary>
    string Name { get; }

    /// <summary>Computes the loss of one batch.</summary>
    /// <param name="batch">Policy (and optional reference) log-probs plus whatever side inputs the loss needs.</param>
    /// <returns>The loss, per-example losses and metrics. Dispose it after the backward pass.</returns>
    /// <exception cref="ArgumentException">The batch is malformed or lacks an input this loss needs; the message names it.</exception>
    PreferenceLossResult Compute(PreferenceBatch batch);
}
