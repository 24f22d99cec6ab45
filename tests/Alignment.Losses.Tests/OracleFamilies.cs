using MathNet.Numerics;

namespace Alignment.Losses.Tests;

/// <summary>
/// The float64 oracle, continued: the reference-free (CPO, SimPO, AlphaPO, ORPO), unpaired (KTO, apo_zero_unpaired, BCO)
/// and reward-model (Bradley-Terry) objectives, written from the papers' formulas (spec §9-§11) with analytic gradients.
/// Shares no code with the library (ObjectiveFamiliesTests checks the same losses against central differences).
/// </summary>
public static partial class Oracle
{
    /// <summary>
    /// e^x - 1 without cancellation (Kahan's form (u - 1) x / ln u with u = e^x, a few ulps). MathNet's Expm1 sums a
    /// series to only about 1e-8 relative for |x| &lt; 0.1, too coarse for a 1e-10 oracle.
    /// </summary>
    public static double Expm1(double x)
    {
        double u = Math.Exp(x);
        if (u == 1.0) return x;
        double um1 = u - 1.0;
        return um1 == -1.0 ? -1.0 : um1 * x / Math.Log(u);
    }

    /// <summary>(1 - eps) softplus(-z) + eps softplus(z) and its derivative in z.</summary>
    static (double F, double dF) Smoothed(double z, double eps) =>
        ((1 - eps) * Softplus(-z) + eps * Softplus(z), -(1 - eps) * Sigmoid(-z) + eps * Sigmoid(z));

