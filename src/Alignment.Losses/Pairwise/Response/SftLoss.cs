using TorchSharp;

namespace Alignment.Losses;

/// <summary>Options of <see cref="SftLoss"/>: beta scales the reward metrics only (TRL's DPOConfig beta; the loss has none).</summary>
public sealed record SftOptions : BetaOptions;

/// <summary>
/// The supervised term of preference training: the negative log-likelihood of the chosen completions, as a token-weighted
/// mean over the batch (TRL loss_type "sft", a cross-entropy over all chosen completion tokens). Mostly used in weighted
/// combinations (MPO = sigmoid 0.8 + bco_pair 0.2 + sft 1.0, see <see cref="WeightedLoss"/>).
/// </summary>
/// <remarks>
/// <para>L = -(sum_i l_pol(y_w,i)) / (sum_i n_w,i): one batch scalar, reported as the same value for every pair so that the
/// per-example mean is the loss. Needs chosen token counts. Ignores the rejected responses and the reference.</para>
/// <para>Gradient: every chosen response is pushed up by 1 / (sum_i n_w,i); the rejected ones get none.</para>
/// <para>With LD-DPO log-probs (<see cref="SequenceLogProbsOptions.LdAlpha"/>) the chosen sums are the LD-weighted ones;
/// TRL's sft reads the unweighted logits instead.</para>
/// </remarks>
public sealed class SftLoss : PreferenceLoss<SftOptions>
{
    /// <summary>Creates the loss.</summary>
    public SftLoss(SftOptions? options = null) : base(options ?? new SftOptions()) { }

    /// <inheritdoc />
    public override string Name => "sft";

    /// <inheritdoc />
    /// <remarks>beta: the reward metrics are beta times the log-ratios, as TRL's DPOTrainer logs them for every loss type
    /// (the loss itself does not depend on beta).</remarks>
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var (nw, _) = terms.TokenCounts(Name, needRejected: false);
        var nll = -terms.PolicyChosen.sum() / nw.sum();
        return new(nll.expand(terms.PolicyChosen.shape[0]), new[] { (MetricNames.NllLoss, nll) });
    }

    /// <summary>The SFT term with default options. The policy log-probs must carry chosen token counts.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, SftOptions? options = null) =>
        new SftLoss(options).Compute(new PreferenceBatch(policy));
}
