namespace Alignment.Losses;

/// <summary>
/// The loss fields of TRL's CPOConfig, ORPOConfig, KTOConfig and BCOConfig (and beta / label_smoothing for the DPOTrainer
/// names), in C# casing, for <see cref="TrlLosses.CreateForTrainer"/>. A field left null takes TRL's default; a field
/// that the named objective does not read is refused by name when set, so that no setting is silently dropped.
/// </summary>
public sealed record TrlTrainerConfig
{
    /// <summary><c>beta</c>. Null: TRL's 0.1.</summary>
    public double? Beta { get; init; }

    /// <summary><c>label_smoothing</c>: CPO's sigmoid and simpo types, and the DPOTrainer names that read it (robust,
    /// exo_pair, aot, aot_unpaired). Null: TRL's 0.</summary>
    public double? LabelSmoothing { get; init; }

    /// <summary>CPOConfig <c>loss_type</c> for "cpo": sigmoid (default), hinge, ipo, simpo, or alphapo (TRL's shorthand for
    /// simpo with cpo_alpha 0).</summary>
    public string? CpoLossType { get; init; }

    /// <summary><c>cpo_alpha</c>, the NLL weight of CPOTrainer's every loss type ("cpo", "simpo"). Null: TRL's 1.</summary>
    public double? CpoAlpha { get; init; }

    /// <summary><c>simpo_gamma</c>, the target margin of the simpo type ("simpo", "alphapo", or "cpo" with loss type simpo).
    /// Null: TRL's 0.5.</summary>
    public double? SimpoGamma { get; init; }

    /// <summary>CPOConfig <c>alpha</c>, AlphaPO's reward shape, read by every CPO loss type. Null: TRL's 0 (log-prob rewards;
    /// "alphapo" with alpha 0 is then plain SimPO, as in TRL; the AlphaPO paper uses about 0.1 to 1).</summary>
    public double? Alpha { get; init; }

    /// <summary><c>desirable_weight</c> (KTO, apo_zero_unpaired). Null: TRL's 1.</summary>
    public double? DesirableWeight { get; init; }

    /// <summary><c>undesirable_weight</c> (KTO, apo_zero_unpaired). Null: TRL's 1.</summary>
    public double? UndesirableWeight { get; init; }

    /// <summary>BCO's running reward mean, which the caller owns and checkpoints. Required for "bco", refused elsewhere.</summary>
    public BcoRewardBaseline? BcoBaseline { get; init; }
}

public static partial class TrlLosses
{
    /// <summary>The objectives of TRL's other preference trainers (CPOTrainer, ORPOTrainer, KTOTrainer, BCOTrainer).</summary>
    public static IReadOnlyList<string> TrainerObjectives { get; } = new[] { "cpo", "simpo", "alphapo", "orpo", "kto", "apo_zero_unpaired", "bco" };

