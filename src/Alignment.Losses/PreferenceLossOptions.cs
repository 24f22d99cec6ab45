namespace Alignment.Losses;

/// <summary>Options shared by every loss. Loss-specific options records derive from it.</summary>
public abstract record PreferenceLossOptions
{
    /// <summary>
    /// When true (the default), every input is checked for NaN/Inf before the loss is computed, with one
    /// host-device synchronisation per call, and a clear <see cref="ArgumentException"/> names the offending input.
    /// Turn it off only in a hot loop whose inputs are known to be finite: a NaN input then propagates to the loss.
    /// </summary>
    public bool CheckFinite { get; init; } = true;
}
