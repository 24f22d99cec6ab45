namespace Alignment.Losses.Tests;

/// <summary>
/// One random micro-batch of sampled completions, in plain doubles: the inputs the float64 oracle of the policy-gradient
/// objectives reads. Lengths may be 0 (an empty completion); tokens past a completion's length hold garbage (NaN) that
/// no implementation may read.
/// </summary>
public sealed record PgCase(int N, int T, int[] Lengths, double[,] L, double[,]? Old, double[,] Ref, double[,] Beh,
    double[]? SeqAdv, double[,]? TokAdv)
{
    public bool Valid(int i, int t) => t < Lengths[i];
    public int Tokens => Lengths.Sum();
    public int NonEmpty => Lengths.Count(n => n > 0);

    public static PgCase Random(Random rng, int n, int t, bool allowEmpty = true, bool withOld = true, bool tokenAdvantages = false, double drift = 0.1)
    {
        var lengths = Enumerable.Range(0, n).Select(_ => rng.Next(allowEmpty ? 0 : 1, t + 1)).ToArray();
        if (lengths.All(x => x == 0)) lengths[0] = 1;
        double[,] Grid(Func<int, int, double> f)
        {
            var g = new double[n, t];
            for (int i = 0; i < n; i++)
                for (int k = 0; k < t; k++) g[i, k] = k < lengths[i] ? f(i, k) : double.NaN;
            return g;
        }
        double Normal() => Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble());
        var l = Grid((_, _) => -0.02 - 3 * rng.NextDouble());
        double[,] Near(double scale) => Grid((i, k) => Math.Min(-1e-4, l[i, k] + scale * Normal()));
        return new PgCase(n, t, lengths, l, withOld ? Near(drift) : null, Near(0.3), Near(0.05),
            tokenAdvantages ? null : Enumerable.Range(0, n).Select(_ => Normal()).ToArray(),
            tokenAdvantages ? Grid((_, _) => Normal()) : null);
    }
}

/// <summary>The window counts as the oracle reads them (null fields: the micro-batch's own).</summary>
public sealed record OracleWindow(double? Tokens, double? Sequences, int D);

/// <summary>
/// An independent float64 implementation of every objective in <see cref="PolicyLosses"/>, written from the spec's formulas
/// with loops over tokens (no tensors). Stop-gradient quantities (l_old when absent, CISPO's weight, GSPO-token's sequence
/// ratio) are evaluated at <c>l0</c>, so that central finite differences in <c>l</c> give what autograd gives.
/// </summary>
public static class PolicyOracle
{
    public sealed record Config(string Kind, double EpsLow = 0.2, double EpsHigh = 0.2, string Ratio = "token", double? DualClip = null,
        string Reduction = "seq-mean-token-mean", bool CountEmpty = false, double MaxLen = 512, double KlBeta = 0, double Clamp = 20);

    /// <summary>The oracle's own reading of each registry name's defaults (from docs/losses.md, not from the code).</summary>
    public static Config For(string name) => name switch
    {
        "grpo" => new("clip"),
        "dapo" => new("clip", EpsHigh: 0.28, Reduction: "token-mean"),
        "dr_grpo" => new("clip", Reduction: "constant"),
        "bnpo" => new("clip", Reduction: "local"),
        "gspo" => new("clip", 3e-4, 4e-4, Ratio: "seq-mean"),
        "gspo_token" => new("clip", 3e-4, 4e-4, Ratio: "seq-mean-token"),
        "cispo" => new("cispo-cap", EpsHigh: 5, Reduction: "token-mean"),
        "cispo_clip" => new("cispo-clip", 0.2, 0.28, Reduction: "token-mean"),
        "sapo" => new("sapo"),
        "gmpo" => new("gmpo", 0.4, 0.4),
        "reinforce" => new("reinforce", Reduction: "token-mean"),
        "rloo" => new("clip", Ratio: "seq-sum", CountEmpty: true),
        "dual_clip" => new("clip", DualClip: 3),
        _ => throw new ArgumentException(name),
    };

    static double Sigmoid(double z) => z >= 0 ? 1 / (1 + Math.Exp(-z)) : Math.Exp(z) / (1 + Math.Exp(z));

