using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// The CPU log-prob step as a managed kernel over rows of logits [rows, V] (float32 or bfloat16, unit stride along V):
/// forward, per row, the logsumexp, the target's log-prob and on request WPO's log sum_v p_v^2 and the step statistics,
/// in one read of the row from memory (a max pass, then an exp-sum pass over the row while it is in cache); backward, per
/// row, g * (onehot(y) - softmax(z)) in one read of the logits and one write of the gradient (in the logits' dtype).
/// </summary>
/// <remarks>
/// <para>libtorch's log_softmax + gather (+ their backward) makes about four passes over [rows, V] forward and four
/// backward; this makes one and one-plus-one. The arithmetic is eight float32 lanes at a time (<see cref="Lane.ExpFloat"/>, .NET 9
/// or later); sums are accumulated in float32 over blocks of 512 values and then in float64, so they are at least as
/// accurate as libtorch's. Rows run in parallel on up to <c>torch.get_num_threads()</c> threads; each row is computed by
/// one thread in a fixed order, so the results are bitwise the same whatever the thread count.</para>
/// <para>Rows that do not count (masked: valid false forward, g = 0 backward) are skipped forward (zeros) and written as
/// exact zeros backward, whatever their logits hold. NaN and Inf at a counted row propagate into its logsumexp, so the
/// caller's finiteness check of the sums sees them as it does on the op-by-op path.</para>
/// </remarks>
internal static unsafe class LogSoftmaxRows
{
    private const int Block = 512;            // values summed in float32 before the float64 accumulator
    private const long MinParallelWork = 1L << 18;

    /// <summary>Whether the kernel runs on this runtime and processor (.NET 9+ with hardware 256-bit vectors).</summary>
    internal static bool Available =>
#if NET9_0_OR_GREATER
        Vector256.IsHardwareAccelerated;
#else
        false;
#endif

    /// <summary>Kernel calls (forward and backward) made from this thread: lets tests see which path ran.</summary>
    [ThreadStatic] internal static int CallsOnThisThread;

    /// <summary>Whether a [.., V] tensor can be read (or written) by the kernel: CPU, float32 or bfloat16, unit stride along V.</summary>
    internal static bool Supports(Tensor x) =>
        Available && x.device_type == DeviceType.CPU && x.dtype is ScalarType.Float32 or ScalarType.BFloat16
        && x.dim() is 2 or 3 && x.shape[^1] is > 0 and <= int.MaxValue - 64 && (x.shape[^1] == 1 || x.stride(-1) == 1)
        && !x.is_conj() && !x.is_neg();

    /// <summary>The rows of a [N, T, V] (or [rows, V]) tensor: row r = (n, t) starts at n * OuterStride + t * InnerStride.</summary>
    private readonly record struct Grid(nint Base, long Inner, long OuterStride, long InnerStride, int Vocab, bool BFloat16)
    {
        internal static Grid Of(Tensor x) => x.dim() == 3
            ? new((nint)TensorMemory.Address(x), x.shape[1], x.stride(0), x.stride(1), (int)x.shape[2], x.dtype == ScalarType.BFloat16)
            : new((nint)TensorMemory.Address(x), x.shape[0], 0, x.stride(0), (int)x.shape[1], x.dtype == ScalarType.BFloat16);

        internal nint Row(long r) => Base + (nint)(((r / Inner) * OuterStride + (r % Inner) * InnerStride) * (BFloat16 ? 2 : 4));
    }

    /// <summary>Per-token outputs of the forward pass; each pointer is to a contiguous [rows] float32 buffer, or null.</summary>
    internal readonly record struct Outputs(nint Lse, nint TargetLogp, nint LogSumSquares, nint Entropy, nint LogitMean, nint Hit);