    /// <summary>
    /// CPO (TRL CPOTrainer, every loss_type): x = l (sigmoid, hinge) or a = l / n (ipo, simpo) per side, the AlphaPO reward
    /// R(x) = (1 - e^(-shape x)) / shape (R(x) = x at shape 0), z = R(x_w) - R(x_l) (minus gamma / beta for simpo);
    /// pref = smoothed logistic of beta z (sigmoid, simpo), relu(1 - beta z) (hinge), (z - 1/(2 beta))^2 (ipo); plus
    /// cpo_alpha times the chosen tokens' mean NLL, -sum l_w / sum n_w. R'(x) = e^(-shape x).
    /// </summary>
    public static Result Cpo(double[] pc, double[] pr, double[] nw, double[] nl, string type, double beta, double eps, double cpoAlpha,
        double shape = 0, double gamma = 0)
    {
        int b = pc.Length;
        bool perToken = type is "ipo" or "simpo";
        double R(double x) => shape == 0 ? x : -Expm1(-shape * x) / shape;
        double dR(double x) => shape == 0 ? 1 : Math.Exp(-shape * x);
        double tokens = nw.Sum(), sum = 0;
        var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            double xw = perToken ? pc[i] / nw[i] : pc[i], xl = perToken ? pr[i] / nl[i] : pr[i];
            double z = R(xw) - R(xl) - (type == "simpo" ? gamma / beta : 0);
            double f, df;                                            // df = dpref / dz
            if (type == "hinge") (f, df) = (Math.Max(0, 1 - beta * z), 1 - beta * z > 0 ? -beta : 0);
            else if (type == "ipo") (f, df) = (Math.Pow(z - 1 / (2 * beta), 2), 2 * (z - 1 / (2 * beta)));
            else
            {
                (f, df) = Smoothed(beta * z, eps);
                df *= beta;
            }
            sum += f;
            gc[i] = df * dR(xw) / b / (perToken ? nw[i] : 1) - cpoAlpha / tokens;
            gr[i] = -df * dR(xl) / b / (perToken ? nl[i] : 1);
        }
        return new Result(sum / b + cpoAlpha * -pc.Sum() / tokens, gc, gr);
    }

    /// <summary>
    /// SimPO (alpha = 0) and AlphaPO: z = beta (R(a_w) - R(a_l)) - gamma with a = l / n and R(a) = (1 - e^(-alpha a)) / alpha
    /// (R(a) = a at alpha = 0), label-smoothed logistic loss. R'(a) = e^(-alpha a).
    /// </summary>
    public static Result SimPo(double[] pc, double[] pr, double[] nw, double[] nl, double beta, double gamma, double eps, double alpha)
    {
        int b = pc.Length;
        double R(double a) => alpha == 0 ? a : -Expm1(-alpha * a) / alpha;
        double dR(double a) => Math.Exp(-alpha * a);
        double sum = 0;
        var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            double aw = pc[i] / nw[i], al = pr[i] / nl[i];
            var (f, df) = Smoothed(beta * (R(aw) - R(al)) - gamma, eps);
            sum += f;
            gc[i] = df * beta * dR(aw) / nw[i] / b;
            gr[i] = -df * beta * dR(al) / nl[i] / b;
        }
        return new Result(sum / b, gc, gr);
    }

    /// <summary>log(1 - e^a) for a &lt; 0, accurate near 0 and far from it.</summary>
    static double Log1mExp(double a) => a > -Math.Log(2) ? Math.Log(-Expm1(a)) : SpecialFunctions.Log1p(-Math.Exp(a));

    /// <summary>
    /// ORPO (TRL ORPOTrainer): NLL - beta mean logsigmoid(log odds ratio), log odds(a) = a - log(1 - e^a) of the per-token
    /// means; d log odds / da = 1 / (1 - e^a). The NLL is the chosen sequences' token-weighted mean, over prompt and
    /// completion when the prompt's summed log-probs <paramref name="pp"/> and token counts <paramref name="np"/> are given
    /// (TRL's default), over the completions alone otherwise.
    /// </summary>
    public static Result Orpo(double[] pc, double[] pr, double[] nw, double[] nl, double beta, double[]? pp = null, double[]? np = null)
    {
        int b = pc.Length;
        double tokens = nw.Sum() + (np?.Sum() ?? 0), ratio = 0;
        var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            double aw = pc[i] / nw[i], al = pr[i] / nl[i];
            double z = (aw - Log1mExp(aw)) - (al - Log1mExp(al));
            ratio += -Softplus(-z);
            double dz = -beta * Sigmoid(-z) / b;                     // d(-beta logsigmoid(z) / b) / dz
            gc[i] = dz / -Expm1(aw) / nw[i] - 1 / tokens;
            gr[i] = -dz / -Expm1(al) / nl[i];
        }
        return new Result(-(pc.Sum() + (pp?.Sum() ?? 0)) / tokens - beta * ratio / b, gc, gr);
    }

    /// <summary>
    /// KTO (apo = false; z0 = max(0, kl)) and apo_zero_unpaired (apo = true): D desirable rows (pc, rc), U undesirable rows
    /// (pr, rr), mean over D + U of lambda_D (1 - sigmoid(beta (u - z0))) and lambda_U (1 - sigmoid(beta (z0 - u))) (apo:
    /// z0 = 0). z0 carries no gradient.
    /// </summary>
    public static Result Kto(double[] pc, double[] pr, double[] rc, double[] rr, double kl, double beta, double lambdaD, double lambdaU, bool apo)
    {
        double z0 = apo ? 0 : Math.Max(0, kl);
        int n = pc.Length + pr.Length;
        double sum = 0;
        var gc = new double[pc.Length]; var gr = new double[pr.Length];
        for (int i = 0; i < pc.Length; i++)
        {
            double s = Sigmoid(beta * (pc[i] - rc[i] - z0));
            sum += lambdaD * (1 - s);
            gc[i] = -lambdaD * beta * s * (1 - s) / n;
        }
        for (int i = 0; i < pr.Length; i++)
        {
            double s = Sigmoid(beta * (pr[i] - rr[i] - z0));      // 1 - sigmoid(beta (z0 - u)) = sigmoid(beta (u - z0))
            sum += lambdaU * s;
            gr[i] = lambdaU * beta * s * (1 - s) / n;
        }
        return new Result(sum / n, gc, gr);
    }

    /// <summary>
    /// BCO with a fresh running mean: delta = mean of this batch's D + U rewards beta u (detached); desirable
    /// softplus(-(r - delta)), undesirable softplus(r - delta), mean over D + U.
    /// </summary>
    public static Result BcoFresh(double[] pc, double[] pr, double[] rc, double[] rr, double beta)
    {
        var rw = pc.Select((p, i) => beta * (p - rc[i])).ToArray();
        var rl = pr.Select((p, i) => beta * (p - rr[i])).ToArray();
        double delta = rw.Concat(rl).Average();
        int n = rw.Length + rl.Length;
        double sum = rw.Sum(r => Softplus(-(r - delta))) + rl.Sum(r => Softplus(r - delta));
        return new Result(sum / n,
            rw.Select(r => -beta * Sigmoid(-(r - delta)) / n).ToArray(),
            rl.Select(r => beta * Sigmoid(r - delta) / n).ToArray());
    }

    /// <summary>Bradley-Terry reward-model loss on rewards (r_w, r_l): softplus(-(r_w - r_l)) + c (r_w + r_l)^2, mean over pairs.</summary>
    public static Result BradleyTerry(double[] rw, double[] rl, double c)
    {
        int b = rw.Length;
        double sum = 0;
        var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            double h = rw[i] - rl[i], s = rw[i] + rl[i];
            sum += Softplus(-h) + c * s * s;
            gc[i] = (-Sigmoid(-h) + 2 * c * s) / b;
            gr[i] = (Sigmoid(-h) + 2 * c * s) / b;
        }
        return new Result(sum / b, gc, gr);
    }
}
