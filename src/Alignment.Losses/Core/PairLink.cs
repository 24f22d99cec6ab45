using System.Runtime.Intrinsics;
using Alignment.Losses.Internal;

namespace Alignment.Losses;

/// <summary>
/// A paired loss written as a function of the pair's two scores: L_i = f(s_w, s_l), with s = u = l_pol - l_ref (the log
/// ratios; reference-free, u = l_pol) or, through <see cref="OnScores"/>, s = phi(u) for a <see cref="ScoreMap"/>. A loss
/// that says so (<see cref="PreferenceLoss{TOptions}.Link"/>) is computed on the CPU in one managed pass, as a
/// <see cref="MarginLink"/> is: the values and both partial derivatives, the standard metrics and the finite checks, returned
/// through a surrogate whose gradient is the saved one (<see cref="PreferenceLossOptions.FusedCpu"/>). NCA, BCO (paired) and
/// APO are pair links; a link of the margin s_w - s_l is a <see cref="MarginLink"/>.
/// </summary>
/// <remarks>
/// Evaluate in float64 and stably (softplus as max(x, 0) + log1p(e^-|x|), never log(sigmoid)). The pass multiplies the
/// partial derivatives by the score map's slope phi'(u) and turns them into the gradients of l_pol(y_w) and l_pol(y_l).
/// </remarks>
public abstract class PairLink
{
    /// <summary>For every pair i, the per-pair loss f(s_w, s_l) and its partial derivatives with respect to s_w and s_l.</summary>
    /// <param name="chosen">s_w [B], float64.</param>
    /// <param name="rejected">s_l [B], float64.</param>
    /// <param name="losses">Written: f(s_w,i, s_l,i).</param>
    /// <param name="chosenSlopes">Written: df / ds_w.</param>
    /// <param name="rejectedSlopes">Written: df / ds_l.</param>
    public abstract void Evaluate(ReadOnlySpan<double> chosen, ReadOnlySpan<double> rejected, Span<double> losses,
        Span<double> chosenSlopes, Span<double> rejectedSlopes);

    /// <summary>
    /// The same link of the scores phi(u) of <paramref name="map"/> instead of the log ratios u (this link itself for
    /// <see cref="ScoreMap.ReverseKl"/>, whose phi is the identity): what a loss with a <c>ScoreMap</c> option returns.
    /// The pass computes phi and phi' as <see cref="ScoreMap.Apply"/> does, in float64 (the exponent clamped at
    /// <see cref="ScoreMap.ExponentClamp"/>, with slope 0 past it). With <paramref name="perTokenMeans"/>, of the scores'
    /// per-token means phi(u) / n instead, n being the batch's completion-token counts
    /// (<see cref="PreferenceLogps.ChosenTokenCounts"/>, <see cref="PreferenceLogps.RejectedTokenCounts"/>), as TRL maps
    /// the scores and then averages them (a batch without counts runs op by op, whose error names what is missing).
    /// A second call replaces the first one's map and averaging.
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="map"/> is null.</exception>
    public PairLink OnScores(ScoreMap map, bool perTokenMeans = false)
    {
        ArgumentNullException.ThrowIfNull(map);
        var inner = this is ScoredLink s ? s.Inner : this;
        return map.Kind == ScoreMapKind.ReverseKl && !perTokenMeans ? inner : new ScoredLink(inner, map, perTokenMeans);
    }

    /// <summary>A link from a function returning (value, df/ds_w, df/ds_l) at one pair of scores (one delegate call per pair).</summary>
    /// <exception cref="ArgumentNullException"><paramref name="link"/> is null.</exception>
    public static PairLink FromFunction(Func<double, double, (double Value, double Chosen, double Rejected)> link) =>
        new FunctionPairLink(link ?? throw new ArgumentNullException(nameof(link)));

    /// <summary>NCA: softplus(-r_w) + (softplus(r_w) + softplus(r_l)) / 2 with r = beta s.</summary>
    internal static PairLink Nca(double beta) => new LaneLink<NcaKernel>(new NcaKernel(beta));

    /// <summary>BCO paired: softplus(-r_w) + softplus(r_l) with r = beta s.</summary>
    internal static PairLink BcoPair(double beta) => new LaneLink<BcoPairKernel>(new BcoPairKernel(beta));

    /// <summary>APO-zero: sigmoid(-r_w) + sigmoid(r_l) with r = beta u.</summary>
    internal static PairLink ApoZero(double beta) => new LaneLink<ApoZeroKernel>(new ApoZeroKernel(beta));

    /// <summary>APO-down: sigmoid(r_w) + sigmoid(-beta (u_w - u_l)) with r = beta u.</summary>
    internal static PairLink ApoDown(double beta) => new LaneLink<ApoDownKernel>(new ApoDownKernel(beta));

    /// <summary>The link, the score map it reads and whether of per-token means (see <see cref="OnScores"/>).</summary>
    internal sealed class ScoredLink(PairLink inner, ScoreMap map, bool perTokenMeans) : PairLink
    {
        internal PairLink Inner { get; } = inner;

