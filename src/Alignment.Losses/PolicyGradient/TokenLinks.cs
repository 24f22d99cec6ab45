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

/// <summary>Lane arithmetic shared by the fused terms, in float32 or float64 lanes.</summary>
internal static class Lane
{
    /// <summary>Every lane <paramref name="value"/> (rounded to T).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector256<T> Of<T>(double value) where T : unmanaged, IBinaryFloatingPointIeee754<T> => Vector256.Create(T.CreateTruncating(value));

    /// <summary>
    /// The lane-wise minimum as one instruction (vminps / vminpd): .NET 9's Vector256.Min implements IEEE 754-2019 minimum
    /// (NaN and signed-zero handling) in eight. The lanes it sees are finite (inputs are checked; padding is masked to 0).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector256<T> Min<T>(Vector256<T> x, Vector256<T> y) where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
#if NET9_0_OR_GREATER
        return Vector256.MinNative(x, y);
#else
        return Vector256.Min(x, y);
#endif
    }

    /// <summary>The lane-wise maximum as one instruction (see <see cref="Min{T}"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector256<T> Max<T>(Vector256<T> x, Vector256<T> y) where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
#if NET9_0_OR_GREATER
        return Vector256.MaxNative(x, y);
#else
        return Vector256.Max(x, y);
