using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Which AOT contrast.</summary>
public enum AotForm
{
    /// <summary>d = sort(l_pol_w - l_pol_l) - sort(l_ref_w - l_ref_l): the policy's and the reference's pair margins, each sorted (TRL "aot").</summary>
    Paired,

    /// <summary>d = sort(u_w) - sort(u_l): the chosen and the rejected log-ratios, each sorted (TRL "aot_unpaired").</summary>
    Unpaired,
}

/// <summary>Options of <see cref="AotLoss"/>: beta, the form, and the label smoothing.</summary>
public sealed record AotOptions : BetaOptions
{
    /// <summary>Paired (default) or unpaired.</summary>
    public AotForm Form { get; init => field = Guard.Defined(value, nameof(Form)); } = AotForm.Paired;

    /// <summary>
    /// eps in [0, 1], as TRL accepts it: the loss on each sorted difference is (1 - eps) softplus(-beta d) + eps softplus(beta d).
    /// Default 0. At eps = 0.5 the loss is symmetric in d (no preference is learned: its gradient at d = 0 is zero), and
    /// above 0.5 it prefers the rejected side (flipped labels); both are accepted because TRL's config accepts them.
    /// </summary>
    public double LabelSmoothing { get; init => field = Guard.InClosedRange(value, 0, 1, nameof(LabelSmoothing)); } = 0;
}

/// <summary>
/// AOT, alignment via optimal transport (Melnyk et al. 2024, arXiv 2406.05882); TRL loss_type "aot" and "aot_unpaired".
/// </summary>
/// <remarks>
/// <para>The batch's differences are sorted before they are compared: the k-th smallest policy margin is matched with the
/// k-th smallest reference margin (paired), or the k-th smallest chosen log-ratio with the k-th smallest rejected one
/// (unpaired), which enforces first-order stochastic dominance of the chosen rewards over the rejected ones. Per rank k:
/// L_k = (1 - eps) softplus(-beta d_k) + eps softplus(beta d_k). No score map, as in TRL.</para>
/// <para><b>Per-example losses are per rank, not per pair</b> (row k is the k-th sorted difference), so
/// <see cref="PreferenceBatch.ExampleWeights"/> are refused, and the loss of a micro-batch is not a slice of the loss of
/// the whole batch. Needs paired log-probs of equal length (the unpaired form sorts the two sides separately).</para>
/// <para>Gradient: sorting is monotone, so every l_pol(y_w) is pushed up and every l_pol(y_l) down while eps = 0; with
/// eps &gt; 0 each rank's pull reverses past beta d = ln((1 - eps) / eps), as in cDPO. Loss at initialisation: ln 2.</para>
/// </remarks>
public sealed class AotLoss : PreferenceLoss<AotOptions>
{
    /// <summary>Creates the loss; default beta 0.1, paired, eps 0.</summary>
    public AotLoss(AotOptions? options = null) : base(options ?? new AotOptions()) { }

    /// <inheritdoc />
    /// <remarks>"aot" or "aot_unpaired".</remarks>
    public override string Name => Options.Form == AotForm.Unpaired ? "aot_unpaired" : "aot";

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        Tensor d;
        if (Options.Form == AotForm.Unpaired)
        {
            d = Sorted(terms.ChosenLogRatio) - Sorted(terms.RejectedLogRatio);
        }
        else
        {
            var policy = Sorted(terms.PolicyChosen - terms.PolicyRejected);
            d = terms.ReferenceChosen is { } rc ? policy - Sorted(rc - terms.ReferenceRejected!) : policy;
        }
        return new(PreferenceMath.LabelSmoothed(d * Options.Beta, Options.LabelSmoothing));
    }

    private static Tensor Sorted(Tensor x) => x.sort(0).Values;

    /// <summary>Refused: AOT's per-example losses are per rank, so a per-pair weight has nothing to multiply.</summary>
    /// <exception cref="ArgumentException">Always.</exception>
    protected override Tensor ApplyExampleWeights(Tensor perExample, Tensor weights) =>
        throw new ArgumentException($"The {Name} loss sorts the batch, so its per-example losses are per rank, not per pair: per-pair weights (WPO included) do not apply. TRL refuses use_weighting with AOT too.",
            "batch.ExampleWeights");

    /// <summary>AOT with default (or given) options.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, AotOptions? options = null) =>
        new AotLoss(options).Compute(new PreferenceBatch(policy, reference));
}
