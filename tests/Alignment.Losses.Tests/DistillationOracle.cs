using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>
/// An independent float64 implementation of the distillation divergences and loss (spec §13), written from the formulas
/// with plain loops over one position's logits: no tensor, no chunking, no shared code with the library. Gradients come
/// from central finite differences of these functions.
/// </summary>
public static class DistillationOracle
{
    public static double[] LogSoftmax(double[] z)
    {
        double m = z.Max(), sum = 0;
        foreach (var x in z) sum += Math.Exp(x - m);
        double lse = m + Math.Log(sum);
        return z.Select(x => x - lse).ToArray();
    }

    /// <summary>The teacher's k most likely tokens (ids, most likely first).</summary>
    public static int[] TopK(double[] teacher, int k) =>
        Enumerable.Range(0, teacher.Length).OrderByDescending(i => teacher[i]).Take(k).ToArray();

    /// <summary>One position's divergence from raw logits.</summary>
    public static double Divergence(double[] student, double[] teacher, DivergenceKind kind, double beta = 0.5, double tau = 1,
        int? topK = null, bool tail = false, double logEps = -100)
    {
        if (kind == DivergenceKind.GeneralizedJsd && beta == 0) kind = DivergenceKind.ForwardKl;      // TRL's endpoints
        if (kind == DivergenceKind.GeneralizedJsd && beta == 1) kind = DivergenceKind.ReverseKl;
        var s = student.Select(x => x / tau).ToArray();
        var t = teacher.Select(x => x / tau).ToArray();
        double[] a, T;   // student log-probs and teacher probabilities over the support
        double?[] logT;  // teacher log-probs (null where the teacher has no mass)
        if (topK is not { } k)
        {
            a = LogSoftmax(s);
            var b = LogSoftmax(t);
            T = b.Select(Math.Exp).ToArray();
            logT = b.Select(x => (double?)x).ToArray();
        }
        else
        {
            var ids = TopK(teacher, k);
            var bk = LogSoftmax(ids.Select(i => t[i]).ToArray());
            if (!tail)
            {
                a = LogSoftmax(ids.Select(i => s[i]).ToArray());
                T = bk.Select(Math.Exp).ToArray();
                logT = bk.Select(x => (double?)x).ToArray();
            }
            else
            {
                a = LogSoftmax(s);
                T = new double[s.Length];
                logT = new double?[s.Length];
                for (int j = 0; j < k; j++) { T[ids[j]] = Math.Exp(bk[j]); logT[ids[j]] = bk[j]; }
            }
        }
        double sum = 0;
        for (int v = 0; v < a.Length; v++)
        {
            double S = Math.Exp(a[v]);
            switch (kind)
            {
                case DivergenceKind.ForwardKl:
                    if (T[v] > 0) sum += T[v] * (logT[v]!.Value - a[v]);
                    break;
                case DivergenceKind.ReverseKl:
                    sum += S * (a[v] - (logT[v] ?? logEps));
                    break;
                case DivergenceKind.GeneralizedJsd:
                    double M = beta * T[v] + (1 - beta) * S, logM = Math.Log(M);
                    if (T[v] > 0) sum += beta * T[v] * (logT[v]!.Value - logM);
                    sum += (1 - beta) * S * (a[v] - logM);
                    break;
                default:
                    sum += 0.5 * Math.Abs(S - T[v]);
                    break;
            }
        }
        return sum;
    }

    /// <summary>A batch as plain arrays: logits [N][T][V], labels [N][T] (ignore index -100), mask [N][T].</summary>
    public sealed record Batch(double[][][] Student, double[][][] Teacher, long[][] Labels, bool[][] Mask);

    /// <summary>The loss: sum over valid (aligned) tokens of w_soft D + w_hard CE, over <paramref name="count"/> (default: the valid tokens).</summary>
    public static double Loss(Batch x, TokenDivergence d, double hard, double soft, double? count = null)
    {
        double sum = 0, n = 0;
        for (int i = 0; i < x.Student.Length; i++)
            for (int t = 0; t < x.Student[i].Length; t++)
            {
                if (!x.Mask[i][t] || x.Labels[i][t] == -100) continue;
                n++;
                double div = Divergence(x.Student[i][t], x.Teacher[i][t], d.Kind, d.Beta, d.Temperature, d.TopK, d.StudentTail, d.TailLogProb);
                double ce = -LogSoftmax(x.Student[i][t])[x.Labels[i][t]];
                sum += soft * div + hard * ce;
            }
        return sum / (count ?? Math.Max(1, n));
    }

    /// <summary>d loss / d student logits by central differences.</summary>
    public static double[][][] Gradient(Batch x, TokenDivergence d, double hard, double soft, double h = 1e-6)
    {
        var g = x.Student.Select(r => r.Select(p => new double[p.Length]).ToArray()).ToArray();
        for (int i = 0; i < x.Student.Length; i++)
            for (int t = 0; t < x.Student[i].Length; t++)
                for (int v = 0; v < x.Student[i][t].Length; v++)
                {
                    double keep = x.Student[i][t][v];
                    x.Student[i][t][v] = keep + h;
                    double up = Loss(x, d, hard, soft);
                    x.Student[i][t][v] = keep - h;
                    double down = Loss(x, d, hard, soft);
                    x.Student[i][t][v] = keep;
                    g[i][t][v] = (up - down) / (2 * h);
                }
        return g;
    }
}
