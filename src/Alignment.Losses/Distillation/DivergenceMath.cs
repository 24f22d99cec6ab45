using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// The per-block maths of the distillation divergences: one [rows, V] block of student logits and the teacher's block
/// (full logits, or top-k logits and ids) in, the per-row divergence out, and its gradient with respect to the student's
/// logits. Every divergence is written as D(a, b) of the student's log-probs a and the teacher's b over a support, with
/// its partial derivative G = dD/da; the chain through the student's log-softmax is dD/ds = G - S sum(G), and through
/// the temperature 1 / tau.
/// </summary>
/// <remarks>
/// Partial derivatives (S = exp a, T = exp b, m = log M, M = beta T + (1 - beta) S):
/// forward KL sum T (b - a): G = -T; reverse KL sum S (a - b): G = S (a - b + 1); JSD interior
/// beta sum T (b - m) + (1 - beta) sum S (a - m): G = (1 - beta) S (a - m) (the beta T / M and (1 - beta) S / M terms
/// cancel); TVD 0.5 sum |S - T|: G = 0.5 sign(S - T) S. A teacher probability of 0 contributes 0 to the sums over T.
/// </remarks>
internal static class DivergenceMath
{
    /// <summary>The teacher's side of one block: full logits [rows, V], or top-k logits and ids [rows, k].</summary>
    internal readonly record struct TeacherBlock(Tensor Logits, Tensor? Ids);

    /// <summary>The per-row divergence [rows] and, when <paramref name="rowScale"/> is given, the gradient
    /// rowScale * dD/dz with respect to the student's logits [rows, V].</summary>
    internal static (Tensor Value, Tensor? Grad) Evaluate(Tensor student, TeacherBlock teacher, TokenDivergence divergence, Tensor? rowScale)
    {
        double tau = divergence.Temperature;
        var s = tau == 1 ? student : student / tau;
        var t = tau == 1 ? teacher.Logits : teacher.Logits / tau;
        var ids = teacher.Ids;
        if (ids is null && divergence.TopK is { } k)
        {
            ids = t.topk((int)Math.Min(k, t.shape[1]), dim: 1).indexes;
            t = t.gather(1, ids);
        }
        Tensor a, b, T;
        Tensor? logT = null;
        bool tail = ids is not null && divergence.StudentTail;
        if (ids is null)
        {
            a = nn.functional.log_softmax(s, 1);
            b = nn.functional.log_softmax(t, 1);
            T = b.exp();
        }
        else if (!tail)
        {
            a = nn.functional.log_softmax(s.gather(1, ids), 1);
            b = nn.functional.log_softmax(t, 1);
            T = b.exp();
        }
        else
        {
            // the teacher's top-k distribution extended by zero mass; log T = -inf outside, log eps where a finite one is needed
            a = nn.functional.log_softmax(s, 1);
            var bk = nn.functional.log_softmax(t, 1);
            T = zeros_like(a).scatter_(1, ids, bk.exp());
            b = full_like(a, divergence.TailLogProb).scatter_(1, ids, bk);
            logT = full_like(a, double.NegativeInfinity).scatter_(1, ids, bk);
        }
        var S = a.exp();
        Tensor value, g;
        switch (divergence.Effective)
        {
            case DivergenceKind.ForwardKl:
                value = WhereTeacher(T, T * (b - a)).sum(1);
                g = T.neg();
                break;
            case DivergenceKind.ReverseKl:
            {
                var diff = a - b;
                value = (S * diff).sum(1);
                g = S * (diff + 1);
                break;
            }
            case DivergenceKind.GeneralizedJsd:
            {
                double beta = divergence.Beta;
                var m = logaddexp(a + Math.Log(1 - beta), (logT ?? b) + Math.Log(beta));
                value = WhereTeacher(T, T * (b - m)).sum(1).mul_(beta) + (S * (a - m)).sum(1).mul_(1 - beta);
                g = S * (a - m) * (1 - beta);
                break;
            }
            default:
            {
                var gap = S - T;
                value = gap.abs().sum(1).mul_(0.5);
                g = gap.sign().mul_(S).mul_(0.5);
                break;
            }
        }
        if (rowScale is null) return (value, null);
        // chain through the student's log-softmax over the support, then the temperature and the row's upstream gradient
        var ds = g - S * g.sum(1, keepdim: true);
        ds = ds.mul_(rowScale.unsqueeze(1) / tau);
        if (ids is not null && !tail)
            ds = zeros_like(student).scatter_(1, ids, ds);
        return (value, ds);
    }

    /// <summary>T * x where the teacher's probability is positive, 0 where it is 0 (so 0 * (-inf) never makes NaN).</summary>
    private static Tensor WhereTeacher(Tensor T, Tensor x) => x.where(T > 0, zeros(1, dtype: x.dtype, device: x.device));
}