    /// <summary>
    /// A loss by the name TRL's trainers use, giving TRL's objective:
    /// <list type="bullet">
    /// <item>cpo → <see cref="CpoLoss"/> (CPOConfig loss_type sigmoid/hinge/ipo/simpo/alphapo, cpo_alpha, simpo_gamma, alpha);</item>
    /// <item>simpo → TRL's CPOConfig(loss_type="simpo"): <see cref="CpoLoss"/> with <see cref="CpoLossType.Simpo"/> and TRL's
    /// cpo_alpha 1 unless set (CPO-SimPO; set CpoAlpha = 0 for the paper's SimPO);</item>
    /// <item>alphapo → TRL's shorthand, loss_type simpo with cpo_alpha 0 and the configured alpha;</item>
    /// <item>orpo → <see cref="OrpoLoss"/> (NLL over prompt and completion, as TRL: the batch needs <see cref="PreferenceBatch.Prompt"/>);</item>
    /// <item>kto → <see cref="KtoLoss"/>; apo_zero_unpaired → <see cref="ApoZeroUnpairedLoss"/>; bco → <see cref="BcoLoss"/> (needs
    /// <see cref="TrlTrainerConfig.BcoBaseline"/>);</item>
    /// <item>any DPOTrainer loss_type name (<see cref="LossTypes"/>) → the same loss as <see cref="Create(string, TrlDpoConfig?)"/>
    /// with this config's beta and label_smoothing.</item>
    /// </list>
    /// </summary>
    /// <exception cref="ArgumentException">An unknown name (the message lists the valid ones), a field out of range (named as
    /// TRL names it), or a field set that the named objective does not read.</exception>
    public static IPreferenceLoss CreateForTrainer(string name, TrlTrainerConfig? config = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        var c = config ?? new TrlTrainerConfig();
        double beta = c.Beta ?? 0.1;
        switch (name)
        {
            case "cpo":
                var type = c.CpoLossType ?? "sigmoid";
                if (type == "alphapo") return Cpo(c, beta, Losses.CpoLossType.Simpo, "cpo (loss_type alphapo)", forceNoNll: true);
                return Cpo(c, beta, type switch
                {
                    "sigmoid" => Losses.CpoLossType.Sigmoid,
                    "hinge" => Losses.CpoLossType.Hinge,
                    "ipo" => Losses.CpoLossType.Ipo,
                    "simpo" => Losses.CpoLossType.Simpo,
                    _ => throw new ArgumentException($"CPO loss_type must be sigmoid, hinge, ipo, simpo or alphapo; got '{type}'.", "loss_type"),
                }, $"cpo (loss_type {type})", forceNoNll: false);
            case "simpo":
                Unused(c, name, nameof(c.CpoLossType));
                return Cpo(c, beta, Losses.CpoLossType.Simpo, name, forceNoNll: false);
            case "alphapo":
                Unused(c, name, nameof(c.CpoLossType));
                return Cpo(c, beta, Losses.CpoLossType.Simpo, name, forceNoNll: true);
            case "orpo":
                Unused(c, name, nameof(c.LabelSmoothing), nameof(c.CpoLossType), nameof(c.CpoAlpha), nameof(c.SimpoGamma), nameof(c.Alpha),
                    nameof(c.DesirableWeight), nameof(c.UndesirableWeight), nameof(c.BcoBaseline));
                return new OrpoLoss(Field("beta", () => new OrpoOptions { Beta = beta }));
            case "kto":
            case "apo_zero_unpaired":
                Unused(c, name, nameof(c.LabelSmoothing), nameof(c.CpoLossType), nameof(c.CpoAlpha), nameof(c.SimpoGamma), nameof(c.Alpha), nameof(c.BcoBaseline));
                var kto = Field("desirable_weight / undesirable_weight", () => new KtoOptions
                {
                    Beta = beta, DesirableWeight = c.DesirableWeight ?? 1.0, UndesirableWeight = c.UndesirableWeight ?? 1.0,
                });
                return name == "kto" ? new KtoLoss(kto) : new ApoZeroUnpairedLoss(kto);
            case "bco":
                Unused(c, name, nameof(c.LabelSmoothing), nameof(c.CpoLossType), nameof(c.CpoAlpha), nameof(c.SimpoGamma), nameof(c.Alpha),
                    nameof(c.DesirableWeight), nameof(c.UndesirableWeight));
                return new BcoLoss(c.BcoBaseline ?? throw new ArgumentException("bco needs TrlTrainerConfig.BcoBaseline: the running reward mean your run owns.", nameof(config)),
                    Field("beta", () => new BcoOptions { Beta = beta }));
        }
        if (LossTypes.Contains(name))
        {
            Unused(c, name, nameof(c.CpoLossType), nameof(c.CpoAlpha), nameof(c.SimpoGamma), nameof(c.Alpha), nameof(c.DesirableWeight),
                nameof(c.UndesirableWeight), nameof(c.BcoBaseline));
            if (c.LabelSmoothing is { } eps && eps != 0 && !LabelSmoothingTypes.Contains(name))
                throw new ArgumentException(
                    $"label_smoothing is set ({eps}) but TRL's DPOTrainer reads it only for {string.Join(", ", LabelSmoothingTypes)}; '{name}' ignores it. Leave it unset.",
                    "label_smoothing");
            return Create(name, new TrlDpoConfig { Beta = beta, LabelSmoothing = c.LabelSmoothing ?? 0 });
        }
        throw new ArgumentException($"Unknown objective '{name}'. Use one of: {string.Join(", ", TrainerObjectives.Concat(LossTypes))}.", nameof(name));
    }

