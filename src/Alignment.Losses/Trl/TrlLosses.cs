using System.Globalization;

namespace Alignment.Losses;

/// <summary>
/// The loss fields of TRL's <c>DPOConfig</c>, under the same names in C# casing, with TRL's defaults. Build a loss from it
/// with <see cref="TrlLosses.Create(TrlDpoConfig)"/>: porting a TRL configuration changes nothing but syntax.
/// </summary>
public sealed record TrlDpoConfig
{
    /// <summary><c>loss_type</c>: one or more of <see cref="TrlLosses.LossTypes"/>. Default ["sigmoid"].</summary>
    public IReadOnlyList<string> LossType { get; init; } = new[] { "sigmoid" };

    /// <summary><c>loss_weights</c>: one weight per loss type; null (default) means 1 for each.</summary>
    public IReadOnlyList<double>? LossWeights { get; init; }

    /// <summary><c>beta</c>. Default 0.1. For ipo it is the paper's tau.</summary>
    public double Beta { get; init; } = 0.1;

    /// <summary><c>label_smoothing</c>, used by robust (flip rate, in [0, 0.5)), exo_pair (eps, in (0, 1); TRL recommends 1e-3)
    /// and aot / aot_unpaired, and by no other loss type (as in TRL). Default 0.</summary>
    public double LabelSmoothing { get; init; }

    /// <summary><c>f_divergence_type</c>: reverse_kl (default), forward_kl, js_divergence or alpha_divergence.</summary>
    public string FDivergenceType { get; init; } = "reverse_kl";

    /// <summary><c>f_alpha_divergence_coef</c>: alpha of the alpha-divergence. Default 0.5 (TRL's).</summary>
    public double FAlphaDivergenceCoef { get; init; } = 0.5;

    /// <summary><c>discopop_tau</c>. Default 0.05.</summary>
    public double DiscopopTau { get; init; } = 0.05;

    /// <summary><c>ld_alpha</c>: LD-DPO's weight of the tokens past the shorter response, in [0, 1]; null (default) is off.
    /// It acts on the log-probs: see <see cref="TrlLosses.LogProbOptions"/>.</summary>
    public double? LdAlpha { get; init; }

    /// <summary><c>use_weighting</c>: WPO pair weights. It acts on the log-probs and the batch: see <see cref="TrlLosses.LogProbOptions"/>.</summary>
    public bool UseWeighting { get; init; }
}

