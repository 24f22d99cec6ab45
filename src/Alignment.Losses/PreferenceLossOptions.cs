namespace Alignment.Losses;

/// <summary>Options shared by every loss. Loss-specific options records derive from it.</summary>
public abstract record PreferenceLossOptions
{
    /// <summary>
    /// When true (the default), a NaN/Inf anywhere in the inputs raises a clear <see cref="ArgumentException"/> naming
    /// the offending input. The check costs one small isfinite over the loss and metrics and one host-device
    /// synchronisation per call; the inputs are examined one by one only when it fails. Turn it off only in a hot loop
    /// whose inputs are known to be finite: a NaN input then propagates to the loss.
    /// </summary>
    public bool CheckFinite { get; init; } = true;
}
