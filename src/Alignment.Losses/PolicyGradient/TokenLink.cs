using System.Runtime.Intrinsics;

namespace Alignment.Losses.Internal;

/// <summary>
/// One row of the fused policy pass as a policy term sees it: float64 scratch of one sequence, padded to a multiple of
/// four lanes, with 0 at every position that does not count (so the lanes there compute finite values that are dropped).
/// </summary>
internal unsafe readonly struct LinkRow
{
    /// <summary>Lanes in the row (a multiple of 4).</summary>
    internal readonly int Length;

    /// <summary>l, the policy's log-probs (masked).</summary>
    internal readonly double* LogProbs;

    /// <summary>log rho, the log of the importance ratio the term uses at each token (see <see cref="ImportanceRatio"/>).</summary>
    internal readonly double* LogRatio;

    /// <summary>d log rho / d l at the token itself: the log-ratio clamp's 0/1 for a token ratio, 1 for GSPO-token.</summary>
    internal readonly double* RatioSlope;

    /// <summary>A, the advantages (a sequence's at each of its tokens).</summary>
    internal readonly double* Advantages;

    /// <summary>Written: the policy term L_t.</summary>
    internal readonly double* Loss;

    /// <summary>Written: dL_t / dl_t.</summary>
    internal readonly double* Slope;

    /// <summary>Written: the term's two 0/1 indicators per token (clip low / high...), when it has any.</summary>
    internal readonly double* Flag0, Flag1;

    internal LinkRow(int length, double* logProbs, double* logRatio, double* ratioSlope, double* advantages, double* loss, double* slope,
        double* flag0, double* flag1)
    {
        Length = length;
        LogProbs = logProbs;
        LogRatio = logRatio;
        RatioSlope = ratioSlope;
        Advantages = advantages;
        Loss = loss;
        Slope = slope;
        Flag0 = flag0;
        Flag1 = flag1;
    }
}

/// <summary>The fused pass's totals of a term's indicators: their counts over the valid tokens and their per-sequence extremes.</summary>
/// <param name="ValidTokens">The micro-batch's valid tokens.</param>
/// <param name="Count">Per indicator (0, 1, and 2 = either), the valid tokens where it holds.</param>
/// <param name="MinSequenceFraction">Per indicator, the smallest fraction among the sequences with a valid token (0 without one).</param>
/// <param name="MaxSequenceFraction">Per indicator, the largest such fraction (0 without one).</param>
internal readonly record struct FlagTotals(double ValidTokens, double[] Count, double[] MinSequenceFraction, double[] MaxSequenceFraction)
{
    /// <summary>The token fraction of indicator <paramref name="k"/> (TokenTerms.TokenMean of it).</summary>
    internal double Fraction(int k) => Count[k] / Math.Max(1, ValidTokens);
}

/// <summary>
/// A policy-gradient loss's per-token policy term written for the fused CPU pass (<see cref="FusedPolicyPass"/>): its value
/// and derivative with respect to the token's own log-prob from (l_t, log rho_t, d log rho_t / d l_t, A_t), and the
/// indicators of its metrics. The loss's op-by-op <c>PolicyTerm</c> stays the definition; the two must agree, gradient
/// conventions included (libtorch's: clamp passes the gradient at its bounds, minimum splits it at a tie).
/// </summary>
internal abstract class TokenLink
{
    /// <summary>Whether the term reads the ratio at all (REINFORCE does not: the pass then skips it).</summary>
    internal virtual bool UsesRatio => true;

    /// <summary>Whether the term differentiates through the ratio (then only ratios with a per-token gradient can be fused).</summary>
    internal virtual bool DifferentiatesRatio => true;

    /// <summary>How many indicators the term writes (0 to 2).</summary>
    internal virtual int Flags => 0;

    /// <summary>Writes L, dL/dl and the indicators over the row's lanes.</summary>
    internal abstract void Evaluate(in LinkRow row);

    /// <summary>The term's own metrics from its indicators' totals, in the order its op-by-op term reports them.</summary>
    internal virtual void AddMetrics(in FlagTotals totals, List<(string Name, double Value)> metrics) { }

    internal static Vector256<double> Exp(Vector256<double> x)
    {
#if NET9_0_OR_GREATER
        return Vector256.Exp(x);
#else
        return Vector256.Create(Math.Exp(x[0]), Math.Exp(x[1]), Math.Exp(x[2]), Math.Exp(x[3]));
#endif
    }

    /// <summary>1 where <paramref name="condition"/> holds, else 0.</summary>
    internal static Vector256<double> Ones(Vector256<double> condition) => condition & Vector256<double>.One;

    /// <summary>libtorch's gradient share of the first operand of minimum(x, y): 1 where x &lt; y, 1/2 at a tie, 0 above.</summary>
    internal static Vector256<double> MinimumShare(Vector256<double> x, Vector256<double> y) =>
        Ones(Vector256.LessThan(x, y)) + (Vector256.Equals(x, y) & Vector256.Create(0.5));

    /// <summary>clamp(x, lo, hi) and libtorch's clamp gradient (1 inside [lo, hi], bounds included; 0 outside).</summary>
    internal static (Vector256<double> Value, Vector256<double> Slope) Clamp(Vector256<double> x, double lo, double hi)
    {
        var (vl, vh) = (Vector256.Create(lo), Vector256.Create(hi));
        return (Vector256.Min(Vector256.Max(x, vl), vh), Ones(Vector256.GreaterThanOrEqual(x, vl) & Vector256.LessThanOrEqual(x, vh)));
    }
}