/// <summary>
/// TRL's DPO <c>loss_type</c> names as an adapter at the library's edge: a name (or a weighted list of names) and TRL's
/// config fields in, the library's loss objects out.
/// </summary>
/// <remarks>
/// <para>The mapping (docs/losses.md has the full table): sigmoid → <see cref="DpoLoss"/>; hinge → <see cref="HingeLoss"/>;
/// ipo → <see cref="IpoLoss"/> with per-token means; exo_pair → <see cref="ExoPairLoss"/>; nca_pair →
/// <see cref="NcaPairLoss"/>; robust → <see cref="RobustDpoLoss"/>; bco_pair → <see cref="BcoPairLoss"/>; sppo_hard →
/// <see cref="SppoLoss"/> (hard form); aot, aot_unpaired → <see cref="AotLoss"/>; apo_zero, apo_down → <see cref="ApoLoss"/>;
/// discopop → <see cref="DiscoPopLoss"/>; sft → <see cref="SftLoss"/>; sigmoid_norm → <see cref="SigmoidNormLoss"/>. Several
/// types, or one with a weight other than 1, give a <see cref="WeightedLoss"/>. f_divergence_type becomes every part's
/// <see cref="ScoreMap"/> (where TRL applies it).</para>
/// <para><c>ld_alpha</c> and <c>use_weighting</c> act on the log-probs, not on the loss: compute the policy (and
/// reference) log-probs with <see cref="LogProbOptions"/>, and with <c>use_weighting</c> pass the policy's
/// <see cref="SequenceLogProbsResult.WpoPairWeights"/> as <see cref="PreferenceBatch.ExampleWeights"/>.</para>
/// </remarks>
public static partial class TrlLosses
{
    /// <summary>The loss types TRL's DPOTrainer accepts, all supported here.</summary>
    public static IReadOnlyList<string> LossTypes { get; } = new[]
    {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
        "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    };

    /// <summary>The f-divergence types TRL accepts.</summary>
    public static IReadOnlyList<string> FDivergenceTypes { get; } = new[] { "reverse_kl", "forward_kl", "js_divergence", "alpha_divergence" };

    /// <summary>One loss type with TRL's other fields (default: TRL's defaults).</summary>
    /// <exception cref="ArgumentException">An unknown name (the message lists the valid ones) or a field out of range for this loss.</exception>
    public static IPreferenceLoss Create(string lossType, TrlDpoConfig? config = null) =>
        Create((config ?? new TrlDpoConfig()) with { LossType = new[] { lossType }, LossWeights = null });

    /// <summary>The loss (or the weighted combination) a TRL DPOConfig describes.</summary>
    /// <exception cref="ArgumentException">An unknown loss or f-divergence type (the message lists the valid ones), weights that do
    /// not match the types, use_weighting with aot, or a field out of range for a loss type (the message names the TRL field).</exception>
    public static IPreferenceLoss Create(TrlDpoConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        var types = config.LossType ?? throw new ArgumentException("loss_type is required.", "loss_type");
        if (types.Count == 0) throw new ArgumentException($"loss_type must name at least one of: {string.Join(", ", LossTypes)}.", "loss_type");
        foreach (var type in types)
            if (!LossTypes.Contains(type))
                throw new ArgumentException($"Unknown loss_type '{type}'. Valid: {string.Join(", ", LossTypes)}.", "loss_type");
        var weights = config.LossWeights ?? Enumerable.Repeat(1.0, types.Count).ToArray();
        if (weights.Count != types.Count)
            throw new ArgumentException($"loss_weights has {weights.Count} entries but loss_type has {types.Count}; give one weight per loss type.", "loss_weights");
        for (int k = 0; k < weights.Count; k++)
            Field($"loss_weights[{k}]", () => Internal.Guard.Weight(weights[k], $"loss_weights[{k}]"));
        if (config.LdAlpha is not null) LogProbOptions(config);   // ld_alpha is checked here too, not only when the log-prob options are built
        var map = Map(config);
        if (config.LabelSmoothing != 0 && !types.Any(t => LabelSmoothingTypes.Contains(t)))
            throw new ArgumentException(
                $"label_smoothing is set ({config.LabelSmoothing}) but TRL's DPOTrainer reads it only for {string.Join(", ", LabelSmoothingTypes)}; " +
                $"{string.Join(", ", types)} ignore it. Leave it at 0.", "label_smoothing");
        if (config.UseWeighting && types.Any(t => t is "aot" or "aot_unpaired"))
            throw new ArgumentException("use_weighting cannot be combined with aot or aot_unpaired (their losses are per rank, not per pair), as in TRL.", "use_weighting");
        var parts = types.Select((t, k) => (Create(t, config, map), weights[k])).ToArray();
        return parts.Length == 1 && parts[0].Item2 == 1 ? parts[0].Item1 : new WeightedLoss(parts);
    }

    /// <summary>
    /// The log-prob options a TRL config implies: <c>ld_alpha</c> as <see cref="SequenceLogProbsOptions.LdAlpha"/> (use the
    /// same options for the reference log-probs) and <c>use_weighting</c> as <see cref="SequenceLogProbsOptions.WpoTerms"/>.
    /// </summary>
    /// <param name="config">The TRL config.</param>
    /// <param name="options">Options to extend (ignore index, chunk size); default new.</param>
    public static SequenceLogProbsOptions LogProbOptions(TrlDpoConfig config, SequenceLogProbsOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        return (options ?? new SequenceLogProbsOptions()) with
        {
            LdAlpha = Field("ld_alpha", () => new SequenceLogProbsOptions { LdAlpha = config.LdAlpha }.LdAlpha),
            WpoTerms = config.UseWeighting,
        };
    }

    private static ScoreMap Map(TrlDpoConfig config) => config.FDivergenceType switch
    {
        "reverse_kl" => ScoreMap.ReverseKl,
        "forward_kl" => ScoreMap.ForwardKl,
        "js_divergence" => ScoreMap.JensenShannon,
        "alpha_divergence" => Field("f_alpha_divergence_coef", () => ScoreMap.AlphaDivergence(config.FAlphaDivergenceCoef)),
        _ => throw new ArgumentException(
            $"Unknown f_divergence_type '{config.FDivergenceType}'. Valid: {string.Join(", ", FDivergenceTypes)}.", "f_divergence_type"),
    };

    private static IPreferenceLoss Create(string type, TrlDpoConfig c, ScoreMap map)
    {
        double beta = Field("beta", () => new DpoOptions { Beta = c.Beta }.Beta);
        return type switch
        {
            "sigmoid" => new DpoLoss(new() { Beta = beta, ScoreMap = map }),
            "hinge" => new HingeLoss(new() { Beta = beta, ScoreMap = map }),
            "ipo" => new IpoLoss(new() { Beta = beta, ScoreMap = map, LogRatio = IpoLogRatio.PerTokenMean }),
            "exo_pair" => new ExoPairLoss(Field("label_smoothing", () => new ExoPairOptions { Beta = beta, ScoreMap = map, LabelSmoothing = c.LabelSmoothing })),
            "nca_pair" => new NcaPairLoss(new() { Beta = beta, ScoreMap = map }),
            "robust" => new RobustDpoLoss(Field("label_smoothing", () => new RobustDpoOptions { Beta = beta, ScoreMap = map, LabelSmoothing = c.LabelSmoothing })),
            "bco_pair" => new BcoPairLoss(new() { Beta = beta, ScoreMap = map }),
            "sppo_hard" => new SppoLoss(new() { Beta = beta, ScoreMap = map, Form = SppoForm.Hard }),
            "aot" => new AotLoss(Field("label_smoothing", () => new AotOptions { Beta = beta, LabelSmoothing = c.LabelSmoothing })),
            "aot_unpaired" => new AotLoss(Field("label_smoothing", () => new AotOptions { Beta = beta, Form = AotForm.Unpaired, LabelSmoothing = c.LabelSmoothing })),
            "apo_zero" => new ApoLoss(new() { Beta = beta }),
            "apo_down" => new ApoLoss(new() { Beta = beta, ScoreMap = map, Anchor = ApoAnchor.Down }),
            "discopop" => new DiscoPopLoss(Field("discopop_tau", () => new DiscoPopOptions { Beta = beta, ScoreMap = map, Tau = c.DiscopopTau })),
            "sft" => new SftLoss(new() { Beta = beta }),
            "sigmoid_norm" => new SigmoidNormLoss(new() { Beta = beta, ScoreMap = map }),
            _ => throw new ArgumentException($"Unknown loss_type '{type}'. Valid: {string.Join(", ", LossTypes)}.", "loss_type"),
        };
    }

    /// <summary>
    /// Builds an option, reporting a range error under the TRL field's name: <paramref name="field"/>, or, where one call
    /// sets several fields, the option's own name in TRL's snake case (CpoAlpha → cpo_alpha).
    /// </summary>
    private static T Field<T>(string field, Func<T> build)
    {
        try
        {
            return build();
        }
        catch (ArgumentOutOfRangeException e)
        {
            string name = field.Contains(' ', StringComparison.Ordinal) && e.ParamName is { Length: > 0 } p ? SnakeCase(p) : field;
            throw new ArgumentOutOfRangeException(name, e.ActualValue,
                string.Create(CultureInfo.InvariantCulture, $"TRL field {name}: {e.Message.Split(" (Parameter")[0]}"));
        }
    }

    private static string SnakeCase(string pascal) =>
        string.Concat(pascal.Select((ch, i) => char.IsUpper(ch) ? (i > 0 ? "_" : "") + char.ToLowerInvariant(ch) : ch.ToString()));
}