    /// <summary>The loss of <paramref name="c"/> at policy log-probs <paramref name="l"/>, stop-gradients at <paramref name="l0"/>.</summary>
    public static double Loss(PgCase x, Config c, double[,] l, double[,] l0, OracleWindow? w = null)
    {
        int n = x.N, T = x.T;
        double Old(int i, int t) => x.Old is null ? l0[i, t] : x.Old[i, t];
        double Lr(int i, int t, double[,] at) => Math.Clamp(at[i, t] - Old(i, t), -c.Clamp, c.Clamp);
        double Adv(int i, int t) => x.SeqAdv is null ? x.TokAdv![i, t] : x.SeqAdv[i];
        var perToken = new double[n, T];
        for (int i = 0; i < n; i++)
        {
            int len = x.Lengths[i];
            if (len == 0) continue;
            double seqMean = 0, seqMean0 = 0, seqSum = 0;
            for (int t = 0; t < len; t++) { seqSum += Lr(i, t, l); seqMean0 += Lr(i, t, l0); }
            seqMean = seqSum / len;
            seqMean0 /= len;
            double gmpoCoef = 0, gmpoAdv = 0;
            if (c.Kind == "gmpo")
            {
                double s = 0;
                for (int t = 0; t < len; t++)
                {
                    double a = Adv(i, t), d = Lr(i, t, l), sign = Math.Sign(a);
                    s += sign * Math.Min(sign * d, sign * Math.Clamp(d, -c.EpsLow, c.EpsHigh));
                    gmpoAdv += a;
                }
                gmpoCoef = Math.Exp(s / len);
                gmpoAdv /= len;
            }
            for (int t = 0; t < len; t++)
            {
                double a = Adv(i, t);
                double rho = c.Ratio switch
                {
                    "token" => Math.Exp(Lr(i, t, l)),
                    "seq-mean" => Math.Exp(seqMean),
                    "seq-sum" => Math.Exp(seqSum),
                    _ => Math.Exp(seqMean0 + l[i, t] - l0[i, t]),
                };
                double rho0 = Math.Exp(Lr(i, t, l0));
                double v;
                switch (c.Kind)
                {
                    case "clip":
                        v = -Math.Min(rho * a, Math.Clamp(rho, 1 - c.EpsLow, 1 + c.EpsHigh) * a);
                        if (c.DualClip is { } dc && a < 0) v = Math.Min(v, -dc * a);
                        break;
                    case "cispo-cap": v = -Math.Min(rho0, c.EpsHigh) * a * l[i, t]; break;
                    case "cispo-clip": v = -Math.Clamp(rho0, 1 - c.EpsLow, 1 + c.EpsHigh) * a * l[i, t]; break;
                    case "sapo":
                        double tau = a > 0 ? 1.0 : 1.05;
                        v = -Sigmoid(tau * (rho - 1)) * 4 / tau * a;
                        break;
                    case "gmpo": v = -gmpoCoef * gmpoAdv; break;
                    default: v = -a * l[i, t]; break;
                }
                if (c.KlBeta > 0)
                {
                    double u = x.Ref[i, t] - l[i, t];
                    v += c.KlBeta * (Math.Exp(u) - u - 1);
                }
                perToken[i, t] = v;
            }
        }
        return Reduce(x, c, perToken, w);
    }

    public static double Reduce(PgCase x, Config c, double[,] perToken, OracleWindow? w)
    {
        double total = 0, seqMeans = 0;
        for (int i = 0; i < x.N; i++)
        {
            double s = 0;
            for (int t = 0; t < x.Lengths[i]; t++) s += perToken[i, t];
            total += s;
            if (x.Lengths[i] > 0) seqMeans += s / x.Lengths[i];
        }
        double d = w?.D ?? 1;
        double tokens = w?.Tokens ?? Math.Max(1, x.Tokens);
        double seqs = w?.Sequences ?? Math.Max(1, c.CountEmpty ? x.N : x.NonEmpty);
        return c.Reduction switch
        {
            "token-mean" => d * total / tokens,
            "seq-mean-token-mean" => d * seqMeans / seqs,
            "seq-mean-token-sum" => d * total / seqs,
            "constant" => d * total / (seqs * c.MaxLen),
            _ => total / Math.Max(1, x.Tokens),
        };
    }

    /// <summary>Central finite differences of the oracle in each valid l[i, t] (stop-gradients held at l).</summary>
    public static double[,] Gradient(PgCase x, Config c, OracleWindow? w = null, double h = 1e-6)
    {
        var g = new double[x.N, x.T];
        var l0 = (double[,])x.L.Clone();
        for (int i = 0; i < x.N; i++)
            for (int t = 0; t < x.Lengths[i]; t++)
            {
                var up = (double[,])x.L.Clone();
                var down = (double[,])x.L.Clone();
                up[i, t] += h;
                down[i, t] -= h;
                g[i, t] = (Loss(x, c, up, l0, w) - Loss(x, c, down, l0, w)) / (2 * h);
            }
        return g;
    }
}