        internal ScoreMap Map { get; } = map;

        internal bool PerTokenMeans { get; } = perTokenMeans;

        /// <inheritdoc />
        /// <exception cref="InvalidOperationException">The link reads per-token means, whose token counts these spans lack.</exception>
        public override void Evaluate(ReadOnlySpan<double> chosen, ReadOnlySpan<double> rejected, Span<double> losses,
            Span<double> chosenSlopes, Span<double> rejectedSlopes)
        {
            if (PerTokenMeans)
                throw new InvalidOperationException("This link reads the per-token means of the scores, so it needs the batch's token counts: the loss's fused pass evaluates it. Evaluate the inner link on phi(u) / n yourself.");
            Evaluate(chosen, rejected, default, default, losses, chosenSlopes, rejectedSlopes);
        }

        /// <summary>With the token counts of both sides when <see cref="PerTokenMeans"/> (finite and &gt; 0: the pass has checked).</summary>
        internal void Evaluate(ReadOnlySpan<double> chosen, ReadOnlySpan<double> rejected, ReadOnlySpan<double> chosenCounts, ReadOnlySpan<double> rejectedCounts,
            Span<double> losses, Span<double> chosenSlopes, Span<double> rejectedSlopes)
        {
            int n = chosen.Length;
            var buffer = System.Buffers.ArrayPool<double>.Shared.Rent(4 * n);
            try
            {
                Span<double> sw = buffer.AsSpan(0, n), sl = buffer.AsSpan(n, n), dw = buffer.AsSpan(2 * n, n), dl = buffer.AsSpan(3 * n, n);
                ApplyMap(Map, chosen, sw, dw);
                ApplyMap(Map, rejected, sl, dl);
                if (PerTokenMeans)
                    for (int i = 0; i < n; i++)
                    {
                        (sw[i], dw[i]) = (sw[i] / chosenCounts[i], dw[i] / chosenCounts[i]);
                        (sl[i], dl[i]) = (sl[i] / rejectedCounts[i], dl[i] / rejectedCounts[i]);
                    }
                Inner.Evaluate(sw, sl, losses, chosenSlopes, rejectedSlopes);
                for (int i = 0; i < n; i++)
                {
                    chosenSlopes[i] *= dw[i];
                    rejectedSlopes[i] *= dl[i];
                }
            }
            finally
            {
                System.Buffers.ArrayPool<double>.Shared.Return(buffer);
            }
        }
    }

    /// <summary>phi(u) and phi'(u) of a score map, in float64, as <see cref="ScoreMap.Apply"/> computes phi.</summary>
    internal static void ApplyMap(ScoreMap map, ReadOnlySpan<double> u, Span<double> scores, Span<double> slopes)
    {
        switch (map.Kind)
        {
            case ScoreMapKind.ForwardKl: Lanes.Run(new ExponentialMap(-1, -1), u, u, scores, slopes, slopes); break;
            case ScoreMapKind.AlphaDivergence: Lanes.Run(new ExponentialMap(map.Alpha - 1, 1 / (map.Alpha - 1)), u, u, scores, slopes, slopes); break;
            case ScoreMapKind.JensenShannon: Lanes.Run(new JensenShannonMap(), u, u, scores, slopes, slopes); break;
            default:
                u.CopyTo(scores);
                slopes.Fill(1);
                break;
        }
    }

    /// <summary>
    /// A per-pair function of four float64 lanes: (value, df/ds_w, df/ds_l) at (s_w, s_l). The score maps use it with one
    /// argument (both the same) and write their slope twice.
    /// </summary>
    internal interface ILanes
    {
        (Vector256<double> Value, Vector256<double> Chosen, Vector256<double> Rejected) At(Vector256<double> w, Vector256<double> l);
    }

    internal static class Lanes
    {
        /// <summary>
        /// <paramref name="kernel"/> over every pair, four at a time; the last 1-3 pairs padded with zeros (so there is one
        /// formula, not a vector and a scalar twin). The outputs may alias each other's spans only when the kernel writes
        /// the same value to both (the score maps' slopes).
        /// </summary>
        public static void Run<TK>(TK kernel, ReadOnlySpan<double> chosen, ReadOnlySpan<double> rejected, Span<double> losses,
            Span<double> chosenSlopes, Span<double> rejectedSlopes) where TK : struct, ILanes
        {
            int n = chosen.Length, i = 0;
            for (; i + 4 <= n; i += 4)
            {
                var (v, gw, gl) = kernel.At(Vector256.Create(chosen.Slice(i, 4)), Vector256.Create(rejected.Slice(i, 4)));
                v.CopyTo(losses.Slice(i, 4));
                gl.CopyTo(rejectedSlopes.Slice(i, 4));
                gw.CopyTo(chosenSlopes.Slice(i, 4));
            }
            if (i == n) return;
            Span<double> w = stackalloc double[4], l = stackalloc double[4], a = stackalloc double[4], b = stackalloc double[4], c = stackalloc double[4];
            w.Clear();
            l.Clear();
            chosen.Slice(i).CopyTo(w);
            rejected.Slice(i).CopyTo(l);
            var (tv, tw, tl) = kernel.At(Vector256.Create<double>(w), Vector256.Create<double>(l));
            tv.CopyTo(a);
            tw.CopyTo(b);
            tl.CopyTo(c);
            a.Slice(0, n - i).CopyTo(losses.Slice(i));
            c.Slice(0, n - i).CopyTo(rejectedSlopes.Slice(i));
            b.Slice(0, n - i).CopyTo(chosenSlopes.Slice(i));
        }
    }