    /// <summary>
    /// Forward over every row of <paramref name="logits"/> ([N, T, V] or [rows, V]; <see cref="Supports"/>): writes the
    /// logsumexp and target log-prob of each counted row into <paramref name="lse"/> and <paramref name="targetLogp"/>
    /// (contiguous float32, one value per row) and, when given, the per-token extras; rows with valid false get zeros.
    /// </summary>
    /// <param name="logits">[N, T, V] or [rows, V], float32 or bfloat16, unit stride along V.</param>
    /// <param name="targets">Contiguous int64 target ids in [0, V), one per row.</param>
    /// <param name="valid">Contiguous bool, one per row, or null (every row counts).</param>
    /// <param name="lse">Contiguous float32 [rows] out: the logsumexp.</param>
    /// <param name="targetLogp">Contiguous float32 [rows] out: z_y - logsumexp.</param>
    /// <param name="logSumSquares">Optional float32 [rows] out: log sum_v p_v^2 (WPO).</param>
    /// <param name="entropy">Optional float32 [rows] out: -sum_v p_v log p_v.</param>
    /// <param name="logitMean">Optional float32 [rows] out: the mean logit (only with entropy or logSumSquares).</param>
    /// <param name="hit">Optional float32 [rows] out: 1 where the first argmax is the target (only with entropy or logSumSquares).</param>
    internal static void Forward(Tensor logits, Tensor targets, Tensor? valid, Tensor lse, Tensor targetLogp,
        Tensor? logSumSquares = null, Tensor? entropy = null, Tensor? logitMean = null, Tensor? hit = null)
    {
        CallsOnThisThread++;
        var grid = Grid.Of(logits);
        long rows = targets.numel();
        nint y = (nint)TensorMemory.Address(targets), ok = valid is null ? 0 : (nint)TensorMemory.Address(valid);
        static nint P(Tensor? t) => t is null ? 0 : (nint)TensorMemory.Address(t);
        var outputs = new Outputs(P(lse), P(targetLogp), P(logSumSquares), P(entropy), P(logitMean), P(hit));
        Parallel(rows, grid.Vocab, (from, to) =>
        {
            if (grid.BFloat16) ForwardRows<BFloat16Values>(grid, from, to, (long*)y, (bool*)ok, outputs);
            else ForwardRows<Float32Values>(grid, from, to, (long*)y, (bool*)ok, outputs);
        });
    }

    /// <summary>
    /// Backward: writes g_r * (onehot(y_r) - softmax(z_r)) for every row into <paramref name="gradient"/> (same shape as
    /// <paramref name="logits"/>, its own strides and dtype; it may be <paramref name="logits"/> itself), an exact 0 where
    /// g_r = 0. <paramref name="lse"/>: the forward's logsumexp per row, or null to compute it here (from the row in cache).
    /// </summary>
    internal static void Backward(Tensor logits, Tensor gradient, Tensor targets, Tensor? lse, Tensor g)
    {
        CallsOnThisThread++;
        var (x, dx) = (Grid.Of(logits), Grid.Of(gradient));
        long rows = targets.numel();
        nint y = (nint)TensorMemory.Address(targets), l = lse is null ? 0 : (nint)TensorMemory.Address(lse), gp = (nint)TensorMemory.Address(g);
        Parallel(rows, x.Vocab, (from, to) =>
        {
            switch (x.BFloat16, dx.BFloat16)
            {
                case (false, false): BackwardRows<Float32Values, Float32Values>(x, dx, from, to, (long*)y, (float*)l, (float*)gp); break;
                case (true, true): BackwardRows<BFloat16Values, BFloat16Values>(x, dx, from, to, (long*)y, (float*)l, (float*)gp); break;
                case (true, false): BackwardRows<BFloat16Values, Float32Values>(x, dx, from, to, (long*)y, (float*)l, (float*)gp); break;
                default: BackwardRows<Float32Values, BFloat16Values>(x, dx, from, to, (long*)y, (float*)l, (float*)gp); break;
            }
        });
    }