#endif
    }

    /// <summary>1 where <paramref name="condition"/> holds, else 0.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector256<T> Ones<T>(Vector256<T> condition) where T : unmanaged, IBinaryFloatingPointIeee754<T> => condition & Vector256<T>.One;

    /// <summary>libtorch's gradient share of the first operand of minimum(x, y): 1 where x &lt; y, 1/2 at a tie, 0 above.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector256<T> MinimumShare<T>(Vector256<T> x, Vector256<T> y) where T : unmanaged, IBinaryFloatingPointIeee754<T> =>
        Ones(Vector256.LessThan(x, y)) + (Vector256.Equals(x, y) & Vector256.Create(T.CreateTruncating(0.5)));

    /// <summary>clamp(x, lo, hi) and libtorch's clamp gradient (1 inside [lo, hi], bounds included; 0 outside).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static (Vector256<T> Value, Vector256<T> Slope) Clamp<T>(Vector256<T> x, Vector256<T> lo, Vector256<T> hi)
        where T : unmanaged, IBinaryFloatingPointIeee754<T> =>
        (Lane.Min(Lane.Max(x, lo), hi), Ones(Vector256.GreaterThanOrEqual(x, lo) & Vector256.LessThanOrEqual(x, hi)));

    /// <summary>e^x per lane (see <see cref="ExpDouble"/> and <see cref="ExpFloat"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector256<T> Exp<T>(Vector256<T> x) where T : unmanaged, IBinaryFloatingPointIeee754<T> =>
        typeof(T) == typeof(double) ? ExpDouble(x.As<T, double>()).As<double, T>() : ExpFloat(x.As<T, float>()).As<float, T>();

    /// <summary>
    /// e^x in four float64 lanes, within 1e-15 relative of Math.Exp, with AVX2 operations only (Vector256.Exp and Math.Exp
    /// cost 8-10 ns per value on the 2-core CI machine, this 3): x = k ln 2 + r with |r| &lt;= ln 2 / 2 (Cody and Waite's
    /// two-part ln 2, so that k ln2_hi is exact), e^r by its Taylor polynomial of degree 12 (remainder below 1e-16), 2^k
    /// built in the exponent bits. Vectors with a lane beyond |x| &gt; 708 (overflow, subnormals) or NaN take Math.Exp.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector256<double> ExpDouble(Vector256<double> x)
    {
        if (Vector256.GreaterThanAny(Vector256.Abs(x), Vector256.Create(708.0)) || !Vector256.EqualsAll(x, x)) return PerLane(x);
        var k = Vector256.Floor(Fma(x, Vector256.Create(1.4426950408889634), Vector256.Create(0.5)));
        var r = Fma(-k, Vector256.Create(0.693145751953125), x);
        r = Fma(-k, Vector256.Create(1.4286068203094172321e-6), r);
        // e^r = sum r^n / n!, n <= 12, by Estrin's scheme (a dependency chain of 5 multiply-adds instead of Horner's 12)
        var r2 = r * r;
        var r4 = r2 * r2;
        var r8 = r4 * r4;
        var c01 = Fma(r, Vector256<double>.One, Vector256<double>.One);
        var c23 = Fma(r, Vector256.Create(1.0 / 6), Vector256.Create(0.5));
        var c45 = Fma(r, Vector256.Create(1.0 / 120), Vector256.Create(1.0 / 24));
        var c67 = Fma(r, Vector256.Create(1.0 / 5040), Vector256.Create(1.0 / 720));
        var c89 = Fma(r, Vector256.Create(1.0 / 362880), Vector256.Create(1.0 / 40320));
        var c1011 = Fma(r, Vector256.Create(1.0 / 39916800), Vector256.Create(1.0 / 3628800));
        var c03 = Fma(r2, c23, c01);
        var c47 = Fma(r2, c67, c45);
        var c811 = Fma(r2, c1011, c89);
        var c07 = Fma(r4, c47, c03);
        var c812 = Fma(r4, Vector256.Create(1.0 / 479001600), c811);
        var p = Fma(r8, c812, c07);
        var magic = Vector256.Create(6755399441055744.0);                 // 2^52 + 2^51: k's integer in the low bits
        var twoToK = Vector256.ShiftLeft((k + magic).AsInt64() - magic.AsInt64() + Vector256.Create(1023L), 52).AsDouble();
        return p * twoToK;
    }

    /// <summary>
    /// e^x in eight float32 lanes, within 2 ulp of float32 rounding: the same reduction with float32's two-part ln 2 and
    /// the minimax polynomial of degree 7 of Moshier's Cephes expf (by Estrin's scheme). Below -87.33 the result is 0
    /// (float32's subnormals, under 1.2e-38, flushed), -inf included; NaN stays NaN; vectors with a lane above 88.3
    /// (near float32's overflow) take MathF.Exp. Shared with the log-softmax kernel, whose arguments are z - max &lt;= 0.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector256<float> ExpFloat(Vector256<float> x)
    {
        if (Vector256.GreaterThanAny(x, Vector256.Create(88.3f))) return PerLane(x);
        var low = Vector256.LessThan(x, Vector256.Create(-87.33f));
        x = Vector256.ConditionalSelect(low, Vector256<float>.Zero, x);                  // NaN passes through (and stays NaN)
        var k = Vector256.Floor(Fma(x, Vector256.Create(1.44269504088896341f), Vector256.Create(0.5f)));
        var r = Fma(-k, Vector256.Create(0.693359375f), x);
        r = Fma(-k, Vector256.Create(-2.12194440e-4f), r);
        var r2 = r * r;
        var r4 = r2 * r2;
        // p = p0 r^5 + p1 r^4 + ... + p5 (p0 = 1.98757e-4 ... p5 = 0.5) as (p0 r + p1) r^4 + (p2 r + p3) r^2 + (p4 r + p5)
        var q0 = Fma(r, Vector256.Create(1.9875691500e-4f), Vector256.Create(1.3981999507e-3f));
        var q1 = Fma(r, Vector256.Create(8.3334519073e-3f), Vector256.Create(4.1665795894e-2f));
        var q2 = Fma(r, Vector256.Create(1.6666665459e-1f), Vector256.Create(5.0000001201e-1f));
        var p = Fma(r4, q0, Fma(r2, q1, q2));
        var y = Fma(p, r2, r + Vector256<float>.One);
        var twoToK = Vector256.ShiftLeft(Vector256.ConvertToInt32(k) + Vector256.Create(127), 23).AsSingle();
        return Vector256.ConditionalSelect(low, Vector256<float>.Zero, y * twoToK);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<double> Fma(Vector256<double> a, Vector256<double> b, Vector256<double> c)
    {
#if NET9_0_OR_GREATER
        return Vector256.FusedMultiplyAdd(a, b, c);
#else
        return System.Runtime.Intrinsics.X86.Fma.IsSupported ? System.Runtime.Intrinsics.X86.Fma.MultiplyAdd(a, b, c) : a * b + c;
#endif
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Fma(Vector256<float> a, Vector256<float> b, Vector256<float> c)
    {
#if NET9_0_OR_GREATER
        return Vector256.FusedMultiplyAdd(a, b, c);
#else
        return System.Runtime.Intrinsics.X86.Fma.IsSupported ? System.Runtime.Intrinsics.X86.Fma.MultiplyAdd(a, b, c) : a * b + c;
#endif
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static Vector256<double> PerLane(Vector256<double> x) => Vector256.Create(Math.Exp(x[0]), Math.Exp(x[1]), Math.Exp(x[2]), Math.Exp(x[3]));

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static Vector256<float> PerLane(Vector256<float> x)
    {
        Span<float> v = stackalloc float[8];
        for (int i = 0; i < 8; i++) v[i] = MathF.Exp(x[i]);
        return Vector256.Create<float>(v);
    }
}
