using MathNet.Numerics;
using MathNet.Numerics.LinearAlgebra;

namespace Alignment.Losses.Tests;

/// <summary>
/// Independent float64 re-implementation of every loss: plain loops over doubles, analytic gradients, MathNet for the
/// special functions. Shares no code with the library. Gradients are d(mean loss)/d(policy log-prob).
/// </summary>
public static partial class Oracle
{
    public sealed record Result(double Loss, double[] GradChosen, double[] GradRejected);

    public static double Sigmoid(double x) => SpecialFunctions.Logistic(x);

    /// <summary>softplus(x) = log(1 + e^x), stable for large |x|.</summary>
    public static double Softplus(double x) => x > 0 ? x + SpecialFunctions.Log1p(Math.Exp(-x)) : SpecialFunctions.Log1p(Math.Exp(x));

    static double[] Sub(double[] a, double[]? b) => a.Select((v, i) => v - (b?[i] ?? 0)).ToArray();

    /// <summary>Losses written as f(h) of the pair margin h = u_w - u_l, with f'(h).</summary>
    static Result OfMargin(double[] pc, double[] pr, double[]? rc, double[]? rr, Func<double, (double F, double dF)> f)
    {
        int b = pc.Length;
        var uw = Sub(pc, rc); var ul = Sub(pr, rr);
        double sum = 0; var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            var (v, d) = f(uw[i] - ul[i]);
            sum += v; gc[i] = d / b; gr[i] = -d / b;
        }
        return new Result(sum / b, gc, gr);
    }

    public static Result Dpo(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta) =>
        OfMargin(pc, pr, rc, rr, h => (Softplus(-beta * h), -beta * Sigmoid(-beta * h)));

    public static Result Cdpo(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta, double eps) =>
        OfMargin(pc, pr, rc, rr, h => ((1 - eps) * Softplus(-beta * h) + eps * Softplus(beta * h),
                                      -beta * (1 - eps) * Sigmoid(-beta * h) + beta * eps * Sigmoid(beta * h)));

    public static Result Robust(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta, double eps) =>
        OfMargin(pc, pr, rc, rr, h => (((1 - eps) * Softplus(-beta * h) - eps * Softplus(beta * h)) / (1 - 2 * eps),
                                      (-beta * (1 - eps) * Sigmoid(-beta * h) - beta * eps * Sigmoid(beta * h)) / (1 - 2 * eps)));

    public static Result Hinge(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta) =>
        OfMargin(pc, pr, rc, rr, h => (Math.Max(0, 1 - beta * h), beta * h < 1 ? -beta : 0));

    public static Result Ipo(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta) =>
        OfMargin(pc, pr, rc, rr, h => (Math.Pow(h - 1 / (2 * beta), 2), 2 * (h - 1 / (2 * beta))));

    /// <summary>IPO with per-token means: h~ = u_w / n_w - u_l / n_l.</summary>
    public static Result IpoPerToken(double[] pc, double[] pr, double[]? rc, double[]? rr, double[] nw, double[] nl, double beta)
    {
        int b = pc.Length; var uw = Sub(pc, rc); var ul = Sub(pr, rr);
        double sum = 0; var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            double d = uw[i] / nw[i] - ul[i] / nl[i] - 1 / (2 * beta);
            sum += d * d; gc[i] = 2 * d / nw[i] / b; gr[i] = -2 * d / nl[i] / b;
        }
        return new Result(sum / b, gc, gr);
    }

    public static Result DpoNll(double[] pc, double[] pr, double[]? rc, double[]? rr, double[] nw, double beta, double alpha)
    {
        var dpo = Dpo(pc, pr, rc, rr, beta);
        int b = pc.Length;
        double nll = 0; var gc = (double[])dpo.GradChosen.Clone();
        for (int i = 0; i < b; i++) { nll += -pc[i] / nw[i]; gc[i] += -alpha / nw[i] / b; }
        return new Result(dpo.Loss + alpha * nll / b, gc, dpo.GradRejected);
    }

    public static Result Odpo(double[] pc, double[] pr, double[]? rc, double[]? rr, double[] sw, double[] sl, double beta, double alpha, bool ratio)
    {
        int b = pc.Length; var uw = Sub(pc, rc); var ul = Sub(pr, rr);
        double sum = 0; var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            double offset = alpha * Math.Log(ratio ? sw[i] / sl[i] : sw[i] - sl[i]);
            double z = beta * (uw[i] - ul[i]) - offset;
            sum += Softplus(-z);
            double d = -beta * Sigmoid(-z);
            gc[i] = d / b; gr[i] = -d / b;
        }
        return new Result(sum / b, gc, gr);
    }

    /// <summary>SPO: mean of (mu/alpha) softplus(-alpha (l_w - l_l)) plus klWeight * kl.</summary>
    public static Result Spo(double[] pc, double[] pr, double[]? mu, double alpha, double klWeight, double kl)
    {
        int b = pc.Length; double sum = 0; var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            double w = mu?[i] ?? 1, z = alpha * (pc[i] - pr[i]);
            sum += w / alpha * Softplus(-z);
            gc[i] = -w * Sigmoid(-z) / b; gr[i] = -gc[i];
        }
        return new Result(sum / b + klWeight * kl, gc, gr);
    }

    /// <summary>SPPO with explicit targets tw, tl and a scale (1/2 for sppo and sppo_single, 1 for sppo_hard).</summary>
    public static Result SppoTargets(double[] pc, double[] pr, double[]? rc, double[]? rr, double[] tw, double[] tl, double scale)
    {
        int b = pc.Length; var uw = Sub(pc, rc); var ul = Sub(pr, rr);
        double sum = 0; var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            double ew = uw[i] - tw[i], el = ul[i] - tl[i];
            sum += scale * (ew * ew + el * el);
            gc[i] = 2 * scale * ew / b; gr[i] = 2 * scale * el / b;
        }
        return new Result(sum / b, gc, gr);
    }

    public static Result Sppo(double[] pc, double[] pr, double[]? rc, double[]? rr, double[] pw, double[] pl, double beta) =>
        SppoTargets(pc, pr, rc, rr, pw.Select(p => (p - 0.5) / beta).ToArray(), pl.Select(p => (p - 0.5) / beta).ToArray(), 0.5);

    /// <summary>RPO weights: W_ij = softmax_j(-(1 - cos(e_i, e_j)) / tau), cosine distance from MathNet.</summary>
    public static double[,] RpoWeights(double[][] chosenEmb, double[][] rejectedEmb, double tau)
    {
        int m = chosenEmb.Length, n = rejectedEmb.Length;
        var w = new double[m, n];
        for (int i = 0; i < m; i++)
        {
            var logits = new double[n];
            for (int j = 0; j < n; j++) logits[j] = -Distance.Cosine(chosenEmb[i], rejectedEmb[j]) / tau;
            double max = logits.Max(), z = logits.Sum(l => Math.Exp(l - max));
            for (int j = 0; j < n; j++) w[i, j] = Math.Exp(logits[j] - max) / z;
        }
        return w;
    }

    /// <summary>RPO from a weight matrix: inside (1/MN) sum softplus(-beta W A), or outside (1/M) sum_i sum_j W softplus(-beta A).</summary>
    public static Result Rpo(double[] pc, double[] pr, double[]? rc, double[]? rr, double[,] w, double beta, bool inside)
    {
        var uw = Sub(pc, rc); var ul = Sub(pr, rr);
        int m = uw.Length, n = ul.Length;
        double sum = 0; var gc = new double[m]; var gr = new double[n];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
            {
                double a = uw[i] - ul[j];
                if (inside)
                {
                    double z = beta * w[i, j] * a;
                    sum += Softplus(-z) / (m * n);
                    double d = -beta * w[i, j] * Sigmoid(-z) / (m * n);
                    gc[i] += d; gr[j] -= d;
                }
                else
                {
                    sum += w[i, j] * Softplus(-beta * a) / m;
                    double d = -beta * w[i, j] * Sigmoid(-beta * a) / m;
                    gc[i] += d; gr[j] -= d;
                }
            }
        return new Result(sum, gc, gr);
    }

    public static double[,] Ones(int m, int n) { var w = new double[m, n]; for (int i = 0; i < m; i++) for (int j = 0; j < n; j++) w[i, j] = 1; return w; }

    public static double[,] Diagonal(int n, double lambda)
    {
        var w = new double[n, n];
        for (int i = 0; i < n; i++) for (int j = 0; j < n; j++) w[i, j] = i == j ? lambda : (1 - lambda) / (n - 1);
        return w;
    }

    /// <summary>Exact KL(p || q) of two logit rows.</summary>
    public static double Kl(double[] policyLogits, double[] referenceLogits)
    {
        var p = Vector<double>.Build.DenseOfArray(policyLogits);
        var q = Vector<double>.Build.DenseOfArray(referenceLogits);
        double lp = LogSumExp(policyLogits), lq = LogSumExp(referenceLogits), kl = 0;
        for (int v = 0; v < p.Count; v++) { double a = p[v] - lp, b = q[v] - lq; kl += Math.Exp(a) * (a - b); }
        return kl;
    }

    public static double LogSumExp(double[] xs) { double m = xs.Max(); return m + Math.Log(xs.Sum(x => Math.Exp(x - m))); }
}
