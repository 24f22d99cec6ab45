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
    /// The chosen responses' negative log-likelihood as TRL computes it, a token-weighted mean over the batch,
    /// -sum_i l_w,i / sum_i n_w,i, spread over the pairs so that their mean is exactly that: pair i carries
    /// -l_w,i * B / sum n_w. Returns (per pair, the batch value).
    /// </summary>
    internal static (Tensor PerPair, Tensor Value) TokenWeightedNll(PreferenceTerms terms, string lossName)
    {
        var (nw, _) = terms.TokenCounts(lossName, needRejected: false);
        var total = nw.sum();
        var perPair = -terms.PolicyChosen * (nw.shape[0] / total);
        return (perPair, -terms.PolicyChosen.sum() / total);
    }
}
