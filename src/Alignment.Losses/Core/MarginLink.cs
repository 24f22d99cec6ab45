using System.Runtime.Intrinsics;

namespace Alignment.Losses;

/// <summary>
/// A pairwise loss written as a link of the pair's margin: L_i = link(h_i), h = u_w - u_l = (l_pol(y_w) - l_ref(y_w)) -
/// (l_pol(y_l) - l_ref(y_l)) (or h = phi(u_w) - phi(u_l) through <see cref="PairLink.OnScores"/>): the
/// <see cref="PairLink"/> whose partial derivatives are +link'(h) and -link'(h). Most of the DPO family is one (DPO, cDPO, robust DPO, hinge, IPO on sums, EXO, DiscoPOP), and a loss that
/// says so (<see cref="PreferenceLoss{TOptions}.Link"/>) is computed on the CPU in one managed pass: the link's value and
/// slope, the standard metrics and the finite checks over contiguous memory, returned through a surrogate whose gradient
/// is the saved one (see <see cref="PreferenceLossOptions.FusedCpu"/>). Everywhere else (CUDA, example weights, a loss
/// without a link) the loss runs op by op, with the same result.
/// </summary>
/// <remarks>
/// Evaluate in float64 and stably (softplus as max(x, 0) + log1p(e^-|x|), never log(sigmoid)). The slope is dL/dh; the
/// pass turns it into the gradients of l_pol(y_w) (+slope) and l_pol(y_l) (-slope).
/// </remarks>
public abstract class MarginLink : PairLink
{
    /// <summary>The pair form: h = s_w - s_l, then <see cref="Evaluate(ReadOnlySpan{double}, Span{double}, Span{double})"/>; slopes +link'(h) and -link'(h).</summary>
    public sealed override void Evaluate(ReadOnlySpan<double> chosen, ReadOnlySpan<double> rejected, Span<double> losses,
        Span<double> chosenSlopes, Span<double> rejectedSlopes)
    {
        int n = chosen.Length;
        var margins = System.Buffers.ArrayPool<double>.Shared.Rent(n);
        try
        {
            for (int i = 0; i < n; i++) margins[i] = chosen[i] - rejected[i];
            Evaluate(margins.AsSpan(0, n), losses, chosenSlopes);
            for (int i = 0; i < n; i++) rejectedSlopes[i] = -chosenSlopes[i];
        }
        finally
        {
            System.Buffers.ArrayPool<double>.Shared.Return(margins);
        }
    }

    /// <summary>For every margin h_i, the per-pair loss link(h_i) and its derivative d link / dh at h_i.</summary>
    /// <param name="margins">h [B], float64.</param>
    /// <param name="losses">Written: link(h_i).</param>
    /// <param name="slopes">Written: link'(h_i).</param>
    public abstract void Evaluate(ReadOnlySpan<double> margins, Span<double> losses, Span<double> slopes);

    /// <summary>A link from a function returning (value, slope) at one margin (one delegate call per pair).</summary>
    public static MarginLink FromFunction(Func<double, (double Value, double Slope)> link) =>
        new FunctionLink(link ?? throw new ArgumentNullException(nameof(link)));

    /// <summary>softplus(x) = log(1 + e^x) in float64, without overflow or cancellation (log1p of e^-|x| for the tail).</summary>
    public static double Softplus(double x)
    {
        double e = Math.Exp(-Math.Abs(x));
        return Math.Max(x, 0) + Log1pOf(e, 1 + e);
    }

    /// <summary>sigmoid(x) = 1 / (1 + e^-x) in float64, without overflow.</summary>
    public static double Sigmoid(double x)
    {
        if (x >= 0) return 1 / (1 + Math.Exp(-x));
        double e = Math.Exp(x);
        return e / (1 + e);
    }

    /// <summary>
    /// The smoothed logistic link of DPO, cDPO and robust DPO: softplus(-z) + c z with z = beta h, slope
    /// beta (c - sigmoid(-z)). c = 0: DPO; c = eps: cDPO; c = -eps / (1 - 2 eps): robust DPO.
    /// </summary>
    internal static MarginLink Logistic(double beta, double linear = 0) => new LogisticLink(beta, linear);

    /// <summary>Hinge: relu(1 - beta h), slope -beta where 1 - beta h &gt; 0 (0 at the kink, as libtorch's relu).</summary>
    internal static MarginLink Hinge(double beta) => new HingeLink(beta);

    /// <summary>IPO on sums: (h - target)^2, slope 2 (h - target).</summary>
    internal static MarginLink Square(double target) => new SquareLink(target);

    /// <summary>
    /// EXO: with z = beta h, q = sigmoid(z), c = z + ln eps - ln(1 - eps): L = -softplus(-z) - sigmoid(-z) c - ln(1 - eps)
    /// for z &gt;= 0 and -softplus(z) + sigmoid(z) c - ln eps below; dL/dz = q (1 - q) c.
    /// </summary>
    internal static MarginLink Exo(double beta, double eps) => new ExoLink(beta, eps);

