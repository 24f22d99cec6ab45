using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Alignment.Losses.Internal;

/// <summary>
/// The row kernel of <see cref="FusedPolicyPass"/>: for each sequence, one loop over its tokens up to its last valid one,
/// in float32 lanes (float32, bfloat16 and float16 inputs) or float64 lanes (float64 inputs), that reads every input
/// once, masks and checks it, and computes the clamped log-ratio, the policy term and its derivative
/// (<see cref="ILinkLanes{T}"/>), the top-entropy mask, the rollout weight, the KL estimate, the entropy bonus, and the
/// row's sums for the metrics; it writes the per-token loss and its derivatives straight into the output tensors.
/// </summary>
/// <remarks>
/// Every input is a contiguous [N, T] tensor of the lane type (or [N] advantages); the caller converts any other. A
/// row's sums are taken in a fixed order (the metric sums in float64), so the result does not depend on which thread
/// ran the row. Sequence-level quantities (GSPO-token's mean log-ratio, a sequence rollout weight) take a first loop.
/// </remarks>
internal sealed unsafe class PolicyRows
{
    private const double LogProbTolerance = 1e-3;

    internal required int Length { get; init; }
    internal required bool Double { get; init; }
    internal required nint Mask { get; init; }                 // bool bytes, contiguous [N, T]
    internal required nint LogProbs { get; init; }
    internal required nint Old { get; init; }                  // 0: l_old = sg(l)
    internal nint Reference { get; init; }
    internal nint Behaviour { get; init; }
    internal nint Entropy { get; init; }
    internal required nint Advantages { get; init; }
    internal required bool PerSequenceAdvantages { get; init; }
    internal required ImportanceRatio Ratio { get; init; }
    internal required bool UsesRatio { get; init; }
    internal required double Clamp { get; init; }
    internal KlPenalty? Kl { get; init; }
    internal RolloutCorrection? Correction { get; init; }
    internal double? Threshold { get; init; }
    internal bool Bonus { get; init; }
    internal bool EntropyGrad { get; init; }
    internal double EntropyCoefficient { get; init; }
    internal required bool CheckLogProbs { get; init; }
    internal required int Flags { get; init; }
    internal required nint OutLoss { get; init; }
    internal nint OutSlope { get; init; }
    internal bool SequenceGradient { get; init; }               // a sequence-level ratio with its gradient (GSPO, RLOO)
    internal nint OutSequenceSlope { get; init; }               // dL_t / d log s_i
    internal nint OutSequenceWeight { get; init; }              // d log s_i / d l_t
    internal nint OutEntropySlope { get; init; }
    internal required RowStats Stats { get; init; }

    /// <summary>What each row leaves for the combination in row order.</summary>
    internal sealed class RowStats(int n)
    {
        internal readonly double[] Tokens = new double[n], Loss = new double[n], Magnitude = new double[n], Kl = new double[n], Entropy = new double[n],
            Bonus = new double[n], WeightSum = new double[n], WeightMin = new double[n], WeightMax = new double[n];
        internal readonly double[][] Flags = { new double[n], new double[n], new double[n] };
        internal readonly bool[] Bad = new bool[n], Padding = new bool[n];
    }

    /// <summary>A row's inputs at one vector of lanes: loaded, or copied through a zero-padded buffer at the row's end.</summary>
    private ref struct Reader<T>(T* buffer, int lanes) where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        internal readonly Vector256<T> Load(T* p, int count)
        {
            if (count >= lanes) return Vector256.Load(p);
            for (int k = 0; k < lanes; k++) buffer[k] = k < count ? p[k] : T.Zero;
            return Vector256.Load(buffer);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        internal readonly void Store(Vector256<T> v, T* p, int count)
        {
            if (count >= lanes)
            {
                v.Store(p);
                return;
            }
            v.Store(buffer);
            for (int k = 0; k < count; k++) p[k] = buffer[k];
        }
    }

    /// <summary>A compile-time switch: the kernel is compiled once without the extras (entropy, rollout correction,
    /// sequence ratios), so that their vectors and branches cost nothing in the common case.</summary>
    private interface ISwitch
    {
        static abstract bool Enabled { get; }
    }

    private struct On : ISwitch
    {
        public static bool Enabled => true;
    }

    private struct Off : ISwitch
    {
        public static bool Enabled => false;
    }

