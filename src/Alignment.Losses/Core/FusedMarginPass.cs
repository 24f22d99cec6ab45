using System.Runtime.Intrinsics;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// The fused CPU path of a paired loss with a <see cref="PairLink"/>: one managed pass over the inputs' memory computes
/// the log ratios, the link's values and slopes (a <see cref="MarginLink"/> of the log ratios: of their margin), the
/// standard metrics and the finite and log-prob checks; the loss is then returned through a surrogate whose value is the
/// per-pair loss and whose gradient is the saved slopes (no second derivative): pe = sg(L_i) + (d - sg(d)) * slope_i with
/// d = l_pol(y_w) - l_pol(y_l) for a margin link, sg(L_i) + (x_w - sg(x_w)) g_w,i + (x_l - sg(x_l)) g_l,i otherwise. A
/// handful of native operations instead of the op-by-op graph's thirty.
/// </summary>
internal static unsafe class FusedMarginPass
{
    /// <summary>
    /// The largest batch the pass takes: its float64 scratch is 9 values a pair (1.2 GB at this size); a larger batch
    /// runs op by op, in the inputs' own dtype.
    /// </summary>
    internal const long MaxPairs = 1 << 24;

    /// <summary>Whether the batch can take the fused path: CPU, paired, floating inputs, no example weights, at most <see cref="MaxPairs"/> pairs.</summary>
    internal static bool Applies(PreferenceBatch batch)
    {
        var p = batch.Policy;
        if (!p.IsPaired || batch.ExampleWeights is not null || p.Device.type != DeviceType.CPU) return false;
        if (p.ChosenCount > MaxPairs) return false;
        return batch.Reference is null || batch.Reference.Device.type == DeviceType.CPU;
    }

    /// <summary>
    /// The loss through the fused pass, or null when a check fails (a NaN/Inf, a positive log-prob): the op-by-op path
    /// then runs and names the problem exactly as it always does.
    /// </summary>
    internal static PreferenceLossResult? TryCompute(PreferenceBatch batch, PairLink link, double rewardScale, bool checkFinite, bool checkLogProbs,
        string name, ScalarType dtype)
    {
        int n = (int)batch.Policy.ChosenCount;
        var buffer = System.Buffers.ArrayPool<double>.Shared.Rent(9 * n);        // no large-object-heap allocation per call
        try
        {
            return Pass(batch, link, rewardScale, checkFinite, checkLogProbs, name, dtype, n, buffer);
        }
        finally
        {
            System.Buffers.ArrayPool<double>.Shared.Return(buffer);
        }
    }

