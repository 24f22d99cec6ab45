using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace Alignment.Losses.Internal;

/// <summary>Lane arithmetic of the managed kernels (the policy pass, the log-softmax rows), in float32 or float64 lanes.</summary>
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
    /// e^x in four float64 lanes, within 1e-15 relative of Math.Exp, with AVX2 operations only, on .NET 8 too (which has no
    /// Vector256.Exp). On the 2-core CI machine, over x in [-20, 20], Math.Exp took 5-10 ns per value, .NET 10's
    /// Vector256.Exp 3-6 ns and this 1.5-1.8 (its float32 twin 0.75, Vector256.Exp's 5-8): x = k ln 2 + r with |r| &lt;= ln 2 / 2 (Cody and Waite's
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

    /// <summary>
    /// log(1 + e) for e in [0, 1] in four float64 lanes, within 4 ulp (LaneFunctionTests, 4,000 points): 2 atanh(s) with s = e / (2 + e) in [0, 1/3], by the
    /// series 2 s sum_k s^2k / (2k + 1) to k = 15 (the first term left out is below 2e-17 of the sum), evaluated by
    /// Estrin's scheme. No cancellation for tiny e (the result is 2s = e to rounding), no call out, on .NET 8 too.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector256<double> Log1pUnit(Vector256<double> e)
    {
        var s = e / (Vector256.Create(2.0) + e);
        var w = s * s;
        var w2 = w * w;
        var w4 = w2 * w2;
        var w8 = w4 * w4;
        static Vector256<double> C(int k) => Vector256.Create(1.0 / (2 * k + 1));
        var r0 = Fma(w2, Fma(w, C(3), C(2)), Fma(w, C(1), C(0)));
        var r1 = Fma(w2, Fma(w, C(7), C(6)), Fma(w, C(5), C(4)));
        var r2 = Fma(w2, Fma(w, C(11), C(10)), Fma(w, C(9), C(8)));
        var r3 = Fma(w2, Fma(w, C(15), C(14)), Fma(w, C(13), C(12)));
        var p = Fma(w8, Fma(w4, r3, r2), Fma(w4, r1, r0));
        return (s + s) * p;
    }

    /// <summary>
    /// The shared parts of the logistic functions at x, in four float64 lanes: e = exp(-|x|), u = 1 + e and, when
    /// <paramref name="withLog"/> (a constant at every call: the branch compiles away), log1p(e). From them, without
    /// cancellation in either tail: softplus(+-x) = max(+-x, 0) + log1p(e), sigmoid(x) = (x &gt;= 0 ? 1 : e) / u,
    /// sigmoid(-x) = (x &gt;= 0 ? e : 1) / u and sigmoid'(x) = e / u^2 (see <see cref="Logistic4"/>).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Logistic4 Logistic(Vector256<double> x, bool withLog = true)
    {
        var e = ExpDouble(-Vector256.Abs(x));
        return new Logistic4(x, e, Vector256<double>.One + e, withLog ? Log1pUnit(e) : Vector256.Create(double.NaN));
    }

    /// <summary>The logistic functions of four float64 lanes from their shared parts (<see cref="Logistic"/>).</summary>
    internal readonly struct Logistic4(Vector256<double> x, Vector256<double> e, Vector256<double> u, Vector256<double> log1p)
    {
        /// <summary>softplus(x) = log(1 + e^x) (needs the log: NaN without it).</summary>
        public Vector256<double> Softplus => Vector256.Max(x, Vector256<double>.Zero) + log1p;

        /// <summary>softplus(-x) = -log sigmoid(x) (needs the log).</summary>
        public Vector256<double> SoftplusOfNegative => Vector256.Max(-x, Vector256<double>.Zero) + log1p;

        /// <summary>sigmoid(x).</summary>
        public Vector256<double> Sigmoid => Vector256.ConditionalSelect(Vector256.GreaterThanOrEqual(x, Vector256<double>.Zero), Vector256<double>.One, e) / u;

        /// <summary>sigmoid(-x) = 1 - sigmoid(x).</summary>
        public Vector256<double> SigmoidOfNegative => Vector256.ConditionalSelect(Vector256.GreaterThanOrEqual(x, Vector256<double>.Zero), e, Vector256<double>.One) / u;

        /// <summary>sigmoid(x) sigmoid(-x), the slope of sigmoid.</summary>
        public Vector256<double> SigmoidSlope => e / (u * u);
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