    /// <summary>Rows [from, to) with the term <paramref name="link"/> in lanes of <typeparamref name="T"/>.</summary>
    internal void Run<T, TL>(TL link, long from, long to) where T : unmanaged, IBinaryFloatingPointIeee754<T> where TL : struct, ILinkLanes<T>
    {
        bool extras = Entropy != 0 || Correction is not null || UsesRatio && Ratio != ImportanceRatio.Token || SequenceGradient || Bonus;
        if (extras) Rows<T, TL, On>(link, from, to);
        else Rows<T, TL, Off>(link, from, to);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private void Rows<T, TL, TX>(TL link, long from, long to) where T : unmanaged, IBinaryFloatingPointIeee754<T> where TL : struct, ILinkLanes<T>
        where TX : struct, ISwitch
    {
        int t = Length, lanes = Vector256<T>.Count;
        var scratch = new T[t + 2 * lanes];
        var stats = Stats;
        var (zero, one) = (Vector256<T>.Zero, Vector256<T>.One);
        var tolerance = Lane.Of<T>(LogProbTolerance);
        var (clampLo, clampHi) = (Lane.Of<T>(-Clamp), Lane.Of<T>(Clamp));
        var threshold = Lane.Of<T>(Threshold ?? 0);
        var (wLo, wHi) = (Lane.Of<T>(Correction?.Min ?? double.NegativeInfinity), Lane.Of<T>(Correction?.Max ?? double.PositiveInfinity));
        var (posInf, negInf) = (Lane.Of<T>(double.PositiveInfinity), Lane.Of<T>(double.NegativeInfinity));
        var beta = Lane.Of<T>(Kl?.Beta ?? 0);
        var coefficient = Lane.Of<T>(-EntropyCoefficient);
        bool kl = Kl is not null, klTerm = kl && Kl!.Beta > 0, bias = kl && Kl!.BiasCorrected, tokenWeights = Correction is { Level: RolloutCorrectionLevel.Token };
        bool sequenceRatio = TX.Enabled && UsesRatio && Ratio != ImportanceRatio.Token, topEntropy = TX.Enabled && Threshold is not null;
        bool entropy = TX.Enabled && Entropy != 0, correction = TX.Enabled && Correction is not null, sequenceGradient = TX.Enabled && SequenceGradient;
        bool bonus = TX.Enabled && Bonus;
        fixed (T* m = scratch)
        {
            var io = new Reader<T>(m + t + lanes, lanes);
            for (long i = from; i < to; i++)
            {
                long offset = i * t;
                // the mask as 0/1 lanes, and the row's extent: its last valid token + 1
                bool bad = false;
                int end = MaskLanes((byte*)Mask + offset, t, m);
                for (int j = end; j < t + lanes; j++) m[j] = T.Zero;
                T* lp = (T*)LogProbs + offset, lo = Old == 0 ? lp : (T*)Old + offset, lr = (T*)Reference + offset, lb = (T*)Behaviour + offset,
                    hv = (T*)Entropy + offset, av = (T*)Advantages + (PerSequenceAdvantages ? 0 : offset);
                var sequenceAdvantage = PerSequenceAdvantages ? Vector256.Create(((T*)Advantages)[i]) : zero;
                bad |= PerSequenceAdvantages && !T.IsFinite(((T*)Advantages)[i]);

                // sequence-level quantities first: the mean (or sum) log-ratio, the sequence's rollout weight
                T ratioValue = T.Zero, sequenceWeight = T.One, tokens = T.One;
                if (sequenceRatio || correction && Correction!.Level == RolloutCorrectionLevel.Sequence)
                {
                    var (sum, delta, count) = (zero, zero, zero);
                    for (int j = 0; j < end; j += lanes)
                    {
                        int left = end - j;
                        var valid = Vector256.Equals(Vector256.Load(m + j), one);
                        var (l, old) = (io.Load(lp + j, left) & valid, io.Load(lo + j, left) & valid);
                        sum += Lane.Clamp(l - old, clampLo, clampHi).Value;
                        if (correction) delta += (old - (io.Load(lb + j, left) & valid)) * Vector256.Load(m + j);
                        count += Vector256.Load(m + j);
                    }
                    T total = Vector256.Sum(sum);
                    tokens = T.Max(T.One, Vector256.Sum(count));
                    ratioValue = Ratio == ImportanceRatio.SequenceSum ? total : total / tokens;
                    if (correction) sequenceWeight = T.Exp(Vector256.Sum(delta));
                }
                var sequenceLogRatio = Vector256.Create(ratioValue);
                var sequenceW = Vector256.Create(sequenceWeight);
                var perRatioToken = Ratio == ImportanceRatio.SequenceSum ? one : Vector256.Create(T.One / tokens);

                var (nonFinite, positive, padding) = (zero, zero, zero);
                var (vTokens, vLoss, vMagnitude, vF0, vF1, vF2, vWMin, vWMax) = (zero, zero, zero, zero, zero, zero, posInf, negInf);
                var (vKl, vH, vBonus, vW) = (Vector256<double>.Zero, Vector256<double>.Zero, Vector256<double>.Zero, Vector256<double>.Zero);
                for (int j = 0; j < end; j += lanes)
                {
                    int left = end - j;
                    var mv = Vector256.Load(m + j);
                    var valid = Vector256.Equals(mv, one);
                    vTokens += mv;
                    var rawL = io.Load(lp + j, left);
                    padding |= ~Vector256.Equals(rawL - rawL, zero);
                    var l = rawL & valid;
                    var old = Old == 0 ? l : io.Load(lo + j, left) & valid;
                    var a = PerSequenceAdvantages ? sequenceAdvantage & valid : io.Load(av + j, left) & valid;
                    nonFinite |= ~Vector256.Equals(l - l, zero) | ~Vector256.Equals(old - old, zero) | ~Vector256.Equals(a - a, zero);
                    positive |= Vector256.GreaterThan(l, tolerance) | Vector256.GreaterThan(old, tolerance);

                    // the clamped log-ratio, and the ratio the term reads
                    var (r, c) = Lane.Clamp(l - old, clampLo, clampHi);
                    var (ratio, ratioSlope) = !sequenceRatio ? (r, c)
                        : Ratio == ImportanceRatio.SequenceMeanToken ? (((sequenceLogRatio & valid) + l) - l, one)
                        : (sequenceLogRatio & valid, sequenceGradient ? one : zero);
                    link.Evaluate(l, ratio, ratioSlope, a, out var p, out var g, out var f0, out var f1);
                    var gs = zero;                                       // with a sequence ratio: dL_t / d log s, kept apart
                    if (sequenceGradient) (gs, g) = (g, zero);

                    var keep = one;
                    Vector256<T> h = zero;
                    if (entropy)
                    {
                        var rawH = io.Load(hv + j, left);
                        if (EntropyGrad) padding |= ~Vector256.Equals(rawH - rawH, zero);
                        h = rawH & valid;
                        nonFinite |= ~Vector256.Equals(h - h, zero);
                        vH += Wide(h);
                        if (topEntropy)
                        {
                            keep = Lane.Ones(Vector256.GreaterThanOrEqual(h, threshold) & valid);
                            (p, g, gs) = (p * keep, g * keep, gs * keep);
                        }
                    }
                    if (correction)
                    {
                        var behaviour = io.Load(lb + j, left) & valid;
                        nonFinite |= ~Vector256.Equals(behaviour - behaviour, zero);
                        positive |= Vector256.GreaterThan(behaviour, tolerance);
                        var weight = tokenWeights ? Lane.Exp((old - behaviour) * mv) : sequenceW & valid;
                        weight = Correction!.Mode == RolloutCorrectionMode.Truncate
                            ? Lane.Min(Lane.Max(weight, wLo), wHi)
                            : weight & ~(Vector256.LessThan(weight, wLo) | Vector256.GreaterThan(weight, wHi));
                        (p, g, gs) = (p * weight, g * weight, gs * weight);
                        vW += Wide(weight & valid);
                        vWMin = Lane.Min(vWMin, Vector256.ConditionalSelect(valid, weight, posInf));
                        vWMax = Lane.Max(vWMax, Vector256.ConditionalSelect(valid, weight, negInf));
                    }
                    if (kl)
                    {
                        var reference = io.Load(lr + j, left) & valid;
                        nonFinite |= ~Vector256.Equals(reference - reference, zero);
                        positive |= Vector256.GreaterThan(reference, tolerance);
                        var (k, dk) = KlTerm(Kl!, reference - l);
                        if (bias)
                        {
                            var rho = Lane.Exp(r);
                            (k, dk) = (k * rho, dk * rho + k * rho * c);
                        }
                        if (klTerm) (p, g) = (p + k * beta, g + dk * beta);
                        vKl += Wide(k & valid);
                    }
                    p &= valid;
                    g &= valid;
                    vLoss += p;
                    vMagnitude += Vector256.Abs(p) + Vector256.Abs(g);       // NaN or past the range: so is this sum
                    io.Store(p, (T*)OutLoss + offset + j, left);
                    if (OutSlope != 0) io.Store(g, (T*)OutSlope + offset + j, left);
                    if (sequenceGradient && OutSequenceSlope != 0)
                    {
                        gs &= valid;
                        vMagnitude += Vector256.Abs(gs);
                        io.Store(gs, (T*)OutSequenceSlope + offset + j, left);
                        io.Store((c * perRatioToken) & valid, (T*)OutSequenceWeight + offset + j, left);
                    }
                    if (bonus)
                    {
                        var ce = (keep * coefficient) & valid;
                        vBonus += Wide(h * ce);
                        if (OutEntropySlope != 0) io.Store(ce, (T*)OutEntropySlope + offset + j, left);
                    }
                    if (Flags > 0)
                    {
                        var (a0, a1) = (f0 & valid, f1 & valid);
                        (vF0, vF1, vF2) = (vF0 + a0, vF1 + a1, vF2 + Lane.Max(a0, a1));
                    }
                }
                // no token counts past the row's end: zeros there, and a look for NaN/Inf (which the surrogate must zero)
                if (end < t)
                {
                    new Span<T>((T*)OutLoss + offset + end, t - end).Clear();
                    if (OutSlope != 0) new Span<T>((T*)OutSlope + offset + end, t - end).Clear();
                    if (OutSequenceSlope != 0)
                    {
                        new Span<T>((T*)OutSequenceSlope + offset + end, t - end).Clear();
                        new Span<T>((T*)OutSequenceWeight + offset + end, t - end).Clear();
                    }
                    if (OutEntropySlope != 0) new Span<T>((T*)OutEntropySlope + offset + end, t - end).Clear();
                    bool tail = AnyNonFinite(lp + end, t - end) || EntropyGrad && AnyNonFinite(hv + end, t - end);
                    if (tail) padding = Vector256<T>.AllBitsSet;
                }
                stats.Bad[i] = bad || nonFinite != zero || CheckLogProbs && positive != zero;
                stats.Padding[i] = padding != zero;
                stats.Tokens[i] = double.CreateTruncating(Vector256.Sum(vTokens));
                stats.Loss[i] = double.CreateTruncating(Vector256.Sum(vLoss));
                stats.Magnitude[i] = double.CreateTruncating(Vector256.Sum(vMagnitude));
                stats.Kl[i] = Vector256.Sum(vKl);
                stats.Entropy[i] = Vector256.Sum(vH);
                stats.Bonus[i] = Vector256.Sum(vBonus);
                stats.WeightSum[i] = Vector256.Sum(vW);
                stats.WeightMin[i] = double.CreateTruncating(Min(vWMin));
                stats.WeightMax[i] = double.CreateTruncating(-Min(-vWMax));
                stats.Flags[0][i] = double.CreateTruncating(Vector256.Sum(vF0));
                stats.Flags[1][i] = double.CreateTruncating(Vector256.Sum(vF1));
                stats.Flags[2][i] = double.CreateTruncating(Vector256.Sum(vF2));
            }
        }
    }

    /// <summary>
    /// A bool row as 0/1 lanes up to its last true byte, whose index + 1 it returns (found from the end, 32 bytes at a time:
    /// a padded row's padding costs one comparison per 32 tokens).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int MaskLanes<T>(byte* bytes, int t, T* m) where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
        int end = t;
        while (end >= 32 && Vector256.Load(bytes + end - 32) == Vector256<byte>.Zero) end -= 32;
        while (end > 0 && bytes[end - 1] == 0) end--;
        int j = 0;
        // (a byte other than 0 and 1, which no libtorch op writes into a bool tensor, still counts once)
        if (typeof(T) == typeof(float) && Avx2.IsSupported)
            for (; j + 8 <= end; j += 8)
                Avx.ConvertToVector256Single(Avx2.Min(Avx2.ConvertToVector256Int32(bytes + j), Vector256<int>.One)).Store((float*)m + j);
        else if (typeof(T) == typeof(double) && Avx.IsSupported)
            for (; j + 4 <= end; j += 4)
                Avx.ConvertToVector256Double(Sse41.Min(Sse41.ConvertToVector128Int32(bytes + j), Vector128<int>.One)).Store((double*)m + j);
        for (; j < end; j++) m[j] = bytes[j] != 0 ? T.One : T.Zero;
        return end;
    }