    /// <summary>phi(u) = scale exp(min(k u, c)), slope exp(k u) below the clamp: forward KL (k = -1, scale -1) and alpha (k = alpha - 1, scale 1 / k).</summary>
    private readonly struct ExponentialMap(double k, double scale) : ILanes
    {
        public (Vector256<double>, Vector256<double>, Vector256<double>) At(Vector256<double> u, Vector256<double> _)
        {
            var clamp = Vector256.Create(ScoreMap.ExponentClamp);
            var a = Vector256.Create(k) * u;
            var e = Lane.ExpDouble(Vector256.Min(a, clamp));
            var slope = Vector256.ConditionalSelect(Vector256.LessThanOrEqual(a, clamp), e, Vector256<double>.Zero);
            return (Vector256.Create(scale) * e, slope, slope);
        }
    }

    /// <summary>phi(u) = log sigmoid(u) = -softplus(-u), slope sigmoid(-u).</summary>
    private readonly struct JensenShannonMap : ILanes
    {
        public (Vector256<double>, Vector256<double>, Vector256<double>) At(Vector256<double> u, Vector256<double> _)
        {
            var g = Lane.Logistic(u);
            var slope = g.SigmoidOfNegative;
            return (-g.SoftplusOfNegative, slope, slope);
        }
    }

    /// <summary>A pair link whose formula is a lane kernel (the built-in links).</summary>
    private sealed class LaneLink<TK>(TK kernel) : PairLink where TK : struct, ILanes
    {
        public override void Evaluate(ReadOnlySpan<double> chosen, ReadOnlySpan<double> rejected, Span<double> losses,
            Span<double> chosenSlopes, Span<double> rejectedSlopes) =>
            Lanes.Run(kernel, chosen, rejected, losses, chosenSlopes, rejectedSlopes);
    }

    private readonly struct NcaKernel(double beta) : ILanes
    {
        public (Vector256<double>, Vector256<double>, Vector256<double>) At(Vector256<double> w, Vector256<double> l)
        {
            var b = Vector256.Create(beta);
            var (gw, gl) = (Lane.Logistic(b * w), Lane.Logistic(b * l));
            var half = Vector256.Create(0.5);
            return (gw.SoftplusOfNegative + half * (gw.Softplus + gl.Softplus), b * (half * gw.Sigmoid - gw.SigmoidOfNegative), b * half * gl.Sigmoid);
        }
    }

    private readonly struct BcoPairKernel(double beta) : ILanes
    {
        public (Vector256<double>, Vector256<double>, Vector256<double>) At(Vector256<double> w, Vector256<double> l)
        {
            var b = Vector256.Create(beta);
            var (gw, gl) = (Lane.Logistic(b * w), Lane.Logistic(b * l));
            return (gw.SoftplusOfNegative + gl.Softplus, -b * gw.SigmoidOfNegative, b * gl.Sigmoid);
        }
    }

    private readonly struct ApoZeroKernel(double beta) : ILanes
    {
        public (Vector256<double>, Vector256<double>, Vector256<double>) At(Vector256<double> w, Vector256<double> l)
        {
            var b = Vector256.Create(beta);
            var (gw, gl) = (Lane.Logistic(b * w, withLog: false), Lane.Logistic(b * l, withLog: false));
            return (gw.SigmoidOfNegative + gl.Sigmoid, -b * gw.SigmoidSlope, b * gl.SigmoidSlope);
        }
    }

    private readonly struct ApoDownKernel(double beta) : ILanes
    {
        public (Vector256<double>, Vector256<double>, Vector256<double>) At(Vector256<double> w, Vector256<double> l)
        {
            var b = Vector256.Create(beta);
            var (gw, gz) = (Lane.Logistic(b * w, withLog: false), Lane.Logistic(b * (w - l), withLog: false));
            var m = b * gz.SigmoidSlope;
            return (gw.Sigmoid + gz.SigmoidOfNegative, b * gw.SigmoidSlope - m, m);
        }
    }

    private sealed class FunctionPairLink(Func<double, double, (double Value, double Chosen, double Rejected)> f) : PairLink
    {
        public override void Evaluate(ReadOnlySpan<double> chosen, ReadOnlySpan<double> rejected, Span<double> losses,
            Span<double> chosenSlopes, Span<double> rejectedSlopes)
        {
            for (int i = 0; i < chosen.Length; i++) (losses[i], chosenSlopes[i], rejectedSlopes[i]) = f(chosen[i], rejected[i]);
        }
    }
}
