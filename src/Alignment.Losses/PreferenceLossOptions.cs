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

    /// <summary>
    /// When true (the default), a loss written as a function of the pair's scores (<see cref="PairLink"/>, or
    /// <see cref="MarginLink"/> of their margin: DPO, cDPO, robust DPO, hinge, IPO, EXO, DiscoPOP, NCA, BCO paired,
    /// APO-zero, APO-down and sigmoid_norm, with any score map but APO-down's) runs on the CPU in one managed pass: log ratios, scores,
    /// the link's value and slopes, the standard metrics and the checks over the inputs' memory, returned through a
    /// surrogate whose value is the loss and whose gradient is the saved one. It agrees with the op-by-op path to float64 rounding (float64
    /// inputs) or float32 rounding (float32, bfloat16 and float16 inputs, computed in float64 then rounded), errors
    /// included (a failed check reruns op by op, which names the input). The surrogate has no second derivative: set
    /// false for double backward (or to compare the two paths). CUDA tensors, unpaired batches, example weights and
    /// batches of more than 16.7 million pairs always run op by op.
    /// </summary>
    public bool FusedCpu { get; init; } = true;
}
