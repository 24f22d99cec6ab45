using System.Runtime.Intrinsics;
using Alignment.Losses.Internal;

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
    internal static MarginLink Logistic(double beta, double linear = 0) => new LaneLink<LogisticKernel>(new LogisticKernel(beta, linear));

    /// <summary>Hinge: relu(1 - beta h), slope -beta where 1 - beta h &gt; 0 (0 at the kink, as libtorch's relu).</summary>
    internal static MarginLink Hinge(double beta) => new HingeLink(beta);

    /// <summary>IPO on sums: (h - target)^2, slope 2 (h - target).</summary>
    internal static MarginLink Square(double target) => new SquareLink(target);

    /// <summary>
    /// EXO: with z = beta h, q = sigmoid(z), c = z + ln eps - ln(1 - eps): L = -softplus(-z) - sigmoid(-z) c - ln(1 - eps)
    /// for z &gt;= 0 and -softplus(z) + sigmoid(z) c - ln eps below; dL/dz = q (1 - q) c.
    /// </summary>
    internal static MarginLink Exo(double beta, double eps) => new LaneLink<ExoKernel>(new ExoKernel(beta, Math.Log(1 - eps), Math.Log(eps)));

    /// <summary>
    /// DiscoPOP: with z = beta h, t = z / tau, m = sigmoid(t), E = m e^-z = exp(-softplus(-t) - z):
    /// L = (1 - m) softplus(-z) + E; dL/dz = -(m (1 - m) / tau) softplus(-z) - (1 - m) sigmoid(-z) + ((1 - m) / tau - 1) E.
    /// </summary>
    internal static MarginLink DiscoPop(double beta, double tau) => new LaneLink<DiscoPopKernel>(new DiscoPopKernel(beta, tau));

    /// <summary>A margin link whose formula is a lane kernel (the built-in smooth links); the kernel writes its slope to both outputs.</summary>
    private sealed class LaneLink<TK>(TK kernel) : MarginLink where TK : struct, PairLink.ILanes
    {
        public override void Evaluate(ReadOnlySpan<double> margins, Span<double> losses, Span<double> slopes) =>
            PairLink.Lanes.Run(kernel, margins, margins, losses, slopes, slopes);
    }

    /// <summary>With c = z + ln eps - ln(1 - eps): z &gt;= 0: -softplus(-z) - sigmoid(-z) c - ln(1 - eps), below -softplus(z) + sigmoid(z) c - ln eps; slope beta q (1 - q) c.</summary>
    private readonly struct ExoKernel(double beta, double a, double b) : PairLink.ILanes
    {
        public (Vector256<double>, Vector256<double>, Vector256<double>) At(Vector256<double> h, Vector256<double> _)
        {
            var z = Vector256.Create(beta) * h;
            var c = z + Vector256.Create(b - a);
            var g = Lane.Logistic(z);
            var positive = -g.SoftplusOfNegative - g.SigmoidOfNegative * c - Vector256.Create(a);
            var negative = -g.Softplus + g.Sigmoid * c - Vector256.Create(b);
            var slope = Vector256.Create(beta) * g.SigmoidSlope * c;
            return (Vector256.ConditionalSelect(Vector256.GreaterThanOrEqual(z, Vector256<double>.Zero), positive, negative), slope, slope);
        }
    }

    /// <summary>With z = beta h, t = z / tau, m = sigmoid(t), E = exp(-softplus(-t) - z): (1 - m) softplus(-z) + E and its slope.</summary>
    private readonly struct DiscoPopKernel(double beta, double tau) : PairLink.ILanes
    {
        public (Vector256<double>, Vector256<double>, Vector256<double>) At(Vector256<double> h, Vector256<double> _)
        {
            var z = Vector256.Create(beta) * h;
            var (gz, gt) = (Lane.Logistic(z), Lane.Logistic(z / Vector256.Create(tau)));
            var (m, rest, spz) = (gt.Sigmoid, gt.SigmoidOfNegative, gz.SoftplusOfNegative);
            var exponential = Lane.ExpDouble(-gt.SoftplusOfNegative - z);
            var inverseTau = Vector256.Create(1 / tau);
            var slope = Vector256.Create(beta) * (-(m * rest * inverseTau) * spz - rest * gz.SigmoidOfNegative + (rest * inverseTau - Vector256<double>.One) * exponential);
            return (rest * spz + exponential, slope, slope);
        }
    }

    /// <summary>softplus(-z) + c z with z = beta h; slope beta (c - sigmoid(-z)).</summary>
    private readonly struct LogisticKernel(double beta, double linear) : PairLink.ILanes
    {
        public (Vector256<double>, Vector256<double>, Vector256<double>) At(Vector256<double> h, Vector256<double> _)
        {
            var (b, c) = (Vector256.Create(beta), Vector256.Create(linear));
            var z = b * h;
            var g = Lane.Logistic(z);
            var slope = b * (c - g.SigmoidOfNegative);
            return (g.SoftplusOfNegative + c * z, slope, slope);
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
