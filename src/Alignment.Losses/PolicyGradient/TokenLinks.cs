using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace Alignment.Losses.Internal;

/// <summary>The fused pass's totals of a term's indicators: their counts over the valid tokens and their per-sequence extremes.</summary>
/// <param name="ValidTokens">The micro-batch's valid tokens.</param>
/// <param name="Count">Per indicator (0, 1, and 2 = either), the valid tokens where it holds.</param>
/// <param name="MinSequenceFraction">Per indicator, the smallest fraction among the sequences with a valid token.</param>
/// <param name="MaxSequenceFraction">Per indicator, the largest such fraction.</param>
/// <param name="MeanSequenceFraction">Per indicator, the mean of the fractions over the sequences with a valid token.</param>
/// <param name="SequenceLevel">Whether the ratio is one per sequence (GSPO, RLOO): fractions of sequences, then.</param>
internal readonly record struct FlagTotals(double ValidTokens, double[] Count, double[] MinSequenceFraction, double[] MaxSequenceFraction,
    double[] MeanSequenceFraction, bool SequenceLevel)
{
    /// <summary>The token fraction of indicator <paramref name="k"/> (TokenTerms.TokenMean of it).</summary>
    internal double Fraction(int k) => Count[k] / Math.Max(1, ValidTokens);

    /// <summary>The fraction as PolicyGradientLoss.Fraction reports it: of sequences for a sequence-level ratio, else of tokens.</summary>
    internal double LevelFraction(int k) => SequenceLevel ? MeanSequenceFraction[k] : Fraction(k);
}

/// <summary>
/// A policy term in vector lanes of float32 or float64: its value and derivative with respect to the token's own
/// log-prob from (l, log rho, d log rho / dl, A), and up to two 0/1 indicators for its metrics. A struct, so that the
/// row kernel (<see cref="PolicyRows.Run{T, TL}"/>) is compiled once per term and lane type with the term inlined.
/// </summary>
internal interface ILinkLanes<T> where T : unmanaged, IBinaryFloatingPointIeee754<T>
{
    void Evaluate(Vector256<T> l, Vector256<T> logRatio, Vector256<T> ratioSlope, Vector256<T> a,
        out Vector256<T> loss, out Vector256<T> slope, out Vector256<T> flag0, out Vector256<T> flag1);
}

/// <summary>PPO / GRPO's clipped term with TRL's delta and dual-clip (<see cref="ClippedPolicyLoss"/>).</summary>
internal sealed class ClippedLink(double epsilonLow, double epsilonHigh, double? delta, double? dualClip) : TokenLink
{
    internal override int Flags => 2;

    internal override void Rows(PolicyRows job, long from, long to)
    {
        if (job.Double) job.Run<double, Lanes<double>>(new(epsilonLow, epsilonHigh, delta, dualClip), from, to);
        else job.Run<float, Lanes<float>>(new(epsilonLow, epsilonHigh, delta, dualClip), from, to);
    }

    internal override void AddMetrics(in FlagTotals t, List<(string Name, double Value)> metrics)
    {
        metrics.Add((MetricNames.ClipRatioLowMean, t.LevelFraction(0)));
        metrics.Add((MetricNames.ClipRatioLowMin, t.MinSequenceFraction[0]));
        metrics.Add((MetricNames.ClipRatioHighMean, t.LevelFraction(1)));
        metrics.Add((MetricNames.ClipRatioHighMax, t.MaxSequenceFraction[1]));
        metrics.Add((MetricNames.ClipRatioRegionMean, t.LevelFraction(2)));
    }

    private readonly struct Lanes<T>(double epsilonLow, double epsilonHigh, double? delta, double? dualClip) : ILinkLanes<T>
        where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
        private readonly Vector256<T> _lo = Lane.Of<T>(1 - epsilonLow), _hi = Lane.Of<T>(1 + epsilonHigh),
            _delta = Lane.Of<T>(delta ?? double.PositiveInfinity), _dual = Lane.Of<T>(-(dualClip ?? 0));
        private readonly bool _hasDelta = delta is not null, _hasDual = dualClip is not null;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Evaluate(Vector256<T> l, Vector256<T> r, Vector256<T> c, Vector256<T> a,
            out Vector256<T> loss, out Vector256<T> slope, out Vector256<T> flag0, out Vector256<T> flag1)
        {
            var zero = Vector256<T>.Zero;
            var rho = Lane.Exp(r);
            var (clipped, dClipped) = Lane.Clamp(rho, _lo, _hi);
            var (capped, dCapped) = _hasDelta ? (Lane.Min(rho, _delta), Lane.Ones(Vector256.LessThanOrEqual(rho, _delta))) : (rho, Vector256<T>.One);
            var (x, y) = (capped * a, clipped * a);
            loss = -Lane.Min(x, y);
            var share = Lane.MinimumShare(x, y);                                  // libtorch's split of min's gradient (1/2 at a tie)
            var dLoss = -(a * (share * dCapped + (Vector256<T>.One - share) * dClipped));      // dL / drho
            if (_hasDual)
            {
                var bound = a * _dual;
                var negative = Vector256.LessThan(a, zero);
                dLoss = Vector256.ConditionalSelect(negative, dLoss * Lane.MinimumShare(loss, bound), dLoss);
                loss = Vector256.ConditionalSelect(negative, Lane.Min(loss, bound), loss);
            }
            slope = dLoss * rho * c;
            flag0 = Lane.Ones(Vector256.LessThan(rho, _lo) & Vector256.LessThan(a, zero));
            flag1 = Lane.Ones(Vector256.GreaterThan(rho, _hi) & Vector256.GreaterThan(a, zero));
        }
    }
}

