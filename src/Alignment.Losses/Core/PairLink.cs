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
    /// <see cref="ScoreMap.ExponentClamp"/>, with slope 0 past it).
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="map"/> is null.</exception>
    public PairLink OnScores(ScoreMap map)
    {
        ArgumentNullException.ThrowIfNull(map);
        if (map.Kind == ScoreMapKind.ReverseKl) return this;
        return new ScoredLink(this is ScoredLink s ? s.Inner : this, map);
    }

    /// <summary>A link from a function returning (value, df/ds_w, df/ds_l) at one pair of scores (one delegate call per pair).</summary>
    /// <exception cref="ArgumentNullException"><paramref name="link"/> is null.</exception>
    public static PairLink FromFunction(Func<double, double, (double Value, double Chosen, double Rejected)> link) =>
        new FunctionPairLink(link ?? throw new ArgumentNullException(nameof(link)));

    /// <summary>NCA: softplus(-r_w) + (softplus(r_w) + softplus(r_l)) / 2 with r = beta s.</summary>
    internal static PairLink Nca(double beta) => new NcaLink(beta);

    /// <summary>BCO paired: softplus(-r_w) + softplus(r_l) with r = beta s.</summary>
    internal static PairLink BcoPair(double beta) => new BcoPairLink(beta);

    /// <summary>APO-zero: sigmoid(-r_w) + sigmoid(r_l) with r = beta u.</summary>
    internal static PairLink ApoZero(double beta) => new ApoZeroLink(beta);

    /// <summary>APO-down: sigmoid(r_w) + sigmoid(-beta (u_w - u_l)) with r = beta u.</summary>
    internal static PairLink ApoDown(double beta) => new ApoDownLink(beta);

    /// <summary>The link and the score map it reads (see <see cref="OnScores"/>).</summary>
    internal sealed class ScoredLink(PairLink inner, ScoreMap map) : PairLink
    {
        internal PairLink Inner { get; } = inner;

        internal ScoreMap Map { get; } = map;

        public override void Evaluate(ReadOnlySpan<double> chosen, ReadOnlySpan<double> rejected, Span<double> losses,
            Span<double> chosenSlopes, Span<double> rejectedSlopes)
        {
            int n = chosen.Length;
            var buffer = System.Buffers.ArrayPool<double>.Shared.Rent(4 * n);
            try
            {
                Span<double> sw = buffer.AsSpan(0, n), sl = buffer.AsSpan(n, n), dw = buffer.AsSpan(2 * n, n), dl = buffer.AsSpan(3 * n, n);
                ApplyMap(Map, chosen, sw, dw);
                ApplyMap(Map, rejected, sl, dl);
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
        double clamp = ScoreMap.ExponentClamp;
        switch (map.Kind)
        {
            case ScoreMapKind.ForwardKl:                            // -exp(min(-u, c)), slope exp(-u) below the clamp
                for (int i = 0; i < u.Length; i++)
                {
                    double a = -u[i], e = Math.Exp(Math.Min(a, clamp));
                    scores[i] = -e;
                    slopes[i] = a <= clamp ? e : 0;
                }
                break;
            case ScoreMapKind.JensenShannon:                        // log sigmoid(u) = -softplus(-u), slope sigmoid(-u)
                for (int i = 0; i < u.Length; i++)
                {
                    scores[i] = -MarginLink.Softplus(-u[i]);
                    slopes[i] = MarginLink.Sigmoid(-u[i]);
                }
                break;
            case ScoreMapKind.AlphaDivergence:                      // exp(min((alpha - 1) u, c)) / (alpha - 1), slope exp((alpha - 1) u) below the clamp
                double k = map.Alpha - 1;
                for (int i = 0; i < u.Length; i++)
                {
                    double a = k * u[i], e = Math.Exp(Math.Min(a, clamp));
                    scores[i] = e / k;
                    slopes[i] = a <= clamp ? e : 0;
                }
                break;
            default:
                u.CopyTo(scores);
                slopes.Fill(1);
                break;
        }
    }

    private sealed class NcaLink(double beta) : PairLink
    {
        public override void Evaluate(ReadOnlySpan<double> chosen, ReadOnlySpan<double> rejected, Span<double> losses,
            Span<double> chosenSlopes, Span<double> rejectedSlopes)
        {
            for (int i = 0; i < chosen.Length; i++)
            {
                double rw = beta * chosen[i], rl = beta * rejected[i];
                losses[i] = MarginLink.Softplus(-rw) + (MarginLink.Softplus(rw) + MarginLink.Softplus(rl)) / 2;
                chosenSlopes[i] = beta * (MarginLink.Sigmoid(rw) / 2 - MarginLink.Sigmoid(-rw));
                rejectedSlopes[i] = beta * MarginLink.Sigmoid(rl) / 2;
            }
        }
    }

    private sealed class BcoPairLink(double beta) : PairLink
    {
        public override void Evaluate(ReadOnlySpan<double> chosen, ReadOnlySpan<double> rejected, Span<double> losses,
            Span<double> chosenSlopes, Span<double> rejectedSlopes)
        {
            for (int i = 0; i < chosen.Length; i++)
            {
                double rw = beta * chosen[i], rl = beta * rejected[i];
                losses[i] = MarginLink.Softplus(-rw) + MarginLink.Softplus(rl);
                chosenSlopes[i] = -beta * MarginLink.Sigmoid(-rw);
                rejectedSlopes[i] = beta * MarginLink.Sigmoid(rl);
            }
        }
    }

    /// <summary>sigmoid(x) (1 - sigmoid(x)) = e / (1 + e)^2 with e = exp(-|x|): no cancellation in either tail.</summary>
    private static double SigmoidSlope(double x)
    {
        double e = Math.Exp(-Math.Abs(x)), u = 1 + e;
        return e / (u * u);
    }

    private sealed class ApoZeroLink(double beta) : PairLink
    {
        public override void Evaluate(ReadOnlySpan<double> chosen, ReadOnlySpan<double> rejected, Span<double> losses,
            Span<double> chosenSlopes, Span<double> rejectedSlopes)
        {
            for (int i = 0; i < chosen.Length; i++)
            {
                double rw = beta * chosen[i], rl = beta * rejected[i];
                losses[i] = MarginLink.Sigmoid(-rw) + MarginLink.Sigmoid(rl);
                chosenSlopes[i] = -beta * SigmoidSlope(rw);
                rejectedSlopes[i] = beta * SigmoidSlope(rl);
            }
        }
    }

    private sealed class ApoDownLink(double beta) : PairLink
    {
        public override void Evaluate(ReadOnlySpan<double> chosen, ReadOnlySpan<double> rejected, Span<double> losses,
            Span<double> chosenSlopes, Span<double> rejectedSlopes)
        {
            for (int i = 0; i < chosen.Length; i++)
            {
                double rw = beta * chosen[i], z = beta * (chosen[i] - rejected[i]);
                double m = beta * SigmoidSlope(z);
                losses[i] = MarginLink.Sigmoid(rw) + MarginLink.Sigmoid(-z);
                chosenSlopes[i] = beta * SigmoidSlope(rw) - m;
                rejectedSlopes[i] = m;
            }
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
