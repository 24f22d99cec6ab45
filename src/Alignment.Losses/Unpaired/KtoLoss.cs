using System.Diagnostics;
using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Options of the unpaired losses <see cref="KtoLoss"/> and <see cref="ApoZeroUnpairedLoss"/>.</summary>
public sealed record KtoOptions : BetaOptions
{
    /// <summary>lambda_D in [0, 1e12], the weight of the desirable examples' losses (TRL's <c>desirable_weight</c>). Default 1.</summary>
    public double DesirableWeight { get; init => field = Guard.Weight(value, nameof(DesirableWeight)); } = 1.0;

    /// <summary>lambda_U in [0, 1e12], the weight of the undesirable examples' losses (TRL's <c>undesirable_weight</c>). Default 1.</summary>
    public double UndesirableWeight { get; init => field = Guard.Weight(value, nameof(UndesirableWeight)); } = 1.0;
}

/// <summary>
/// KTO, Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306; TRL's KTOTrainer): learns from unpaired
/// thumbs-up / thumbs-down examples.
/// </summary>
/// <remarks>
/// <para>Input: <see cref="PreferenceLogps.Unpaired(Tensor, Tensor)"/> with D desirable examples as "chosen" and U undesirable as
/// "rejected" (either side may be empty, not both), with reference log-probs, and a reference point: z0 =
/// max(0, mean(l_pol - l_ref)) over mismatched pairs (<see cref="PreferenceBatch.Mismatched"/>), or a precomputed estimate
/// in <see cref="PreferenceBatch.KlDivergence"/> (clamped at 0); always detached. With u = l_pol - l_ref:
/// desirable loss lambda_D (1 - sigmoid(beta (u - z0))), undesirable loss lambda_U (1 - sigmoid(beta (z0 - u))); the loss
/// is the mean over the D + U examples (desirable first in <see cref="PreferenceLossResult.PerExample"/>). Paired log-probs
/// are accepted too and unpaired (chosen desirable, rejected undesirable), as TRL's KTOTrainer does with paired datasets.
/// 1 - sigmoid(x) is computed as sigmoid(-x) (no cancellation). Each example's loss lies in [0, lambda].</para>
/// <para>TRL's advice on balance: keep lambda_D D / (lambda_U U) in [1, 4/3] over the dataset
/// (<see cref="BalanceAdvice"/> checks it and warns; it is never an error). Metrics: the standard ones (means over the
/// examples present, 0 for an empty side) and kl (the z0 used).</para>
/// </remarks>
public sealed class KtoLoss : UnpairedPreferenceLoss<KtoOptions>
{
    /// <summary>Creates the loss; default beta 0.1, lambda_D = lambda_U = 1.</summary>
    public KtoLoss(KtoOptions? options = null) : base(options ?? new KtoOptions()) { }

    /// <inheritdoc />
    public override string Name => "kto";

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override IEnumerable<(Tensor? Tensor, string Name)> Validate(PreferenceBatch batch, ValueChecks checks)
    {
        if (batch.Mismatched is not null && batch.KlDivergence is not null)
            throw new ArgumentException(
                "KTO's reference point comes from batch.Mismatched (z0 = mean of the mismatched pairs' log-ratios) or from batch.KlDivergence (a precomputed z0), not both: set one.",
                "batch.KlDivergence");
        if (batch.Mismatched is { } m)
        {
            foreach (var (t, name) in new[] { (m.Policy, "batch.Mismatched.Policy"), (m.Reference, "batch.Mismatched.Reference") })
            {
                Guard.Usable(t, name);
                Guard.Rank(t, 1, name, "[K] log-probs of mismatched pairs");
                Guard.Floating(t, name);
                Guard.NotEmpty(t, name);
                batch.Policy.CheckSameDevice(t, name);
            }
            Guard.SameLength(m.Policy, "batch.Mismatched.Policy", m.Reference, "batch.Mismatched.Reference");
            return new[] { ((Tensor?)m.Policy, "batch.Mismatched.Policy"), (m.Reference, "batch.Mismatched.Reference") };
        }
        if (batch.KlDivergence is { } kl)
        {
            Guard.ScalarOrVector(kl, "batch.KlDivergence");
            batch.Policy.CheckSameDevice(kl, "batch.KlDivergence");
            return new[] { ((Tensor?)kl, "batch.KlDivergence") };
        }
        throw new ArgumentException(
            "KTO needs its reference point z0: batch.Mismatched (policy and reference log-probs of mismatched prompt-completion pairs) " +
            "or batch.KlDivergence (a precomputed estimate; pass zeros(1) for z0 = 0).", "batch.Mismatched");
    }

