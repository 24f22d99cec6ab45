using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>The SPPO loss forms.</summary>
public enum SppoForm
{
    /// <summary>The authors' default: 1/2 [(u_w - eta (p_w - 1/2))^2 + (u_l - eta (p_l - 1/2))^2], win-rates against the current policy.</summary>
    Sppo,

    /// <summary>A direct pairwise probability: 1/2 [(u_w - eta (p_wl - 1/2))^2 + (u_l + eta (p_wl - 1/2))^2].</summary>
    Single,

    /// <summary>TRL's hard-label form: (u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2 = 2 x sppo with p_w = 1, p_l = 0. Needs no win-rates.</summary>
    Hard,
}

/// <summary>Options of <see cref="SppoLoss"/>.</summary>
public sealed record SppoOptions : PreferenceLossOptions
{
    /// <summary>beta in [1e-12, 1e12]; eta = 1 / beta. Default 0.001 (eta = 1000, the authors'), so initial losses near 1e5 are expected.</summary>
    public double Beta { get; init => field = Guard.Scale(value, nameof(Beta)); } = 0.001;

    /// <summary>Which form. Default <see cref="SppoForm.Sppo"/>.</summary>
    public SppoForm Form { get; init => field = Guard.Defined(value, nameof(Form)); } = SppoForm.Sppo;

    /// <summary>
    /// The score map applied to the log-ratios before they are regressed onto their targets. Default
    /// <see cref="ScoreMap.ReverseKl"/> (the authors' SPPO); TRL applies its <c>f_divergence_type</c> to <c>sppo_hard</c>.
    /// </summary>
    public ScoreMap ScoreMap { get; init => field = value ?? throw new ArgumentNullException(nameof(ScoreMap)); } = ScoreMap.ReverseKl;
}

/// <summary>
/// SPPO, Self-Play Preference Optimization (Wu et al. 2024, arXiv 2405.00675), following the authors' code (uclaml/SPPO).
/// </summary>
/// <remarks>
/// <para>The reference model is the policy at the start of the current self-play iteration, and win-rates p are
/// estimated against that policy (see <see cref="SppoWinRateEstimator"/>). With eta = 1/beta each log-ratio u is
/// regressed onto eta (p - 1/2), approximating the multiplicative-weights update
/// pi_{t+1} ∝ pi_t exp(eta P(y beats pi_t)).</para>
/// <para>Gradient: not DPO's sign rule. The chosen log-prob is pushed down once u_w &gt; eta (p_w - 1/2) and the rejected
/// pushed up once u_l &lt; eta (p_l - 1/2). The loss is exactly 0 at the targets.</para>
/// <para>Win-rates outside [0, 1] are an error.</para>
/// </remarks>
public sealed class SppoLoss : PreferenceLoss<SppoOptions>
{
    /// <summary>Creates the loss; default beta 0.001, the sppo form.</summary>
    public SppoLoss(SppoOptions? options = null) : base(options ?? new SppoOptions()) { }

    /// <inheritdoc />
    public override string Name => Options.Form switch { SppoForm.Single => "sppo_single", SppoForm.Hard => "sppo_hard", _ => "sppo" } + Options.ScoreMap.NameSuffix;

    /// <summary>eta = 1 / beta.</summary>
    public double Eta => 1 / Options.Beta;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override IEnumerable<(Tensor? Tensor, string Name)> Validate(PreferenceBatch batch, ValueChecks checks)
    {
        if (Options.Form == SppoForm.Hard) return Array.Empty<(Tensor?, string)>();
        var rates = batch.WinRates ?? throw new ArgumentException(
            Options.Form == SppoForm.Single
                ? "sppo_single needs a pairwise probability: PreferenceBatch.WinRates = SppoWinRates.FromPairwise(pWl)."
                : "sppo needs win-rates: PreferenceBatch.WinRates = SppoWinRates.Individual(pChosen, pRejected).", "batch.WinRates");
        var needed = Options.Form == SppoForm.Single
            ? new[] { (rates.Pairwise, "winRates.Pairwise") }
            : new[] { (rates.Chosen, "winRates.Chosen"), (rates.Rejected, "winRates.Rejected") };
        foreach (var (t, name) in needed)
        {
            if (t is null)
                throw new ArgumentException(
                    Options.Form == SppoForm.Single
                        ? "sppo_single needs SppoWinRates.FromPairwise(pWl); got individual win-rates."
                        : "sppo needs SppoWinRates.Individual(pChosen, pRejected); got a pairwise probability (use SppoForm.Single for that).",
                    "batch.WinRates");
            CheckPerExample(t, batch, name, "probabilities in [0, 1]");
        }
        using (no_grad())
        {
            // all in [0, 1] (NaN fails both comparisons), read back with the call's other checks
            var p = needed.Select(n => n.Item1!).ToArray();
            var rows = p.Length == 1 ? p[0]
                : p.All(t => t.dtype == p[0].dtype) ? stack(p)
                : stack(p.Select(t => t.to_type(ScalarType.Float64)).ToArray());
            checks.Add(((rows >= 0) & (rows <= 1)).all(), () => WinRateError(needed!));
        }
        return needed;
    }

    /// <summary>Only on failure: names the win-rate tensor and rows that are not probabilities.</summary>
    private static Exception WinRateError((Tensor?, string)[] needed)
    {
        Guard.AllFinite(needed);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        foreach (var (t, name) in needed)
        {
            using var outside = ((t! < 0) | (t! > 1)).nonzero().flatten().cpu();
            if (outside.numel() > 0)
                return new ArgumentException(
                    $"{name} must be probabilities in [0, 1]; rows {string.Join(", ", outside.data<long>().Take(10))} are outside.", name);
        }
        return new InvalidOperationException("A win-rate check failed but no row is outside [0, 1]; please report this.");
    }

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        Tensor targetChosen, targetRejected;
        double scale = 0.5;
        switch (Options.Form)
        {
            case SppoForm.Hard:
                targetChosen = full_like(terms.ChosenLogRatio.detach(), 1 / (2 * Options.Beta));
                targetRejected = -targetChosen;
                scale = 1.0;
                break;
            case SppoForm.Single:
                targetChosen = (terms.Upcast(batch.WinRates!.Pairwise!) - 0.5) * Eta;
                targetRejected = -targetChosen;
                break;
            default:
                targetChosen = (terms.Upcast(batch.WinRates!.Chosen!) - 0.5) * Eta;
                targetRejected = (terms.Upcast(batch.WinRates!.Rejected!) - 0.5) * Eta;
                break;
        }
        var (sw, sl) = terms.Scores(Options.ScoreMap);
        var perExample = ((sw - targetChosen).square() + (sl - targetRejected).square()) * scale;
        return new(perExample, new[] { (MetricNames.SppoTargetChosen, targetChosen.mean()), (MetricNames.SppoTargetRejected, targetRejected.mean()) });
    }

    /// <summary>SPPO (authors' form) with default (or given) options.</summary>
    /// <param name="policy">Policy log-probs (with grad).</param>
    /// <param name="reference">Log-probs under the policy at the start of this self-play iteration.</param>
    /// <param name="winRates">p_w, p_l (or p_wl with <see cref="SppoForm.Single"/>).</param>
    /// <param name="options">Options; default beta 0.001.</param>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference, SppoWinRates? winRates, SppoOptions? options = null) =>
        new SppoLoss(options).Compute(new PreferenceBatch(policy, reference) { WinRates = winRates });
}
