namespace Alignment.Losses.Tests;

/// <summary>
/// The float64 oracle, continued: the field's pairwise objectives (TRL's loss types) and the f-divergence score maps, as
/// plain loops over doubles with hand-derived gradients. Shares no code with the library.
/// </summary>
public static partial class Oracle
{
    /// <summary>A score map s(u) with its derivative, as TRL defines it (exponents of the exponential maps clamped at 80).</summary>
    public sealed record Map(string Name, Func<double, (double S, double dS)> F)
    {
        public override string ToString() => Name;
    }

    public static readonly Map ReverseKl = new("reverse_kl", u => (u, 1));
    public static readonly Map ForwardKl = new("forward_kl", u => -u < 80 ? (-Math.Exp(-u), Math.Exp(-u)) : (-Math.Exp(80), 0));
    public static readonly Map JensenShannon = new("js", u => (-Softplus(-u), Sigmoid(-u)));

    public static Map AlphaDivergence(double alpha) => new($"alpha{alpha}", u =>
    {
        double t = (alpha - 1) * u;
        return t < 80 ? (Math.Exp(t) / (alpha - 1), Math.Exp(t)) : (Math.Exp(80) / (alpha - 1), 0);
    });

    /// <summary>Per-pair losses L(s_w, s_l) written in the mapped scores, with dL/ds_w and dL/ds_l.</summary>
    static Result OfScores(double[] pc, double[] pr, double[]? rc, double[]? rr, Map map, Func<double, double, (double L, double dW, double dL)> f)
    {
        int b = pc.Length; var uw = Sub(pc, rc); var ul = Sub(pr, rr);
        double sum = 0; var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            var (sw, dsw) = map.F(uw[i]);
            var (sl, dsl) = map.F(ul[i]);
            var (l, dW, dL) = f(sw, sl);
            sum += l; gc[i] = dW * dsw / b; gr[i] = dL * dsl / b;
        }
        return new Result(sum / b, gc, gr);
    }

    /// <summary>Losses of the mapped margin Delta = s_w - s_l: f(Delta) and f'(Delta).</summary>
    public static Result OfMappedMargin(double[] pc, double[] pr, double[]? rc, double[]? rr, Map map, Func<double, (double F, double dF)> f) =>
        OfScores(pc, pr, rc, rr, map, (sw, sl) => { var (v, d) = f(sw - sl); return (v, d, -d); });

    public static Result DpoMapped(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta, Map map) =>
        OfMappedMargin(pc, pr, rc, rr, map, h => (Softplus(-beta * h), -beta * Sigmoid(-beta * h)));

    public static Result RobustMapped(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta, double eps, Map map) =>
        OfMappedMargin(pc, pr, rc, rr, map, h => (((1 - eps) * Softplus(-beta * h) - eps * Softplus(beta * h)) / (1 - 2 * eps),
                                                  (-beta * (1 - eps) * Sigmoid(-beta * h) - beta * eps * Sigmoid(beta * h)) / (1 - 2 * eps)));

    /// <summary>EXO: q (log q - ln(1-eps)) + (1-q)(log(1-q) - ln eps), q = sigmoid(z), z = beta Delta; dL/dz = q (1-q) (z - ln((1-eps)/eps)).</summary>
    public static Result ExoPair(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta, double eps, Map map) =>
        OfMappedMargin(pc, pr, rc, rr, map, h =>
        {
            double z = beta * h, q = Sigmoid(z);
            double loss = q * (-Softplus(-z) - Math.Log(1 - eps)) + (1 - q) * (-Softplus(z) - Math.Log(eps));
            return (loss, beta * q * (1 - q) * (z - Math.Log((1 - eps) / eps)));
        });

    /// <summary>DiscoPOP: (1 - m) softplus(-z) + m e^-z, m = sigmoid(z / tau), z = beta Delta, differentiated term by term.</summary>
    public static Result DiscoPop(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta, double tau, Map map) =>
        OfMappedMargin(pc, pr, rc, rr, map, h =>
        {
            double z = beta * h, m = Sigmoid(z / tau), dm = m * (1 - m) / tau, e = Math.Exp(-z), sp = Softplus(-z);
            double loss = (1 - m) * sp + m * e;
            double dz = -dm * sp - (1 - m) * Sigmoid(-z) + dm * e - m * e;
            return (loss, beta * dz);
        });

    public static Result SigmoidNorm(double[] pc, double[] pr, double[]? rc, double[]? rr, double[] nw, double[] nl, double beta, Map map)
    {
        int b = pc.Length; var uw = Sub(pc, rc); var ul = Sub(pr, rr);
        double sum = 0; var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            var (sw, dsw) = map.F(uw[i]);
            var (sl, dsl) = map.F(ul[i]);
            double d = sw / nw[i] - sl / nl[i];
            sum += Softplus(-beta * d);
            double g = -beta * Sigmoid(-beta * d);
            gc[i] = g * dsw / nw[i] / b; gr[i] = -g * dsl / nl[i] / b;
        }
        return new Result(sum / b, gc, gr);
    }

    /// <summary>NCA: softplus(-r_w) + softplus(r_w)/2 + softplus(r_l)/2, r = beta s.</summary>
    public static Result NcaPair(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta, Map map) =>
        OfScores(pc, pr, rc, rr, map, (sw, sl) =>
        {
            double rw = beta * sw, rl = beta * sl;
            return (Softplus(-rw) + 0.5 * Softplus(rw) + 0.5 * Softplus(rl), beta * (-Sigmoid(-rw) + 0.5 * Sigmoid(rw)), beta * 0.5 * Sigmoid(rl));
        });

    /// <summary>BCO (pairwise): softplus(-r_w) + softplus(r_l).</summary>
    public static Result BcoPair(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta, Map map) =>
        OfScores(pc, pr, rc, rr, map, (sw, sl) =>
            (Softplus(-beta * sw) + Softplus(beta * sl), -beta * Sigmoid(-beta * sw), beta * Sigmoid(beta * sl)));

    /// <summary>apo_zero: (1 - sigmoid(beta u_w)) + sigmoid(beta u_l), raw log-ratios.</summary>
    public static Result ApoZero(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta) =>
        OfScores(pc, pr, rc, rr, ReverseKl, (uw, ul) =>
        {
            double qw = Sigmoid(beta * uw), ql = Sigmoid(beta * ul);
            return (1 - qw + ql, -beta * qw * (1 - qw), beta * ql * (1 - ql));
        });

    /// <summary>apo_down: sigmoid(beta u_w) + 1 - sigmoid(beta Delta), Delta on the mapped scores.</summary>
    public static Result ApoDown(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta, Map map)
    {
        int b = pc.Length; var uw = Sub(pc, rc); var ul = Sub(pr, rr);
        double sum = 0; var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            var (sw, dsw) = map.F(uw[i]);
            var (sl, dsl) = map.F(ul[i]);
            double qw = Sigmoid(beta * uw[i]), qd = Sigmoid(beta * (sw - sl));
            sum += qw + 1 - qd;
            gc[i] = (beta * qw * (1 - qw) - beta * qd * (1 - qd) * dsw) / b;
            gr[i] = beta * qd * (1 - qd) * dsl / b;
        }
        return new Result(sum / b, gc, gr);
    }

    /// <summary>
    /// AOT: d_k = sort(x)_k - sort(y)_k; per rank (1-eps) softplus(-beta d) + eps softplus(beta d). Paired: x = l_w - l_l
    /// (policy), y = the same for the reference; unpaired: x = u_w, y = u_l. Gradients routed back through each sort.
    /// </summary>
    public static Result Aot(double[] pc, double[] pr, double[]? rc, double[]? rr, double beta, double eps, bool unpaired)
    {
        int b = pc.Length;
        double[] x, y;
        if (unpaired) { x = Sub(pc, rc); y = Sub(pr, rr); }
        else { x = pc.Select((v, i) => v - pr[i]).ToArray(); y = rc is null ? new double[b] : rc.Select((v, i) => v - rr![i]).ToArray(); }
        var ix = Enumerable.Range(0, b).OrderBy(i => x[i]).ToArray();           // ix[k]: the row with the k-th smallest x
        var iy = Enumerable.Range(0, b).OrderBy(i => y[i]).ToArray();
        double sum = 0; var gx = new double[b]; var gy = new double[b];
        for (int k = 0; k < b; k++)
        {
            double d = x[ix[k]] - y[iy[k]];
            sum += (1 - eps) * Softplus(-beta * d) + eps * Softplus(beta * d);
            double g = (-beta * (1 - eps) * Sigmoid(-beta * d) + beta * eps * Sigmoid(beta * d)) / b;
            gx[ix[k]] += g; gy[iy[k]] -= g;
        }
        // paired: x = l_w - l_l (the reference part y has no policy gradient); unpaired: x = u_w, y = u_l
        return unpaired ? new Result(sum / b, gx, gy) : new Result(sum / b, gx, gx.Select(v => -v).ToArray());
    }

    /// <summary>sft: -(sum_i l_w,i) / (sum_i n_w,i), a batch scalar (its per-example mean is itself).</summary>
    public static Result Sft(double[] pc, double[] pr, double[] nw)
    {
        double n = nw.Sum();
        return new Result(-pc.Sum() / n, pc.Select(_ => -1 / n).ToArray(), new double[pr.Length]);
    }

    /// <summary>
    /// mean_i w_i L_i for a loss separable over pairs: <paramref name="oracle"/> evaluated on each one-pair batch gives L_i and
    /// its gradients, which are weighted and averaged.
    /// </summary>
    public static Result PerPairWeighted(double[] pc, double[] pr, double[] rc, double[] rr, double[] w, Func<double[], double[], double[], double[], Result> oracle)
    {
        int b = pc.Length; double sum = 0; var gc = new double[b]; var gr = new double[b];
        for (int i = 0; i < b; i++)
        {
            var r = oracle(new[] { pc[i] }, new[] { pr[i] }, new[] { rc[i] }, new[] { rr[i] });
            sum += w[i] * r.Loss; gc[i] = w[i] * r.GradChosen[0] / b; gr[i] = w[i] * r.GradRejected[0] / b;
        }
        return new Result(sum / b, gc, gr);
    }

    /// <summary>sum_k w_k * part_k: values and gradients add.</summary>
    public static Result Weighted(params (Result Part, double Weight)[] parts) => new(
        parts.Sum(p => p.Weight * p.Part.Loss),
        Enumerable.Range(0, parts[0].Part.GradChosen.Length).Select(i => parts.Sum(p => p.Weight * p.Part.GradChosen[i])).ToArray(),
        Enumerable.Range(0, parts[0].Part.GradRejected.Length).Select(i => parts.Sum(p => p.Weight * p.Part.GradRejected[i])).ToArray());
}