    /// <summary>
    /// Runs rows [0, rows) in contiguous parts on up to torch.get_num_threads() threads (one part when the work, rows x
    /// <paramref name="workPerRow"/> elements, is small). Each row is computed by one thread, so results do not depend on
    /// the thread count. Shared by the library's managed row kernels.
    /// </summary>
    internal static void Parallel(long rows, long workPerRow, Action<long, long> body)
    {
        int threads = (int)Math.Min(Math.Max(1, torch.get_num_threads()), Math.Max(1, rows * workPerRow / MinParallelWork));
        threads = (int)Math.Min(threads, rows);
        if (threads <= 1)
        {
            body(0, rows);
            return;
        }
        int parts = (int)Math.Min(rows, threads * 4L);          // a few parts per thread: masked rows make parts uneven
        try
        {
            System.Threading.Tasks.Parallel.For(0, parts, new ParallelOptions { MaxDegreeOfParallelism = threads },
                k => body(rows * k / parts, rows * (k + 1) / parts));
        }
        catch (AggregateException e) when (e.InnerExceptions.Count > 0)
        {
            // the body's own exception (a user's policy term that throws, say), as on one thread
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e.InnerExceptions[0]).Throw();
        }
    }

    /// <summary>How a dtype's values are loaded as float32 lanes and stored back.</summary>
    private interface IValues
    {
        static abstract Vector256<float> Load(nint row, int i);
        static abstract float LoadOne(nint row, int i);
        static abstract void Store(nint row, int i, Vector256<float> v);
        static abstract void StoreOne(nint row, int i, float v);
    }

    private readonly struct Float32Values : IValues
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector256<float> Load(nint row, int i) => Vector256.Load((float*)row + i);
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static float LoadOne(nint row, int i) => ((float*)row)[i];
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static void Store(nint row, int i, Vector256<float> v) => v.Store((float*)row + i);
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static void StoreOne(nint row, int i, float v) => ((float*)row)[i] = v;
    }

    /// <summary>bfloat16: the upper half of a float32 (loads are exact); stores round to nearest even, as libtorch's cast does.</summary>
    private readonly struct BFloat16Values : IValues
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector256<float> Load(nint row, int i)
        {
            var h = Vector128.Load((ushort*)row + i);
            return Vector256.ShiftLeft(Vector256.Create(Vector128.WidenLower(h), Vector128.WidenUpper(h)), 16).AsSingle();
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static float LoadOne(nint row, int i) => BitConverter.UInt32BitsToSingle((uint)((ushort*)row)[i] << 16);

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static void Store(nint row, int i, Vector256<float> v)
        {
            var bits = v.AsUInt32();
            var rounded = Vector256.ShiftRightLogical(bits + Vector256.Create(0x7FFFu) + (Vector256.ShiftRightLogical(bits, 16) & Vector256<uint>.One), 16);
            rounded = Vector256.ConditionalSelect(Vector256.Equals(v, v).AsUInt32(), rounded, Vector256.Create(0x7FC0u));   // NaN stays NaN
            Vector128.Narrow(rounded.GetLower(), rounded.GetUpper()).Store((ushort*)row + i);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static void StoreOne(nint row, int i, float v)
        {
            uint bits = BitConverter.SingleToUInt32Bits(v);
            ((ushort*)row)[i] = float.IsNaN(v) ? (ushort)0x7FC0 : (ushort)((bits + 0x7FFFu + ((bits >> 16) & 1)) >> 16);
        }
    }

#if NET9_0_OR_GREATER
    private static float HorizontalMax(Vector256<float> v)
    {
        var m = Vector128.Max(v.GetLower(), v.GetUpper());
        float a = Math.Max(m[0], m[1]), b = Math.Max(m[2], m[3]);
        return Math.Max(a, b);
    }

    private static Vector256<double> Widened(Vector256<float> v) =>
        Vector256.WidenLower(v) + Vector256.WidenUpper(v);

    /// <summary>The row's maximum (NaN if it holds one).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float RowMax<TV>(nint row, int v) where TV : IValues
    {
        // one vmaxps per 8 values (.NET 9's IEEE Vector256.Max costs eight instructions), NaN tracked apart
        var (top, nan) = (Vector256.Create(float.NegativeInfinity), Vector256<float>.Zero);
        int i = 0;
        for (; i + 8 <= v; i += 8)
        {
            var x = TV.Load(row, i);
            top = Lane.Max(top, x);
            nan |= ~Vector256.Equals(x, x);
        }
        float m = nan == Vector256<float>.Zero ? HorizontalMax(top) : float.NaN;
        for (; i < v; i++) m = Math.Max(m, TV.LoadOne(row, i));
        return m;
    }

    /// <summary>sum_v exp(z_v - m), in float32 blocks accumulated in float64.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static double ExpSum<TV>(nint row, int v, float m) where TV : IValues
    {
        var shift = Vector256.Create(m);
        var total = Vector256<double>.Zero;
        int i = 0;
        while (i + 8 <= v)
        {
            var partial = Vector256<float>.Zero;
            for (int end = Math.Min(v - 7, i + Block); i < end; i += 8) partial += Lane.ExpFloat(TV.Load(row, i) - shift);
            total += Widened(partial);
        }
        double s = Vector256.Sum(total);
        for (; i < v; i++) s += MathF.Exp(TV.LoadOne(row, i) - m);
        return s;
    }

    private static void ForwardRows<TV>(Grid grid, long from, long to, long* targets, bool* valid, Outputs o) where TV : IValues
    {
        int v = grid.Vocab;
        bool extras = o.LogSumSquares != 0 || o.Entropy != 0;
        for (long r = from; r < to; r++)
        {
            if (valid is not null && !valid[r])
            {
                ((float*)o.Lse)[r] = 0;
                ((float*)o.TargetLogp)[r] = 0;
                continue;
            }
            nint row = grid.Row(r);
            float m = RowMax<TV>(row, v);
            double lse;
            if (!extras)
                lse = m + Math.Log(ExpSum<TV>(row, v, m));
            else
            {
                var (s, weighted, squares, logits) = ExpSums<TV>(row, v, m);
                double logS = Math.Log(s);
                lse = m + logS;
                if (o.LogSumSquares != 0) ((float*)o.LogSumSquares)[r] = (float)(Math.Log(squares) - 2 * logS);
                if (o.Entropy != 0) ((float*)o.Entropy)[r] = (float)(logS - weighted / s);
                if (o.LogitMean != 0) ((float*)o.LogitMean)[r] = (float)(logits / v);
                if (o.Hit != 0) ((float*)o.Hit)[r] = FirstIndexOf<TV>(row, v, m) == targets[r] ? 1 : 0;
            }
            ((float*)o.Lse)[r] = (float)lse;
            ((float*)o.TargetLogp)[r] = (float)(TV.LoadOne(row, (int)targets[r]) - lse);
        }
    }

    /// <summary>With the extras: sum e, sum e (z - m) (0 where e = 0), sum e^2 and sum z, e = exp(z - m).</summary>
    private static (double S, double Weighted, double Squares, double Logits) ExpSums<TV>(nint row, int v, float m) where TV : IValues
    {
        var shift = Vector256.Create(m);
        var (ts, tw, tq, tz) = (Vector256<double>.Zero, Vector256<double>.Zero, Vector256<double>.Zero, Vector256<double>.Zero);
        int i = 0;
        while (i + 8 <= v)
        {
            var (ps, pw, pq, pz) = (Vector256<float>.Zero, Vector256<float>.Zero, Vector256<float>.Zero, Vector256<float>.Zero);
            for (int end = Math.Min(v - 7, i + Block); i < end; i += 8)
            {
                var z = TV.Load(row, i);
                var d = z - shift;
                var e = Lane.ExpFloat(d);
                ps += e;
                pw += Vector256.ConditionalSelect(Vector256.Equals(e, Vector256<float>.Zero), Vector256<float>.Zero, e * d);
                pq += e * e;
                pz += z;
            }
            (ts, tw, tq, tz) = (ts + Widened(ps), tw + Widened(pw), tq + Widened(pq), tz + Widened(pz));
        }
        double s = Vector256.Sum(ts), w = Vector256.Sum(tw), q = Vector256.Sum(tq), sz = Vector256.Sum(tz);
        for (; i < v; i++)
        {
            float z = TV.LoadOne(row, i), d = z - m, e = MathF.Exp(d);
            s += e;
            if (e != 0) w += e * d;
            q += e * e;
            sz += z;
        }
        return (s, w, q, sz);
    }

    /// <summary>The first index holding <paramref name="m"/> (the first argmax), or -1.</summary>
    private static long FirstIndexOf<TV>(nint row, int v, float m) where TV : IValues
    {
        var target = Vector256.Create(m);
        int i = 0;
        for (; i + 8 <= v; i += 8)
        {
            uint hits = Vector256.Equals(TV.Load(row, i), target).ExtractMostSignificantBits();
            if (hits != 0) return i + System.Numerics.BitOperations.TrailingZeroCount(hits);
        }
        for (; i < v; i++)
            if (TV.LoadOne(row, i) == m) return i;
        return -1;
    }

    private static void BackwardRows<TX, TD>(Grid x, Grid dx, long from, long to, long* targets, float* lse, float* g)
        where TX : IValues where TD : IValues
    {
        int v = x.Vocab;
        for (long r = from; r < to; r++)
        {
            nint row = x.Row(r), outRow = dx.Row(r);
            float gr = g[r];
            int i = 0;
            if (gr == 0)
            {
                for (; i + 8 <= v; i += 8) TD.Store(outRow, i, Vector256<float>.Zero);
                for (; i < v; i++) TD.StoreOne(outRow, i, 0);
                continue;
            }
            float l;
            if (lse is not null) l = lse[r];
            else
            {
                float m = RowMax<TX>(row, v);
                l = (float)(m + Math.Log(ExpSum<TX>(row, v, m)));
            }
            int y = (int)targets[r];
            float atTarget = gr - gr * MathF.Exp(TX.LoadOne(row, y) - l);   // read before an in-place write overwrites it
            var (shift, scale) = (Vector256.Create(l), Vector256.Create(-gr));
            for (; i + 8 <= v; i += 8) TD.Store(outRow, i, Lane.ExpFloat(TX.Load(row, i) - shift) * scale);
            for (; i < v; i++) TD.StoreOne(outRow, i, MathF.Exp(TX.LoadOne(row, i) - l) * -gr);
            TD.StoreOne(outRow, y, atTarget);
        }
    }
#else
    private static void ForwardRows<TV>(Grid grid, long from, long to, long* targets, bool* valid, Outputs o) where TV : IValues =>
        throw new PlatformNotSupportedException("The managed log-softmax kernel needs .NET 9 or later.");

    private static void BackwardRows<TX, TD>(Grid x, Grid dx, long from, long to, long* targets, float* lse, float* g)
        where TX : IValues where TD : IValues =>
        throw new PlatformNotSupportedException("The managed log-softmax kernel needs .NET 9 or later.");
#endif
}