/// <summary>PPO / GRPO's clipped term with TRL's delta and dual-clip (<see cref="ClippedPolicyLoss"/>).</summary>
internal sealed unsafe class ClippedLink(double epsilonLow, double epsilonHigh, double? delta, double? dualClip) : TokenLink
{
    internal override int Flags => 2;

    internal override void Evaluate(in LinkRow row)
    {
        double lo = 1 - epsilonLow, hi = 1 + epsilonHigh;
        var (zero, vlo, vhi) = (Vector256<double>.Zero, Vector256.Create(lo), Vector256.Create(hi));
        for (int i = 0; i < row.Length; i += 4)
        {
            var (r, a, c) = (Vector256.Load(row.LogRatio + i), Vector256.Load(row.Advantages + i), Vector256.Load(row.RatioSlope + i));
            var rho = Exp(r);
            var (clipped, dClipped) = Clamp(rho, lo, hi);
            var (capped, dCapped) = delta is { } d ? Clamp(rho, double.NegativeInfinity, d) : (rho, Vector256<double>.One);
            var (x, y) = (capped * a, clipped * a);
            var loss = -Vector256.Min(x, y);
            var dLoss = -(a * (MinimumShare(x, y) * dCapped + MinimumShare(y, x) * dClipped));      // dL / drho
            if (dualClip is { } cd)
            {
                var bound = a * -cd;
                var negative = Vector256.LessThan(a, zero);
                dLoss = Vector256.ConditionalSelect(negative, dLoss * MinimumShare(loss, bound), dLoss);
                loss = Vector256.ConditionalSelect(negative, Vector256.Min(loss, bound), loss);
            }
            loss.Store(row.Loss + i);
            (dLoss * rho * c).Store(row.Slope + i);
            Ones(Vector256.LessThan(rho, vlo) & Vector256.LessThan(a, zero)).Store(row.Flag0 + i);
            Ones(Vector256.GreaterThan(rho, vhi) & Vector256.GreaterThan(a, zero)).Store(row.Flag1 + i);
        }
    }

    internal override void AddMetrics(in FlagTotals t, List<(string Name, double Value)> metrics)
    {
        metrics.Add((MetricNames.ClipRatioLowMean, t.Fraction(0)));
        metrics.Add((MetricNames.ClipRatioLowMin, t.MinSequenceFraction[0]));
        metrics.Add((MetricNames.ClipRatioHighMean, t.Fraction(1)));
        metrics.Add((MetricNames.ClipRatioHighMax, t.MaxSequenceFraction[1]));
        metrics.Add((MetricNames.ClipRatioRegionMean, t.Fraction(2)));
    }
}

/// <summary>CISPO's term -sg(w) A l with the capped or clipped weight (<see cref="CispoLoss"/>).</summary>
internal sealed unsafe class CispoLink(bool cap, double epsilonLow, double epsilonHigh) : TokenLink
{
    internal override bool DifferentiatesRatio => false;

    internal override int Flags => 1;

    internal override void Evaluate(in LinkRow row)
    {
        double lo = cap ? double.NegativeInfinity : 1 - epsilonLow, hi = cap ? epsilonHigh : 1 + epsilonHigh;
        var (zero, vhi) = (Vector256<double>.Zero, Vector256.Create(hi));
        for (int i = 0; i < row.Length; i += 4)
        {
            var (r, a, l) = (Vector256.Load(row.LogRatio + i), Vector256.Load(row.Advantages + i), Vector256.Load(row.LogProbs + i));
            var rho = Exp(r);
            var w = Clamp(rho, lo, hi).Value;
            var slope = -(w * a);
            (slope * l).Store(row.Loss + i);
            slope.Store(row.Slope + i);
            Ones(Vector256.GreaterThan(rho, vhi) & Vector256.GreaterThan(a, zero)).Store(row.Flag0 + i);
        }
    }

    internal override void AddMetrics(in FlagTotals t, List<(string Name, double Value)> metrics) =>
        metrics.Add((MetricNames.CispoClipRatio, t.Fraction(0)));
}

/// <summary>SAPO's soft gate -sigmoid(tau (rho - 1)) 4 / tau A (<see cref="SapoLoss"/>).</summary>
internal sealed unsafe class SapoLink(double tauPositive, double tauNegative) : TokenLink
{
    internal override void Evaluate(in LinkRow row)
    {
        var (zero, one, four) = (Vector256<double>.Zero, Vector256<double>.One, Vector256.Create(4.0));
        var (tp, tn) = (Vector256.Create(tauPositive), Vector256.Create(tauNegative));
        for (int i = 0; i < row.Length; i += 4)
        {
            var (r, a, c) = (Vector256.Load(row.LogRatio + i), Vector256.Load(row.Advantages + i), Vector256.Load(row.RatioSlope + i));
            var rho = Exp(r);
            var tau = Vector256.ConditionalSelect(Vector256.LessThanOrEqual(a, zero), tn, tp);
            var s = one / (one + Exp(-((rho - one) * tau)));
            (-(s * four / tau) * a).Store(row.Loss + i);
            (-(a * four * s * (one - s)) * rho * c).Store(row.Slope + i);
        }
    }
}

/// <summary>REINFORCE's -A l (<see cref="ReinforceLoss"/>).</summary>
internal sealed unsafe class ReinforceLink : TokenLink
{
    internal override bool UsesRatio => false;

    internal override bool DifferentiatesRatio => false;

    internal override void Evaluate(in LinkRow row)
    {
        for (int i = 0; i < row.Length; i += 4)
        {
            var (a, l) = (Vector256.Load(row.Advantages + i), Vector256.Load(row.LogProbs + i));
            (-a * l).Store(row.Loss + i);
            (-a).Store(row.Slope + i);
        }
    }
}
