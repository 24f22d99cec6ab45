using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>The pieces the reference-free pairwise losses (CPO, SimPO, AlphaPO, ORPO) share.</summary>
internal static class ReferenceFreeMath
{
    /// <summary>Per-token mean log-probs (a_w, a_l) = (l_w / n_w, l_l / n_l).</summary>
    internal static (Tensor Chosen, Tensor Rejected) Means(PreferenceTerms terms, string lossName)
    {
        var (nw, nl) = terms.TokenCounts(lossName);
        return (terms.PolicyChosen / nw, terms.PolicyRejected / nl);
    }

    /// <summary>
    /// AlphaPO's reward shape r = (1 - p^(-alpha)) / alpha with p = exp(x), written -expm1(-alpha x) / alpha so that it is
    /// exact as alpha → 0 (where r → x); alpha = 0 is x itself.
    /// </summary>
    internal static Tensor AlphaReward(Tensor x, double alpha) => alpha == 0 ? x : -(x * -alpha).expm1() / alpha;

    /// <summary>
    /// The chosen responses' negative log-likelihood as TRL computes it, a token-weighted mean over the batch,
    /// -sum_i l_w,i / sum_i n_w,i, spread over the pairs so that their mean is exactly that: pair i carries
    /// -l_w,i * B / sum n_w. With <paramref name="extraTokens"/> and <paramref name="extraLogps"/> (ORPO's prompt tokens)
    /// they join the sums: -sum_i (l_w,i + p_i) / sum_i (n_w,i + m_i). Returns (per pair, the batch value).
    /// </summary>
    internal static (Tensor PerPair, Tensor Value) TokenWeightedNll(PreferenceTerms terms, string lossName,
        Tensor? extraTokens = null, Tensor? extraLogps = null)
    {
        var (nw, _) = terms.TokenCounts(lossName, needRejected: false);
        var total = extraTokens is null ? nw.sum() : (nw + extraTokens).sum();
        var logps = extraLogps is null ? terms.PolicyChosen : terms.PolicyChosen + extraLogps;
        var perPair = -logps * (nw.shape[0] / total);
        return (perPair, -logps.sum() / total);
    }
}