/// <summary>CISPO's term -sg(w) A l with the capped or clipped weight (<see cref="CispoLoss"/>).</summary>
internal sealed class CispoLink(bool cap, double epsilonLow, double epsilonHigh) : TokenLink
{
    internal override bool DifferentiatesRatio => false;

    internal override int Flags => 1;

    internal override void Rows(PolicyRows job, long from, long to)
    {
        if (job.Double) job.Run<double, Lanes<double>>(new(cap, epsilonLow, epsilonHigh), from, to);
        else job.Run<float, Lanes<float>>(new(cap, epsilonLow, epsilonHigh), from, to);
    }

    internal override void AddMetrics(in FlagTotals t, List<(string Name, double Value)> metrics) =>
        metrics.Add((MetricNames.CispoClipRatio, t.Fraction(0)));

    private readonly struct Lanes<T>(bool cap, double epsilonLow, double epsilonHigh) : ILinkLanes<T>
        where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
        private readonly Vector256<T> _lo = Lane.Of<T>(cap ? double.NegativeInfinity : 1 - epsilonLow), _hi = Lane.Of<T>(cap ? epsilonHigh : 1 + epsilonHigh);

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Evaluate(Vector256<T> l, Vector256<T> r, Vector256<T> c, Vector256<T> a,
            out Vector256<T> loss, out Vector256<T> slope, out Vector256<T> flag0, out Vector256<T> flag1)
        {
            var rho = Lane.Exp(r);
            var w = Lane.Min(Lane.Max(rho, _lo), _hi);
            slope = -(w * a);
            loss = slope * l;
            flag0 = Lane.Ones(Vector256.GreaterThan(rho, _hi) & Vector256.GreaterThan(a, Vector256<T>.Zero));
            flag1 = Vector256<T>.Zero;
        }
    }
}

/// <summary>SAPO's soft gate -sigmoid(tau (rho - 1)) 4 / tau A (<see cref="SapoLoss"/>).</summary>
internal sealed class SapoLink(double tauPositive, double tauNegative) : TokenLink
{
    internal override void Rows(PolicyRows job, long from, long to)
    {
        if (job.Double) job.Run<double, Lanes<double>>(new(tauPositive, tauNegative), from, to);
        else job.Run<float, Lanes<float>>(new(tauPositive, tauNegative), from, to);
    }

    private readonly struct Lanes<T>(double tauPositive, double tauNegative) : ILinkLanes<T>
        where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
        private readonly Vector256<T> _tp = Lane.Of<T>(tauPositive), _tn = Lane.Of<T>(tauNegative), _four = Lane.Of<T>(4);

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Evaluate(Vector256<T> l, Vector256<T> r, Vector256<T> c, Vector256<T> a,
            out Vector256<T> loss, out Vector256<T> slope, out Vector256<T> flag0, out Vector256<T> flag1)
        {
            var one = Vector256<T>.One;
            var rho = Lane.Exp(r);
            var tau = Vector256.ConditionalSelect(Vector256.LessThanOrEqual(a, Vector256<T>.Zero), _tn, _tp);
            var s = one / (one + Lane.Exp(-((rho - one) * tau)));
            loss = -(s * _four / tau) * a;
            slope = -(a * _four * s * (one - s)) * rho * c;
            flag0 = flag1 = Vector256<T>.Zero;
        }
    }
}

/// <summary>REINFORCE's -A l (<see cref="ReinforceLoss"/>).</summary>
internal sealed class ReinforceLink : TokenLink
{
    internal override bool UsesRatio => false;

    internal override bool DifferentiatesRatio => false;

    internal override void Rows(PolicyRows job, long from, long to)
    {
        if (job.Double) job.Run<double, Lanes<double>>(default, from, to);
        else job.Run<float, Lanes<float>>(default, from, to);
    }

    private readonly struct Lanes<T> : ILinkLanes<T> where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Evaluate(Vector256<T> l, Vector256<T> r, Vector256<T> c, Vector256<T> a,
            out Vector256<T> loss, out Vector256<T> slope, out Vector256<T> flag0, out Vector256<T> flag1)
        {
            slope = -a;
            loss = slope * l;
            flag0 = flag1 = Vector256<T>.Zero;
        }
    }
}

/// <summary>A user's term from <see cref="TokenLink.FromFunction"/>: one delegate call per token, in float64.</summary>
internal sealed class FunctionLink(PolicyTermFunction term, ImportanceRatio ratio) : TokenLink
{
    internal override ImportanceRatio? Ratio => ratio;

    internal override void Rows(PolicyRows job, long from, long to)
    {
        if (job.Double) job.Run<double, Lanes<double>>(new(term), from, to);
        else job.Run<float, Lanes<float>>(new(term), from, to);
    }

    private readonly struct Lanes<T>(PolicyTermFunction term) : ILinkLanes<T> where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
        [MethodImpl(MethodImplOptions.NoInlining)]
        public void Evaluate(Vector256<T> l, Vector256<T> r, Vector256<T> c, Vector256<T> a,
            out Vector256<T> loss, out Vector256<T> slope, out Vector256<T> flag0, out Vector256<T> flag1)
        {
            (loss, slope) = (Vector256<T>.Zero, Vector256<T>.Zero);
            for (int k = 0; k < Vector256<T>.Count; k++)
            {
                var (value, derivative) = term(double.CreateTruncating(l[k]), double.CreateTruncating(r[k]), double.CreateTruncating(c[k]),
                    double.CreateTruncating(a[k]));
                loss = loss.WithElement(k, T.CreateTruncating(value));
                slope = slope.WithElement(k, T.CreateTruncating(derivative));
            }
            flag0 = flag1 = Vector256<T>.Zero;
        }
    }
}
