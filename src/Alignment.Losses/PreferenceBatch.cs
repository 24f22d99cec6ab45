using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// One batch of preference data for <see cref="IPreferenceLoss.Compute"/>: policy log-probs, optional reference
/// log-probs, and the side inputs that particular losses need.
/// </summary>
/// <remarks>
/// Each loss reads only what it needs and says clearly when something it needs is missing; inputs it does not use
/// are ignored. The record does not own the tensors.
/// </remarks>
/// <param name="Policy">Log-probs under the policy being trained (with grad).</param>
/// <param name="Reference">Log-probs under the reference model (treated as constants: no gradient flows into them).
/// <see langword="null"/> means reference-free: l_ref = 0.</param>
public sealed record PreferenceBatch(PreferenceLogps Policy, PreferenceLogps? Reference = null)
{
    /// <summary>RPO: prompt embeddings that define the similarity weights (paired [N, D] or unpaired [M, D] / [N, D]).</summary>
    public PromptEmbeddings? PromptEmbeddings { get; init; }

    /// <summary>RPO: a caller-supplied weight matrix [M, N] (non-negative, finite) used instead of embedding similarity.</summary>
    public Tensor? RpoWeights { get; init; }

    /// <summary>ODPO: quality scores of the chosen and rejected responses.</summary>
    public ResponseScores? Scores { get; init; }

    /// <summary>SPPO: estimated win-rates (or a pairwise preference probability) of the responses against the current policy.</summary>
    public SppoWinRates? WinRates { get; init; }

    /// <summary>
    /// Optional non-negative per-example weights [B] (per chosen row for RPO), detached: every loss's per-example losses
    /// are multiplied by them, so the loss is mean_i w_i L_i. Use them for WPO (<see cref="SequenceLogProbsResult.WpoPairWeights"/>,
    /// TRL's <c>use_weighting</c>) or any per-pair weighting. SPO weights its preference term only (the paper's mu); AOT
    /// refuses weights (its per-example losses are per rank, not per pair).
    /// </summary>
    public Tensor? ExampleWeights { get; init; }

    /// <summary>
    /// SPO: the KL(policy || reference) estimate for the global regulariser, a scalar or per-sample [S] tensor
    /// (averaged), usually from <see cref="TokenKl.Compute"/> on sequences sampled from the policy. KTO: a precomputed
    /// reference point z0 (before its clamp at 0), instead of <see cref="Mismatched"/>.
    /// </summary>
    public Tensor? KlDivergence { get; init; }

    /// <summary>
    /// KTO: policy and reference log-probs of K mismatched (prompt, completion) pairs (each prompt with another example's
    /// completion), from which the reference point z0 = max(0, mean(l_pol - l_ref)) is estimated, detached.
    /// </summary>
    public MismatchedLogps? Mismatched { get; init; }

    /// <summary>
    /// ORPO: the policy's log-probs of each pair's prompt tokens (in the chosen sequence), for the NLL over prompt and
    /// completion that TRL's ORPOTrainer and the ORPO authors use by default (<see cref="OrpoNllTokens.PromptAndCompletion"/>).
    /// From one log-prob pass over <see cref="Data.CollatedPreferences.SequenceLabels"/>:
    /// <c>all.Within(collated.PromptMask).ToPromptLogps()</c>.
    /// </summary>
    public PromptLogps? Prompt { get; init; }
}

/// <summary>
/// ORPO: per pair, the summed log-probs [B] of the prompt tokens that are scored (with
/// <see cref="LabelAlignment.ShiftByOne"/>, every prompt token after the first) under the policy, with grad, and their
/// number [B]. The record does not own the tensors.
/// </summary>
/// <param name="Sum">[B] summed prompt-token log-probs (with grad: the NLL's gradient reaches the prompt tokens too).</param>
/// <param name="TokenCounts">[B] number of scored prompt tokens (finite, &gt;= 0).</param>
public sealed record PromptLogps(Tensor Sum, Tensor TokenCounts);

/// <summary>KTO: log-probs [K] of mismatched (prompt, completion) pairs under the policy and the reference model.</summary>
/// <param name="Policy">[K] policy log-probs (any gradient is ignored: z0 is detached).</param>
/// <param name="Reference">[K] reference log-probs.</param>
public sealed record MismatchedLogps(Tensor Policy, Tensor Reference);

/// <summary>ODPO: scalar quality scores s_w, s_l of each chosen and rejected response (e.g. reward-model outputs).</summary>
/// <param name="Chosen">[B] scores of the chosen responses.</param>
/// <param name="Rejected">[B] scores of the rejected responses.</param>
public sealed record ResponseScores(Tensor Chosen, Tensor Rejected);

/// <summary>SPPO: the probabilities the SPPO targets are built from.</summary>
public sealed record SppoWinRates
{
    private SppoWinRates(Tensor? chosen, Tensor? rejected, Tensor? pairwise)
    {
        Chosen = chosen;
        Rejected = rejected;
        Pairwise = pairwise;
    }

    /// <summary>p_w [B]: estimated probability that each chosen response beats the current policy.</summary>
    public Tensor? Chosen { get; }

    /// <summary>p_l [B]: estimated probability that each rejected response beats the current policy.</summary>
    public Tensor? Rejected { get; }

    /// <summary>p_wl [B]: a direct probability that the chosen response beats the rejected one (the sppo_single form).</summary>
    public Tensor? Pairwise { get; }

    /// <summary>Win-rates of each response against the current policy (the authors' default, <c>sppo</c>).</summary>
    public static SppoWinRates Individual(Tensor chosen, Tensor rejected) =>
        new(chosen ?? throw new ArgumentNullException(nameof(chosen)), rejected ?? throw new ArgumentNullException(nameof(rejected)), null);

    /// <summary>A direct pairwise probability P(y_w beats y_l) (the <c>sppo_single</c> form).</summary>
    public static SppoWinRates FromPairwise(Tensor chosenBeatsRejected) =>
        new(null, null, chosenBeatsRejected ?? throw new ArgumentNullException(nameof(chosenBeatsRejected)));
}