    /// <summary>z0 = max(0, estimate), detached, in the compute dtype.</summary>
    internal static Tensor ReferencePoint(PreferenceTerms terms, PreferenceBatch batch)
    {
        using var noGrad = no_grad();
        var estimate = batch.Mismatched is { } m
            ? (terms.Upcast(m.Policy) - terms.Upcast(m.Reference)).mean()
            : terms.Upcast(batch.KlDivergence!).mean();
        return estimate.clamp_min(0);
    }

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var z0 = ReferencePoint(terms, batch);
        double beta = Options.Beta;
        var desirable = ((terms.ChosenLogRatio - z0) * -beta).sigmoid() * Options.DesirableWeight;     // 1 - sigmoid(beta (u - z0))
        var undesirable = ((z0 - terms.RejectedLogRatio) * -beta).sigmoid() * Options.UndesirableWeight;
        return new(cat(new[] { desirable, undesirable }, 0), new[] { (MetricNames.Kl, z0) });
    }

    /// <summary>
    /// TRL's balance advice for a dataset of <paramref name="desirable"/> and <paramref name="undesirable"/> examples: null
    /// when lambda_D D / (lambda_U U) is in [1, 4/3], otherwise a warning (also written to System.Diagnostics.Trace) with the
    /// weights that would bring it there. Never an error: imbalanced weights are a choice.
    /// </summary>
    public static string? BalanceAdvice(long desirable, long undesirable, KtoOptions? options = null)
    {
        options ??= new KtoOptions();
        if (desirable < 0) throw new ArgumentOutOfRangeException(nameof(desirable), desirable, "desirable must be >= 0 (a number of examples).");
        if (undesirable < 0) throw new ArgumentOutOfRangeException(nameof(undesirable), undesirable, "undesirable must be >= 0 (a number of examples).");
        if (desirable == 0 || undesirable == 0) return null;
        double ratio = options.DesirableWeight * desirable / (options.UndesirableWeight * undesirable);
        if (ratio >= 1 && ratio <= 4.0 / 3) return null;
        double low = undesirable * options.UndesirableWeight / desirable, high = low * 4 / 3;
        var advice = $"KTO: lambda_D * D / (lambda_U * U) = {ratio:G3} with D = {desirable}, U = {undesirable}; the KTO authors advise [1, 4/3]. " +
                     $"Consider DesirableWeight in [{low:G3}, {high:G3}] (keeping UndesirableWeight {options.UndesirableWeight}).";
        Trace.TraceWarning("Alignment.Losses: " + advice);
        return advice;
    }
}

/// <summary>
/// apo_zero_unpaired (D'Oosterlinck et al. 2024, arXiv 2408.06266; TRL KTOTrainer <c>loss_type="apo_zero_unpaired"</c>):
/// APO-zero on unpaired data, pushing desirable log-ratios up and undesirable ones down, with no reference point.
/// </summary>
/// <remarks>
/// Desirable loss lambda_D (1 - sigmoid(beta u)), undesirable loss lambda_U sigmoid(beta u), with u = l_pol - l_ref; mean over
/// the D + U examples. Same inputs and options as <see cref="KtoLoss"/>, without z0 (no mismatched pairs needed).
/// </remarks>
public sealed class ApoZeroUnpairedLoss : UnpairedPreferenceLoss<KtoOptions>
{
    /// <summary>Creates the loss; default beta 0.1, lambda_D = lambda_U = 1.</summary>
    public ApoZeroUnpairedLoss(KtoOptions? options = null) : base(options ?? new KtoOptions()) { }

    /// <inheritdoc />
    public override string Name => "apo_zero_unpaired";

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        double beta = Options.Beta;
        var desirable = (terms.ChosenLogRatio * -beta).sigmoid() * Options.DesirableWeight;
        var undesirable = (terms.RejectedLogRatio * beta).sigmoid() * Options.UndesirableWeight;
        return new(cat(new[] { desirable, undesirable }, 0));
    }
}