    /// <summary>The DPOTrainer loss types that read label_smoothing (TRL's dpo_loss).</summary>
    private static readonly string[] LabelSmoothingTypes = { "robust", "exo_pair", "aot", "aot_unpaired" };

    /// <summary>TRL's CPOTrainer for one loss type: the AlphaPO shape on every type, cpo_alpha x NLL unless the alphapo shorthand.</summary>
    private static CpoLoss Cpo(TrlTrainerConfig c, double beta, CpoLossType type, string what, bool forceNoNll)
    {
        Unused(c, what, nameof(c.DesirableWeight), nameof(c.UndesirableWeight), nameof(c.BcoBaseline));
        if (type != Losses.CpoLossType.Simpo && c.SimpoGamma is not null)
            throw new ArgumentException($"simpo_gamma is set but {what} does not read it (TRL uses it for loss_type simpo only). Leave it unset.", "simpo_gamma");
        if (type is Losses.CpoLossType.Hinge or Losses.CpoLossType.Ipo && c.LabelSmoothing is { } eps && eps != 0)
            throw new ArgumentException($"label_smoothing is set ({eps}) but {what} does not read it (TRL uses it for sigmoid and simpo). Leave it unset.", "label_smoothing");
        if (forceNoNll && c.CpoAlpha is { } a && a != 0)
            throw new ArgumentException($"cpo_alpha is set ({a}) but alphapo is TRL's shorthand for loss_type simpo with cpo_alpha 0. Use \"simpo\" for SimPO with an NLL term.", "cpo_alpha");
        return new CpoLoss(Field("beta / label_smoothing / cpo_alpha / simpo_gamma / alpha", () => new CpoOptions
        {
            Beta = beta,
            LossType = type,
            LabelSmoothing = c.LabelSmoothing ?? 0,
            CpoAlpha = forceNoNll ? 0 : c.CpoAlpha ?? 1.0,
            SimpoGamma = c.SimpoGamma ?? 0.5,
            Alpha = c.Alpha ?? 0,
        }));
    }

    /// <summary>Refuses, by TRL's field name, any of <paramref name="fields"/> that is set.</summary>
    private static void Unused(TrlTrainerConfig c, string objective, params string[] fields)
    {
        foreach (var field in fields)
        {
            bool set = field switch
            {
                nameof(TrlTrainerConfig.LabelSmoothing) => c.LabelSmoothing is not null,
                nameof(TrlTrainerConfig.CpoLossType) => c.CpoLossType is not null,
                nameof(TrlTrainerConfig.CpoAlpha) => c.CpoAlpha is not null,
                nameof(TrlTrainerConfig.SimpoGamma) => c.SimpoGamma is not null,
                nameof(TrlTrainerConfig.Alpha) => c.Alpha is not null,
                nameof(TrlTrainerConfig.DesirableWeight) => c.DesirableWeight is not null,
                nameof(TrlTrainerConfig.UndesirableWeight) => c.UndesirableWeight is not null,
                nameof(TrlTrainerConfig.BcoBaseline) => c.BcoBaseline is not null,
                _ => throw new InvalidOperationException("unknown field " + field),
            };
            if (set)
                throw new ArgumentException(
                    $"{TrlName(field)} is set but the '{objective}' objective does not read it (TRL's trainer for it has no such field, or ignores it). Leave it unset.",
                    TrlName(field));
        }
    }

    private static string TrlName(string field) => field switch
    {
        nameof(TrlTrainerConfig.LabelSmoothing) => "label_smoothing",
        nameof(TrlTrainerConfig.CpoLossType) => "loss_type",
        nameof(TrlTrainerConfig.CpoAlpha) => "cpo_alpha",
        nameof(TrlTrainerConfig.SimpoGamma) => "simpo_gamma",
        nameof(TrlTrainerConfig.Alpha) => "alpha",
        nameof(TrlTrainerConfig.DesirableWeight) => "desirable_weight",
        nameof(TrlTrainerConfig.UndesirableWeight) => "undesirable_weight",
        _ => "BcoBaseline",
    };
}
