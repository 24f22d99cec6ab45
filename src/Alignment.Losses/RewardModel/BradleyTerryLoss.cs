using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Options of <see cref="BradleyTerryLoss"/>.</summary>
public sealed record BradleyTerryOptions : PreferenceLossOptions
{
    /// <summary>
    /// c in [0, 1e12], the weight of the centering term c mean((r_w + r_l)^2) (TRL's <c>center_rewards_coefficient</c>;
    /// Eisenstein et al. 2023 use 0.01). Default 0: off.
    /// </summary>
    public double CenteringCoefficient { get; init => field = Guard.Weight(value, nameof(CenteringCoefficient)); }
}

/// <summary>
/// The Bradley-Terry reward-model loss (Ouyang et al. 2022; TRL's RewardTrainer): scalar rewards r_w, r_l of the chosen and
/// rejected responses, trained so that the chosen one scores higher.
/// </summary>
/// <remarks>
/// <para>Input: the rewards as <c>new PreferenceLogps(rewardsChosen, rewardsRejected)</c> (a reward head's outputs, with grad;
/// the "log-probs" slots hold rewards), no reference, and an optional per-pair margin m [B] (TRL's "margin" column), given
/// to <see cref="WithMargin"/> or <see cref="Compute(Tensor, Tensor, Tensor?, BradleyTerryOptions?)"/>. Per pair: softplus(-(r_w - r_l - m)) + c ((r_w + r_l)^2) (the centering term's mean over pairs is the term of the
/// loss). Optimum without margin or centering: P(chosen wins) = sigmoid(r_w - r_l).</para>
/// <para>Metrics (TRL's): accuracy = mean 1[r_w &gt; r_l], margin = mean(r_w - r_l), mean_reward, min_reward, max_reward
/// over all 2B rewards. The standard log-prob metrics are not reported (there are no log-probs).</para>
/// </remarks>
public sealed class BradleyTerryLoss : PreferenceLoss<BradleyTerryOptions>
{
    private readonly Tensor? _margin;

    /// <summary>Creates the loss; default no centering.</summary>
    public BradleyTerryLoss(BradleyTerryOptions? options = null) : this(options, null) { }

    private BradleyTerryLoss(BradleyTerryOptions? options, Tensor? margin) : base(options ?? new BradleyTerryOptions()) => _margin = margin;

    /// <summary>A loss that subtracts the per-pair margin m [B] (TRL's "margin" column), for one batch.</summary>
    public BradleyTerryLoss WithMargin(Tensor margin) => new(Options, margin ?? throw new ArgumentNullException(nameof(margin)));

    /// <summary>The per-pair margin this instance uses, if any.</summary>
    public Tensor? RewardMargin => _margin;

    /// <inheritdoc />
    public override string Name => "bradley_terry";

    /// <inheritdoc />
    protected override double RewardScale => 1;

    /// <inheritdoc />
    protected override ReferenceUse ReferenceUse => ReferenceUse.Refused;

    /// <inheritdoc />
    /// <remarks>False: the log-prob slots hold the reward head's scores, which may be positive.</remarks>
    protected override bool InputsAreLogProbs => false;

    /// <inheritdoc />
    protected override bool ReportsStandardMetrics => false;

    /// <inheritdoc />
    protected override IEnumerable<(Tensor? Tensor, string Name)> Validate(PreferenceBatch batch, ValueChecks checks)
    {
        if (_margin is null) return Array.Empty<(Tensor?, string)>();
        CheckPerExample(_margin, batch, "margin", "the per-pair reward margins");
        return new[] { ((Tensor?)_margin, "margin") };
    }

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var (rw, rl) = (terms.PolicyChosen, terms.PolicyRejected);
        var difference = rw - rl;
        var perExample = PreferenceMath.NegLogSigmoid(_margin is null ? difference : difference - terms.Upcast(_margin));
        if (Options.CenteringCoefficient > 0) perExample = perExample + (rw + rl).square() * Options.CenteringCoefficient;
        Tensor accuracy, margin, mean, min, max;
        using (no_grad())
        {
            var all = cat(new[] { rw.detach(), rl.detach() }, 0);
            (accuracy, margin, mean, min, max) = ((difference.detach() > 0).to_type(terms.DType).mean(), difference.detach().mean(), all.mean(), all.min(), all.max());
        }
        return new(perExample, new[] { (MetricNames.Accuracy, accuracy), (MetricNames.Margin, margin), (MetricNames.MeanReward, mean), (MetricNames.MinReward, min), (MetricNames.MaxReward, max) });
    }

    /// <summary>The loss of scalar rewards [B] with an optional per-pair margin [B].</summary>
    public static PreferenceLossResult Compute(Tensor rewardsChosen, Tensor rewardsRejected, Tensor? margin = null, BradleyTerryOptions? options = null)
    {
        var loss = new BradleyTerryLoss(options, margin);
        return loss.Compute(new PreferenceBatch(new PreferenceLogps(rewardsChosen, rewardsRejected)));
    }
}