    private static PreferenceLossResult? Pass(PreferenceBatch batch, PairLink link, double rewardScale, bool checkFinite, bool checkLogProbs,
        string name, ScalarType dtype, int n, double[] buffer)
    {
        var policy = batch.Policy;
        var reference = batch.Reference;
        Span<double> xw = buffer.AsSpan(0, n), xl = buffer.AsSpan(n, n), rw = buffer.AsSpan(2 * n, n), rl = buffer.AsSpan(3 * n, n),
            h = buffer.AsSpan(4 * n, n), slope = buffer.AsSpan(5 * n, n), other = buffer.AsSpan(6 * n, n);
        var margin = link as MarginLink;                      // one slope (dL/dh), or a slope per side
        TensorMemory.ReadDoubles(policy.Chosen, xw);
        TensorMemory.ReadDoubles(policy.Rejected, xl);
        if (reference is not null)
        {
            TensorMemory.ReadDoubles(reference.Chosen, rw);
            TensorMemory.ReadDoubles(reference.Rejected, rl);
        }
        else
        {
            rw.Clear();                                        // reference-free: l_ref = 0
            rl.Clear();
        }
        // sums of u_w, u_l, h, (h > 0), l_w, l_l and the inputs' largest value: four lanes at a time, then the tail, in a
        // fixed order (the same bits on every run)
        var (vu, vv, vh, vwins, vxw, vxl) = (Vector256<double>.Zero, Vector256<double>.Zero, Vector256<double>.Zero,
            Vector256<double>.Zero, Vector256<double>.Zero, Vector256<double>.Zero);
        var vtop = Vector256.Create(double.NegativeInfinity);
        bool finite = true;
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; i + 4 <= n; i += 4)
            {
                var (a, b, c, d) = (Vector256.Create(xw.Slice(i, 4)), Vector256.Create(xl.Slice(i, 4)), Vector256.Create(rw.Slice(i, 4)), Vector256.Create(rl.Slice(i, 4)));
                var (uw, ul) = (a - c, b - d);
                var m = uw - ul;
                m.CopyTo(h.Slice(i, 4));
                uw.CopyTo(rw.Slice(i, 4));                      // the log ratios over the reference's copy (read above)
                ul.CopyTo(rl.Slice(i, 4));
                (vu, vv, vh, vxw, vxl) = (vu + uw, vv + ul, vh + m, vxw + a, vxl + b);
                vwins += Vector256.GreaterThan(m, Vector256<double>.Zero) & Vector256<double>.One;
                vtop = Vector256.Max(vtop, Vector256.Max(Vector256.Max(a, b), Vector256.Max(c, d)));
                finite &= Vector256.EqualsAll(uw - uw, Vector256<double>.Zero) && Vector256.EqualsAll(ul - ul, Vector256<double>.Zero);
            }
        }
        double su = Vector256.Sum(vu), sv = Vector256.Sum(vv), sh = Vector256.Sum(vh), wins = Vector256.Sum(vwins), sxw = Vector256.Sum(vxw), sxl = Vector256.Sum(vxl);
        double largest = Math.Max(Math.Max(vtop[0], vtop[1]), Math.Max(vtop[2], vtop[3]));
        for (; i < n; i++)
        {
            double uw = xw[i] - rw[i], ul = xl[i] - rl[i];
            h[i] = uw - ul;
            su += uw;
            sv += ul;
            sh += h[i];
            if (h[i] > 0) wins++;
            sxw += xw[i];
            sxl += xl[i];
            largest = Math.Max(largest, Math.Max(Math.Max(xw[i], xl[i]), Math.Max(rw[i], rl[i])));
            finite &= double.IsFinite(uw) && double.IsFinite(ul);
            (rw[i], rl[i]) = (uw, ul);
        }
        if (checkFinite && (!finite || checkLogProbs && largest > 1e-3)) return null;
        // the link writes its values over the chosen inputs' copy (no longer needed); rw and rl now hold u_w and u_l
        var losses = xw;
        if (margin is not null) margin.Evaluate(h, losses, slope);
        else if (link is PairLink.ScoredLink { PerTokenMeans: true } perToken)
        {
            // the per-token means' counts: missing, or not finite and > 0, and the op-by-op path names the problem
            var (countsW, countsL) = (policy.ChosenTokenCounts, policy.RejectedTokenCounts);
            if (countsW is null || countsL is null) return null;
            Span<double> nw = buffer.AsSpan(7 * n, n), nl = buffer.AsSpan(8 * n, n);
            TensorMemory.ReadDoubles(countsW, nw);
            TensorMemory.ReadDoubles(countsL, nl);
            for (int j = 0; j < n; j++)
                if (!(nw[j] > 0 && nw[j] < double.PositiveInfinity && nl[j] > 0 && nl[j] < double.PositiveInfinity)) return null;
            perToken.Evaluate(rw, rl, nw, nl, losses, slope, other);
        }
        else link.Evaluate(rw, rl, losses, slope, other);
        // the mean loss, and every value within the compute dtype's range (what the op-by-op path computes in float32 must
        // fit float32 too: past its range that path reports the overflow)
        double limit = dtype == ScalarType.Float64 ? double.MaxValue : float.MaxValue;
        var (vsl, vbig, vnan) = (Vector256<double>.Zero, Vector256<double>.Zero, Vector256<double>.Zero);
        int k = 0;
        if (Vector256.IsHardwareAccelerated)
            for (; k + 4 <= n; k += 4)
            {
                var (l, g) = (Vector256.Create(losses.Slice(k, 4)), Vector256.Create(slope.Slice(k, 4)));
                vsl += l;
                vbig = Vector256.Max(vbig, Vector256.Max(Vector256.Abs(l), Vector256.Abs(g)));
                vnan |= ~Vector256.Equals(l, l) | ~Vector256.Equals(g, g);   // Max need not propagate NaN: flag it apart
                if (margin is null)
                {
                    var o = Vector256.Create(other.Slice(k, 4));
                    vbig = Vector256.Max(vbig, Vector256.Abs(o));
                    vnan |= ~Vector256.Equals(o, o);
                }
            }
        double sl = Vector256.Sum(vsl), biggest = Math.Max(Math.Max(vbig[0], vbig[1]), Math.Max(vbig[2], vbig[3]));
        bool nan = vnan != Vector256<double>.Zero;
        for (; k < n; k++)
        {
            sl += losses[k];
            biggest = Math.Max(biggest, Math.Max(Math.Abs(losses[k]), Math.Abs(slope[k])));
            if (margin is null) biggest = Math.Max(biggest, Math.Abs(other[k]));
        }
        finite &= !nan && biggest <= limit;                    // false for NaN too
        double scale = rewardScale / n;
        var metrics = new[] { su * scale, sv * scale, sh * scale, wins / n, sxw / n, sxl / n };
        foreach (var m in metrics) finite &= Math.Abs(m) <= limit;
        finite &= Math.Abs(sl / n) <= limit;
        if (checkFinite && !finite) return null;

        using var scope = NewDisposeScope();
        var perPair = TensorMemory.FromValues(losses, dtype);
        Tensor perExample;
        bool grad = policy.Chosen.requires_grad || policy.Rejected.requires_grad;
        if (grad)
        {
            var slopes = TensorMemory.FromValues(slope, dtype);
            Tensor In(Tensor x) => x.dtype == dtype ? x : x.to_type(dtype);          // no alias handle when the dtype matches
            if (margin is not null)
            {
                var d = In(policy.Chosen) - In(policy.Rejected);
                perExample = perPair.addcmul_(d - d.detach(), slopes, 1);              // in place: perPair is ours and constant
            }
            else
            {
                var (c, r) = (In(policy.Chosen), In(policy.Rejected));
                perExample = perPair.addcmul_(c - c.detach(), slopes, 1).addcmul_(r - r.detach(), TensorMemory.FromValues(other, dtype), 1);
            }
        }
        else perExample = perPair;
        var loss = perExample.mean();
        var metricValues = tensor(metrics, dtype: ScalarType.Float64);
        scope.MoveToOuter(loss, perExample, metricValues);
        return new PreferenceLossResult(loss, perExample, metricValues, PreferenceTerms.StandardMetricNames, name);
    }
}
