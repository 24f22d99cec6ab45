using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Per-sequence log-probabilities of chosen (preferred, y_w) and rejected (dispreferred, y_l) responses:
/// l(y|x) = sum over completion tokens of log p(y_t | x, y_&lt;t), prompt and padding masked out.
/// </summary>
/// <remarks>
/// <para>
/// A <em>paired</em> instance (the constructor, or <see cref="Paired"/>) holds B preference pairs: row i of
/// <see cref="Chosen"/> and row i of <see cref="Rejected"/> answer the same prompt. An <em>unpaired</em> instance
/// (<see cref="Unpaired(Tensor, Tensor)"/>) holds M chosen and N rejected examples with no row correspondence; only losses that
/// support unpaired data (RPO) accept it.
/// </para>
/// <para>
/// Accepted dtypes: float16, bfloat16, float32, float64. Losses compute in float32 (float64 when an input is
/// float64). All tensors must live on one device. The instance does not own the tensors: disposing them is the
/// caller's business.
/// </para>
/// </remarks>
public sealed class PreferenceLogps
{
    /// <summary>Creates paired log-probs: <paramref name="chosen"/>[i] and <paramref name="rejected"/>[i] form pair i.</summary>
    /// <param name="chosen">[B] summed log-probs of the chosen responses.</param>
    /// <param name="rejected">[B] summed log-probs of the rejected responses.</param>
    /// <param name="chosenTokenCounts">Optional [B] number of completion tokens of each chosen response (needed by
    /// length-normalised losses: IPO with per-token means, DPO+NLL).</param>
    /// <param name="rejectedTokenCounts">Optional [B] number of completion tokens of each rejected response.</param>
    /// <exception cref="ArgumentException">A tensor is not 1-D, not floating, empty, on another device, or the lengths differ.</exception>
    public PreferenceLogps(Tensor chosen, Tensor rejected, Tensor? chosenTokenCounts = null, Tensor? rejectedTokenCounts = null)
        : this(chosen, rejected, chosenTokenCounts, rejectedTokenCounts, isPaired: true)
    {
    }

    private PreferenceLogps(Tensor chosen, Tensor rejected, Tensor? chosenTokenCounts, Tensor? rejectedTokenCounts, bool isPaired)
    {
        Guard.Usable(chosen, nameof(chosen));
        Guard.Usable(rejected, nameof(rejected));
        CheckLogps(chosen, nameof(chosen), allowEmpty: !isPaired);
        CheckLogps(rejected, nameof(rejected), allowEmpty: !isPaired);
        if (!isPaired && chosen.shape[0] == 0 && rejected.shape[0] == 0)
            throw new ArgumentException("chosen and rejected are both empty: an unpaired batch needs at least one example on one side.", nameof(rejected));
        Guard.SameDevice(chosen, nameof(chosen), rejected, nameof(rejected));
        if (isPaired && chosen.shape[0] != rejected.shape[0])
            throw new ArgumentException(
                $"rejected has {rejected.shape[0]} rows but chosen has {chosen.shape[0]}: paired log-probs need one rejected per chosen. " +
                "Use PreferenceLogps.Unpaired for unpaired data (RPO).", nameof(rejected));
        CheckCounts(chosenTokenCounts, chosen, nameof(chosenTokenCounts));
        CheckCounts(rejectedTokenCounts, rejected, nameof(rejectedTokenCounts));
        Chosen = chosen;
        Rejected = rejected;
        ChosenTokenCounts = chosenTokenCounts;
        RejectedTokenCounts = rejectedTokenCounts;
        IsPaired = isPaired;
    }

    /// <summary>Paired log-probs (same as the constructor).</summary>
    public static PreferenceLogps Paired(Tensor chosen, Tensor rejected) => new(chosen, rejected);

    /// <summary>
    /// Unpaired log-probs: M chosen (desirable) and N rejected (undesirable) examples, M and N independent, no row
    /// correspondence; one side may be empty, not both. Only losses that support unpaired data accept it (RPO with
    /// <see cref="PromptEmbeddings.Unpaired"/>, which needs both sides; KTO, apo_zero_unpaired and BCO, which do not).
    /// </summary>
    public static PreferenceLogps Unpaired(Tensor chosen, Tensor rejected) =>
        new(chosen, rejected, null, null, isPaired: false);

    /// <summary>Unpaired log-probs with completion-token counts (see <see cref="Unpaired(Tensor, Tensor)"/>).</summary>
    public static PreferenceLogps Unpaired(Tensor chosen, Tensor rejected, Tensor? chosenTokenCounts, Tensor? rejectedTokenCounts) =>
        new(chosen, rejected, chosenTokenCounts, rejectedTokenCounts, isPaired: false);

    /// <summary>[B] (or [M] when unpaired) summed log-probs of the chosen responses.</summary>
    public Tensor Chosen { get; }

    /// <summary>[B] (or [N] when unpaired) summed log-probs of the rejected responses.</summary>
    public Tensor Rejected { get; }

    /// <summary>Optional completion-token counts of the chosen responses.</summary>
    public Tensor? ChosenTokenCounts { get; }

    /// <summary>Optional completion-token counts of the rejected responses.</summary>
    public Tensor? RejectedTokenCounts { get; }

    /// <summary>True when row i of <see cref="Chosen"/> and row i of <see cref="Rejected"/> form a pair.</summary>
    public bool IsPaired { get; }

    /// <summary>Number of chosen rows (M, or B when paired).</summary>
    public long ChosenCount => Chosen.shape[0];

    /// <summary>Number of rejected rows (N, or B when paired).</summary>
    public long RejectedCount => Rejected.shape[0];

    /// <summary>The device of the tensors.</summary>
    public Device Device => Chosen.device;

    /// <summary>Returns a copy that carries token counts (for IPO with per-token means and DPO+NLL).</summary>
    public PreferenceLogps WithTokenCounts(Tensor chosenTokenCounts, Tensor rejectedTokenCounts) =>
        new(Chosen, Rejected, chosenTokenCounts, rejectedTokenCounts, IsPaired);

    internal void CheckSameDevice(Tensor other, string name) => Guard.SameDevice(Chosen, "policy log-probs", other, name);

    /// <summary>At compute time: none of the tensors has been disposed since construction (names them as prefix.Chosen...).</summary>
    internal void CheckUsable(string prefix)
    {
        Guard.Usable(Chosen, prefix + ".Chosen");
        Guard.Usable(Rejected, prefix + ".Rejected");
        if (ChosenTokenCounts is not null) Guard.Usable(ChosenTokenCounts, prefix + ".ChosenTokenCounts");
        if (RejectedTokenCounts is not null) Guard.Usable(RejectedTokenCounts, prefix + ".RejectedTokenCounts");
    }

    private static void CheckLogps(Tensor t, string name, bool allowEmpty)
    {
        Guard.Rank(t, 1, name, "of per-sequence log-probabilities [batch]");
        Guard.Floating(t, name);
        if (!allowEmpty) Guard.NotEmpty(t, name);
    }

    private static void CheckCounts(Tensor? counts, Tensor logps, string name)
    {
        if (counts is null) return;
        Guard.Usable(counts, name);
        Guard.Rank(counts, 1, name, "of token counts [batch]");
        Guard.SameLength(logps, "the log-probs", counts, name);
        Guard.SameDevice(logps, "the log-probs", counts, name);
        if (counts.dtype == ScalarType.Bool)
            throw new ArgumentException($"{name} must be numeric (integer or floating); got Bool.", name);
    }
}
