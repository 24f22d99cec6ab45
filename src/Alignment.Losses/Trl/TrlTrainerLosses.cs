namespace Alignment.Losses;

/// <summary>
/// The loss fields of TRL's CPOConfig, ORPOConfig, KTOConfig and BCOConfig, in C# casing with TRL's defaults, for
/// <see cref="TrlLosses.CreateForTrainer"/>.
/// </summary>
public sealed record TrlTrainerConfig
{
    /// <summary><c>beta</c>. Default 0.1.</summary>
    public double Beta { get; init; } = 0.1;

    /// <summary><c>label_smoothing</c> (CPO sigmoid, SimPO, AlphaPO). Default 0.</summary>
    public double LabelSmoothing { get; init; }

    /// <summary>CPOConfig <c>loss_type</c> for "cpo": sigmoid (default), hinge or ipo.</summary>
    public string CpoLossType { get; init; } = "sigmoid";

    /// <summary><c>cpo_alpha</c>, the NLL weight of "cpo". Default 1.</summary>
    public double CpoAlpha { get; init; } = 1.0;

    /// <summary><c>simpo_gamma</c> (SimPO, AlphaPO). Default 0.5.</summary>
    public double SimpoGamma { get; init; } = 0.5;

    /// <summary>CPOConfig <c>alpha</c> for "alphapo". Default 0.25 (TRL's default 0 is SimPO).</summary>
    public double Alpha { get; init; } = 0.25;

    /// <summary><c>desirable_weight</c> (KTO, apo_zero_unpaired). Default 1.</summary>
    public double DesirableWeight { get; init; } = 1.0;

    /// <summary><c>undesirable_weight</c> (KTO, apo_zero_unpaired). Default 1.</summary>
    public double UndesirableWeight { get; init; } = 1.0;

    /// <summary>BCO's running reward mean, which the caller owns and checkpoints. Required for "bco".</summary>
    public BcoRewardBaseline? BcoBaseline { get; init; }
}

public static partial class TrlLosses
{
    /// <summary>The objectives of TRL's other preference trainers (CPOTrainer, ORPOTrainer, KTOTrainer, BCOTrainer).</summary>
    public static IReadOnlyList<string> TrainerObjectives { get; } = new[] { "cpo", "simpo", "alphapo", "orpo", "kto", "apo_zero_unpaired", "bco" };

    /// <summary>
    /// A loss by the name TRL's trainers use: cpo → <see cref="CpoLoss"/> (CPOConfig loss_type sigmoid/hinge/ipo, cpo_alpha);
    /// simpo → <see cref="SimPoLoss"/>; alphapo → <see cref="AlphaPoLoss"/>; orpo → <see cref="OrpoLoss"/>; kto →
    /// <see cref="KtoLoss"/>; apo_zero_unpaired → <see cref="ApoZeroUnpairedLoss"/>; bco → <see cref="BcoLoss"/> (needs
    /// <see cref="TrlTrainerConfig.BcoBaseline"/>). Any DPOTrainer loss_type name (<see cref="LossTypes"/>) gives the same
    /// loss as <see cref="Create(string, TrlDpoConfig?)"/> with this config's beta.
    /// </summary>
    /// <exception cref="ArgumentException">An unknown name (the message lists the valid ones) or a field out of range.</exception>
    public static IPreferenceLoss CreateForTrainer(string name, TrlTrainerConfig? config = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        config ??= new TrlTrainerConfig();
        switch (name)
        {
            case "cpo":
                var type = config.CpoLossType switch
                {
                    "sigmoid" => Losses.CpoLossType.Sigmoid,
                    "hinge" => Losses.CpoLossType.Hinge,
                    "ipo" => Losses.CpoLossType.Ipo,
                    _ => throw new ArgumentException($"CPO loss_type must be sigmoid, hinge or ipo (simpo is its own name here); got '{config.CpoLossType}'.", "loss_type"),
                };
                return new CpoLoss(new CpoOptions { Beta = config.Beta, LossType = type, LabelSmoothing = config.LabelSmoothing, CpoAlpha = config.CpoAlpha });
            case "simpo":
                return new SimPoLoss(new SimPoOptions { Beta = config.Beta, Gamma = config.SimpoGamma, LabelSmoothing = config.LabelSmoothing });
            case "alphapo":
                return new AlphaPoLoss(new AlphaPoOptions { Beta = config.Beta, Gamma = config.SimpoGamma, LabelSmoothing = config.LabelSmoothing, Alpha = config.Alpha });
            case "orpo":
                return new OrpoLoss(new OrpoOptions { Beta = config.Beta });
            case "kto":
                return new KtoLoss(new KtoOptions { Beta = config.Beta, DesirableWeight = config.DesirableWeight, UndesirableWeight = config.UndesirableWeight });
            case "apo_zero_unpaired":
                return new ApoZeroUnpairedLoss(new KtoOptions { Beta = config.Beta, DesirableWeight = config.DesirableWeight, UndesirableWeight = config.UndesirableWeight });
            case "bco":
                return new BcoLoss(config.BcoBaseline ?? throw new ArgumentException("bco needs TrlTrainerConfig.BcoBaseline: the running reward mean your run owns.", nameof(config)),
                    new BcoOptions { Beta = config.Beta });
        }
        if (LossTypes.Contains(name)) return Create(name, new TrlDpoConfig { Beta = config.Beta });
        throw new ArgumentException($"Unknown objective '{name}'. Use one of: {string.Join(", ", TrainerObjectives.Concat(LossTypes))}.", nameof(name));
    }
}
