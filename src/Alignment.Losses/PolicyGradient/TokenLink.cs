using Alignment.Losses.Internal;

namespace Alignment.Losses;

/// <summary>The value and derivative of a per-token policy term at one token (see <see cref="TokenLink.FromFunction"/>).</summary>
/// <param name="logProb">l_t, the policy's log-prob of the token.</param>
/// <param name="logRatio">log rho_t: the log of the importance ratio (l_t - l_old,t clamped, or GSPO-token's sequence mean).</param>
/// <param name="ratioSlope">d log rho_t / d l_t: 1, or 0 where the log-ratio clamp is active.</param>
/// <param name="advantage">A_t.</param>
/// <returns>L_t and dL_t / dl_t (the total derivative: the direct one plus dL/dlog rho times <paramref name="ratioSlope"/>).</returns>
public delegate (double Loss, double Slope) PolicyTermFunction(double logProb, double logRatio, double ratioSlope, double advantage);

/// <summary>
/// A policy-gradient loss's per-token policy term written for the fused CPU pass: a loss that returns one from
/// <see cref="PolicyGradientLoss{TOptions}.Link"/> runs on the CPU in one managed pass over [N, T] (the ratio, the term,
/// the top-entropy mask, the rollout weights, the KL term, the entropy bonus, the metrics and the checks together; see
/// <see cref="PolicyGradientOptions.FusedCpu"/>), as GRPO, DAPO, CISPO, SAPO and the others do with terms of their own.
/// The loss's <c>PolicyTerm</c> stays the definition (CUDA, packed batches, failed checks); the two must agree.
/// </summary>
public abstract class TokenLink
{
    private protected TokenLink() { }

    /// <summary>
    /// A term from a function of (l, log rho, d log rho / dl, A) returning (L, dL/dl), evaluated in float64 per token (one
    /// delegate call per token: slower than the library's vectorised terms, still one pass instead of an op-by-op graph).
    /// </summary>
    /// <param name="term">The term: finite for finite inputs, also at (0, 0, 1, 0), which masked-out lanes evaluate.</param>
    /// <param name="ratio">The ratio the term reads: per token, or GSPO-token's (a per-token gradient either way).</param>
    /// <exception cref="ArgumentException">A sequence-level ratio (SequenceMean, SequenceSum), whose gradient couples a
    /// sequence's tokens: such a term runs op by op.</exception>
    public static TokenLink FromFunction(PolicyTermFunction term, ImportanceRatio ratio = ImportanceRatio.Token)
    {
        ArgumentNullException.ThrowIfNull(term);
        if (ratio is not (ImportanceRatio.Token or ImportanceRatio.SequenceMeanToken))
            throw new ArgumentException(
                $"A term from a function reads a per-token ratio (Token or SequenceMeanToken); {ratio} couples a sequence's tokens in its gradient, " +
                "so a loss with it runs op by op (return null from Link).", nameof(ratio));
        return new FunctionLink(term, ratio);
    }

    /// <summary>The ratio the term reads (the loss's options decide it for the library's terms).</summary>
    internal virtual ImportanceRatio? Ratio => null;

    /// <summary>Whether the term reads the ratio at all (REINFORCE does not).</summary>
    internal virtual bool UsesRatio => true;

    /// <summary>Whether the term differentiates through the ratio (then only ratios with a per-token gradient can be fused).</summary>
    internal virtual bool DifferentiatesRatio => true;

    /// <summary>How many indicators the term writes (0 to 2).</summary>
    internal virtual int Flags => 0;

    /// <summary>Runs rows [from, to) of <paramref name="job"/> with this term in the job's lane type.</summary>
    internal abstract void Rows(PolicyRows job, long from, long to);

    /// <summary>The term's own metrics from its indicators' totals, in the order its op-by-op term reports them.</summary>
    internal virtual void AddMetrics(in FlagTotals totals, List<(string Name, double Value)> metrics) { }
}

