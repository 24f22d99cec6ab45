using TorchSharp;

namespace Alignment.Losses;

/// <summary>Options of <see cref="ExoPairLoss"/>: beta, the score map, and the label smoothing eps.</summary>
public sealed record ExoPairOptions : PairwiseOptions
{
    /// <summary>eps in (0, 1): the target puts 1 - eps on the chosen response and eps on the rejected one. Default 1e-3, as TRL recommends.</summary>
    public double LabelSmoothing
    {
        get;
        init => field = value > 0 && value < 1 ? value
            : throw new ArgumentOutOfRangeException(nameof(LabelSmoothing), value, $"LabelSmoothing must lie in (0, 1), both ends excluded (ln eps and ln(1 - eps) must be finite; TRL recommends 1e-3); got {value:G}.");
    } = 1e-3;
}

/// <summary>
/// EXO, efficient exact optimization (Ji et al. 2024, arXiv 2402.00856, Eq. 16); TRL loss_type "exo_pair".
/// </summary>
/// <remarks>
/// <para>Per pair, with z = beta * Delta and q = sigmoid(z): L = KL([q, 1 - q] || [1 - eps, eps])
/// = q (log sigmoid(z) - ln(1 - eps)) + (1 - q) (log sigmoid(-z) - ln eps): the reverse KL from the model's two-way
/// distribution over {chosen, rejected} to the smoothed label.</para>
/// <para>Gradient: stationary at z* = ln((1 - eps) / eps) (where q = 1 - eps); below it the chosen response is pushed up
/// and the rejected one down, past it the signs reverse. L = 0 exactly at z*, and L(0) = -ln 2 - (ln(1 - eps) + ln eps) / 2 (the KL of [1/2, 1/2] from the label).</para>
/// </remarks>
public sealed class ExoPairLoss : PreferenceLoss<ExoPairOptions>
{
    /// <summary>Creates the loss; default beta 0.1, eps 1e-3.</summary>
    public ExoPairLoss(ExoPairOptions? options = null) : base(options ?? new ExoPairOptions()) { }

    /// <inheritdoc />
    public override string Name => "exo_pair" + Options.ScoreMap.NameSuffix;

    /// <inheritdoc />
    protected override double RewardScale => Options.Beta;

    /// <inheritdoc />
    protected override PairLink? Link => MarginLink.Exo(Options.Beta, Options.LabelSmoothing).OnScores(Options.ScoreMap);

    /// <summary>z* = ln((1 - eps) / eps), the value of beta * Delta at which the loss is 0 and stationary.</summary>
    public double StationaryLogit => Math.Log((1 - Options.LabelSmoothing) / Options.LabelSmoothing);

    /// <inheritdoc />
    protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch)
    {
        var z = terms.ScoreMargin(Options.ScoreMap) * Options.Beta;
        double a = Math.Log(1 - Options.LabelSmoothing), b = Math.Log(Options.LabelSmoothing);
        // q (log q - a) + (1 - q)(log(1 - q) - b), q = sigmoid(z), rewritten with log q = -softplus(-z) and
        // log(1 - q) = -softplus(-z) - z so that only the small one of sigmoid(z), sigmoid(-z) appears: written with both,
        // float32 loses the gradient where q saturates (1 - q is rounded to a multiple of 6e-8)
        var c = z + (b - a);
        var positive = PreferenceMath.NegLogSigmoid(z).neg() - (-z).sigmoid() * c - a;   // z >= 0
        var negative = PreferenceMath.Softplus(z).neg() + z.sigmoid() * c - b;            // z < 0
        return new(torch.where(z >= 0, positive, negative));
    }

    /// <summary>EXO with default (or given) options.</summary>
    public static PreferenceLossResult Compute(PreferenceLogps policy, PreferenceLogps? reference = null, ExoPairOptions? options = null) =>
        new ExoPairLoss(options).Compute(new PreferenceBatch(policy, reference));
}
