using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>How ODPO turns the two scores into an offset.</summary>
public enum OdpoOffsetForm
{
    /// <summary>Delta = alpha * ln(s_w - s_l) (the authors' default). Needs s_w &gt; s_l.</summary>
    Difference,

    /// <summary>Delta = alpha * ln(s_w / s_l). Needs positive scores.</summary>
    Ratio,
}

/// <summary>Options of <see cref="OdpoLoss"/>: beta (default 0.1; the authors' recipes: IMDB 0.7, toxicity 0.05, TL;DR 0.5), the score map, and the offset.</summary>
public sealed record OdpoOptions : PairwiseOptions
{
    /// <summary>alpha in [0, 1e12], the offset scale. Default 1 (IMDB recipe: 0.5). alpha = 0 is exactly DPO.</summary>
    public double Alpha { get; init => field = Guard.Weight(value, nameof(Alpha)); } = 1.0;

    /// <summary>Difference (default) or ratio form.</summary>
    public OdpoOffsetForm OffsetForm { get; init => field = Guard.Defined(value, nameof(OffsetForm)); } = OdpoOffsetForm.Difference;

    /// <summary>
    /// Difference form only. <see langword="null"/> (default): a score gap s_w - s_l &lt;= 0 is an error naming the rows.
    /// A value in [1e-12, 1e12] clamps the gap to at least this value instead (ties and inversions get the offset alpha * ln(gap)).
    /// </summary>
    public double? MinimumScoreGap
    {
        get;
        init => field = value is null ? null : Guard.Scale(value.Value, nameof(MinimumScoreGap));
    }
}

/// <summary>
/// ODPO, DPO with an offset (Amini, Vieira and Cotterell 2024, arXiv 2402.10571), following the authors' code (rycolab/odpo).
/// </summary>
/// <remarks>
/// <para>Per pair: L = softplus(-(beta * h - Delta)), Delta = alpha * ln(s_w - s_l) (or alpha * ln(s_w / s_l)), from
/// response scores s (<see cref="PreferenceBatch.Scores"/>). Equivalently L_ODPO(h) = L_DPO(h - Delta / beta):
/// the chosen response must win by a margin that grows with how much better it scored.</para>
/// <para>Gradient: always chosen up, rejected down. alpha = 0 gives DPO exactly.</para>
/// <para>The authors do not guard the logarithm; here a zero or negative gap (difference form) or a non-positive score
/// (ratio form) is an <see cref="ArgumentException"/> naming the rows, unless <see cref="OdpoOptions.MinimumScoreGap"/> opts into a clamp.</para>
/// </remarks>
public sealed class OdpoLoss : PreferenceLoss<OdpoOptions>
{
    /// <summary>Creates the loss; default beta 0.1, alpha 1, difference form, no clamp.</summary>
    public OdpoLoss(OdpoOptions? options = null) : base(options ?? new OdpoOptions()) { }

    /// <inheritdoc />
    /// <remarks>"odpo" with the difference offset, "odpo_ratio" with the ratio offset.</remarks>
    public override string Name => (Options.OffsetForm == OdpoOffsetForm.Ratio ? "odpo_ratio" : "odpo") + Options.ScoreMap.NameSuffix;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override IEnumerable<(Tensor? Tensor, string Name)> Validate(PreferenceBatch batch, ValueChecks checks)
    {
        if (batch.Scores is not { } scores)
            throw new ArgumentException("ODPO needs response scores: set PreferenceBatch.Scores = new ResponseScores(chosenScores, rejectedScores).", "batch.Scores");
        CheckPerExample(scores.Chosen, batch, "scores.Chosen", "the chosen responses' scores");
        CheckPerExample(scores.Rejected, batch, "scores.Rejected", "the rejected responses' scores");
        using (no_grad())
        {
            // the score conditions, read back with the call's other checks; comparisons are exact in any dtype
            Tensor sw = scores.Chosen, sl = scores.Rejected;
            var ok = isfinite(sw) & isfinite(sl);
            if (Options.OffsetForm == OdpoOffsetForm.Ratio) ok &= (sw > 0) & (sl > 0);
            else if (Options.MinimumScoreGap is null) ok &= sw > sl;
            checks.Add(ok.all(), () => ScoreError(scores));
        }
        return new (Tensor?, string)[] { (scores.Chosen, "scores.Chosen"), (scores.Rejected, "scores.Rejected") };
    }

    /// <summary>Only on failure: names the rows whose scores break the offset's condition.</summary>
    private Exception ScoreError(ResponseScores scores)
    {
        Guard.AllFinite((scores.Chosen, "scores.Chosen"), (scores.Rejected, "scores.Rejected"));
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var sw = scores.Chosen.to_type(ScalarType.Float64);
        var sl = scores.Rejected.to_type(ScalarType.Float64);
        if (Options.OffsetForm == OdpoOffsetForm.Ratio)
            ThrowForRows((sw <= 0) | (sl <= 0), "scores", "The ratio offset ln(s_w / s_l) needs positive scores");
        else
            ThrowForRows(sw <= sl, "scores", "The offset ln(s_w - s_l) needs s_w > s_l (set OdpoOptions.MinimumScoreGap to clamp ties instead)");
        return new InvalidOperationException("A score check failed but no row breaks it; please report this.");
    }

    private static void ThrowForRows(Tensor bad, string name, string what)
    {
        var rows = bad.nonzero().flatten().cpu();
        if (rows.numel() == 0) return;
        var list = rows.data<long>().Take(10).ToArray();
        throw new ArgumentException($"{what}; violated in {rows.numel()} row(s), first: {string.Join(", ", list)}.", name);
    }

    /// <summary>
    /// The offsets Delta [B] in <paramref name="dtype"/>. The gap (or ratio) and its logarithm are taken in float64 before
    /// the cast: scores 5.0000001 and 5.0 differ by 1e-7, which float32 rounding of each score would turn into 0.
    /// </summary>
    internal Tensor Offset(ResponseScores scores, ScalarType dtype)
    {
        var sw = scores.Chosen.detach().to_type(ScalarType.Float64);
        var sl = scores.Rejected.detach().to_type(ScalarType.Float64);
        var inner = Options.OffsetForm == OdpoOffsetForm.Ratio
            ? sw / sl
            : Options.MinimumScoreGap is { } gap ? (sw - sl).clamp_min(gap) : sw - sl;
        return (inner.log() * Options.Alpha).to_type(dtype);
    }

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var offset = Offset(batch.Scores!, terms.DType);
        return new(PreferenceMath.NegLogSigmoid(terms.ScoreMargin(Options.ScoreMap) * Options.Beta - offset), new[] { (MetricNames.OdpoOffset, offset.mean()) });
    }

    /// <summary>ODPO with default (or given) options.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference, ResponseScores scores, OdpoOptions? options = null) =>
        new OdpoLoss(options).Compute(new PreferenceBatch(policy, reference) { Scores = scores ?? throw new ArgumentNullException(nameof(scores)) });
}