    /// <summary>The smallest lane.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static T Min<T>(Vector256<T> v) where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
        T least = v[0];
        for (int k = 1; k < Vector256<T>.Count; k++) least = T.Min(least, v[k]);
        return least;
    }

    /// <summary>A vector of T as float64 lanes summed pairwise (exact for float32), for the metric sums.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<double> Wide<T>(Vector256<T> v) where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
        if (typeof(T) == typeof(double)) return v.As<T, double>();
        var (lower, upper) = Vector256.Widen(v.As<T, float>());
        return lower + upper;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static bool AnyNonFinite<T>(T* p, int n) where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
        int j = 0, lanes = Vector256<T>.Count;
        var bad = Vector256<T>.Zero;
        for (; j + lanes <= n; j += lanes)
        {
            var v = Vector256.Load(p + j);
            bad |= ~Vector256.Equals(v - v, Vector256<T>.Zero);
        }
        for (; j < n; j++)
            if (!T.IsFinite(p[j])) return true;
        return bad != Vector256<T>.Zero;
    }

    /// <summary>The KL estimate and its derivative with respect to l from u = l_ref - l (<see cref="KlPenalty"/>'s forms).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector256<T> Value, Vector256<T> Slope) KlTerm<T>(KlPenalty kl, Vector256<T> u) where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
        var (one, half) = (Vector256<T>.One, Lane.Of<T>(0.5));
        var du = -one;                                             // du / dl
        if (kl.Clamp)
        {
            var (clamped, inside) = Lane.Clamp(u, Lane.Of<T>(-20), Lane.Of<T>(20));
            (u, du) = (clamped, -inside);
        }
        switch (kl.Estimator)
        {
            case KlEstimator.K1: return (-u, -du);
            case KlEstimator.K2: return (u * u * half, u * du);
            case KlEstimator.K3:
                var (k3, d3) = K3(u, kl.Clamp);
                return (k3, d3 * du);
            default:
                var k2 = u * u * half;
                return (k2 + (K3(u, kl.Clamp).Value - k2), u * du);
        }
    }

    /// <summary>
    /// k3 = e^v - v - 1 (clamped to [-10, 10] with verl's clamp) and dk3/dv = e^v - 1. In float64 lanes as written (as the
    /// op-by-op path computes it); in float32 lanes, where e^v - v - 1 and e^v - 1 lose every digit as v -&gt; 0, by their
    /// Taylor series for |v| &lt; 1/2 (degree 9, truncation below 3e-9 relative).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector256<T> Value, Vector256<T> Slope) K3<T>(Vector256<T> v, bool clamp) where T : unmanaged, IBinaryFloatingPointIeee754<T>
    {
        var e = Lane.Exp(v);
        var k = e - v - Vector256<T>.One;
        var dk = e - Vector256<T>.One;
        if (typeof(T) == typeof(float))
        {
            // expm1(v) = v + v^2/2 + ... and k3 = expm1(v) - v = v^2 (1/2 + v/6 + ...), for small |v|
            var p = Lane.Of<T>(1.0 / 362880);
            p = p * v + Lane.Of<T>(1.0 / 40320);
            p = p * v + Lane.Of<T>(1.0 / 5040);
            p = p * v + Lane.Of<T>(1.0 / 720);
            p = p * v + Lane.Of<T>(1.0 / 120);
            p = p * v + Lane.Of<T>(1.0 / 24);
            p = p * v + Lane.Of<T>(1.0 / 6);
            p = p * v + Lane.Of<T>(0.5);
            var small = Vector256.LessThan(Vector256.Abs(v), Lane.Of<T>(0.5));
            var series = v * v * p;
            k = Vector256.ConditionalSelect(small, series, k);
            dk = Vector256.ConditionalSelect(small, series + v, dk);
        }
        if (!clamp) return (k, dk);
        var (ck, sk) = Lane.Clamp(k, Lane.Of<T>(-10), Lane.Of<T>(10));
        return (ck, dk * sk);
    }
}