    /// <summary>
    /// DiscoPOP: with z = beta h, t = z / tau, m = sigmoid(t), E = m e^-z = exp(-softplus(-t) - z):
    /// L = (1 - m) softplus(-z) + E; dL/dz = -(m (1 - m) / tau) softplus(-z) - (1 - m) sigmoid(-z) + ((1 - m) / tau - 1) E.
    /// </summary>
    internal static MarginLink DiscoPop(double beta, double tau) => new DiscoPopLink(beta, tau);

    private sealed class ExoLink(double beta, double eps) : MarginLink
    {
        public override void Evaluate(ReadOnlySpan<double> margins, Span<double> losses, Span<double> slopes)
        {
            double a = Math.Log(1 - eps), b = Math.Log(eps);
            for (int i = 0; i < margins.Length; i++)
            {
                double z = beta * margins[i], c = z + (b - a);
                double e = Math.Exp(-Math.Abs(z)), u = 1 + e;
                losses[i] = z >= 0 ? -Softplus(-z) - Sigmoid(-z) * c - a : -Softplus(z) + Sigmoid(z) * c - b;
                slopes[i] = beta * (e / (u * u)) * c;                           // q (1 - q) = e / (1 + e)^2, e = exp(-|z|)
            }
        }
    }

    private sealed class DiscoPopLink(double beta, double tau) : MarginLink
    {
        public override void Evaluate(ReadOnlySpan<double> margins, Span<double> losses, Span<double> slopes)
        {
            for (int i = 0; i < margins.Length; i++)
            {
                double z = beta * margins[i], t = z / tau;
                double m = Sigmoid(t), rest = Sigmoid(-t), spz = Softplus(-z);
                double exponential = Math.Exp(-Softplus(-t) - z);
                losses[i] = rest * spz + exponential;
                slopes[i] = beta * (-(m * rest / tau) * spz - rest * Sigmoid(-z) + (rest / tau - 1) * exponential);
            }
        }
    }

    private sealed class LogisticLink(double beta, double linear) : MarginLink
    {
        // with e = exp(-|z|), shared: softplus(-z) = max(-z, 0) + log1p(e), sigmoid(-z) = e / (1 + e) for z >= 0, 1 / (1 + e) below
        public override void Evaluate(ReadOnlySpan<double> margins, Span<double> losses, Span<double> slopes)
        {
            int i = 0;
#if NET9_0_OR_GREATER
            if (Vector256.IsHardwareAccelerated)
            {
                var (vb, vc, one, zero) = (Vector256.Create(beta), Vector256.Create(linear), Vector256<double>.One, Vector256<double>.Zero);
                for (; i + 4 <= margins.Length; i += 4)
                {
                    var z = vb * Vector256.Create(margins.Slice(i, 4));
                    var e = Vector256.Exp(-Vector256.Abs(z));
                    var u = one + e;
                    // log1p(e) = log(u) e / (u - 1), exact where u rounds to 1 (Goldberg's correction)
                    var log1p = Vector256.ConditionalSelect(Vector256.Equals(u, one), e, Vector256.Log(u) * e / (u - one));
                    (Vector256.Max(-z, zero) + log1p + vc * z).CopyTo(losses.Slice(i, 4));
                    var sigmoid = Vector256.ConditionalSelect(Vector256.GreaterThanOrEqual(z, zero), e, one) / u;
                    (vb * (vc - sigmoid)).CopyTo(slopes.Slice(i, 4));
                }
            }
#endif
            for (; i < margins.Length; i++)
            {
                double z = beta * margins[i];
                double e = Math.Exp(-Math.Abs(z)), u = 1 + e;
                losses[i] = Math.Max(-z, 0) + Log1pOf(e, u) + linear * z;
                slopes[i] = beta * (linear - (z >= 0 ? e : 1) / u);
            }
        }
    }

    /// <summary>log1p(e) given u = 1 + e (Goldberg's correction: exact where u rounds to 1).</summary>
    private static double Log1pOf(double e, double u) => u == 1 ? e : Math.Log(u) * e / (u - 1);

    private sealed class HingeLink(double beta) : MarginLink
    {
        public override void Evaluate(ReadOnlySpan<double> margins, Span<double> losses, Span<double> slopes)
        {
            for (int i = 0; i < margins.Length; i++)
            {
                double a = 1 - beta * margins[i];
                losses[i] = a > 0 ? a : 0;
                slopes[i] = a > 0 ? -beta : 0;
            }
        }
    }

    private sealed class SquareLink(double target) : MarginLink
    {
        public override void Evaluate(ReadOnlySpan<double> margins, Span<double> losses, Span<double> slopes)
        {
            for (int i = 0; i < margins.Length; i++)
            {
                double d = margins[i] - target;
                losses[i] = d * d;
                slopes[i] = 2 * d;
            }
        }
    }

    private sealed class FunctionLink(Func<double, (double Value, double Slope)> f) : MarginLink
    {
        public override void Evaluate(ReadOnlySpan<double> margins, Span<double> losses, Span<double> slopes)
        {
            for (int i = 0; i < margins.Length; i++) (losses[i], slopes[i]) = f(margins[i]);
        }
    }
}
