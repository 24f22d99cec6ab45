namespace Alignment.Losses;

/// <summary>Options shared by every loss. Loss-specific options records derive from it.</summary>
public abstract record PreferenceLossOptions
{
    /// <summary>
    /// When true (the default), a NaN/Inf anywhere in the inputs raises a clear <see cref="ArgumentException"/> naming
    /// the offending input. The check is one small isfinite over [loss, metrics]; its verdict is read back in the call's
    /// single host-device synchronisation, together with the loss's value checks (win-rates in [0, 1], positive score
    /// gaps, token counts, non-negative weights), which always run. The inputs are examined one by one only when it
    /// fails. Turn it off only in a hot loop whose inputs are known to be finite: a NaN input then propagates to the
    /// loss, and a call without value checks (DPO, cDPO, robust DPO, hinge, IPO on sums, SPO without example weights,
    /// RPO without weights or embeddings) then makes no synchronisation at all.
    /// </summary>
    public bool CheckFinite { get; init; } = true;
}
