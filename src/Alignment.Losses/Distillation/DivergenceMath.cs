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
    /// <remarks>Memory-lean: about four [rows, V] buffers (a, b, S, T) live at once, plus one or two transient ones; every
    /// intermediate is disposed as soon as it is used and the gradient is built in place.</remarks>
    internal static (Tensor Value, Tensor? Grad) Evaluate(Tensor student, TeacherBlock teacher, TokenDivergence divergence, Tensor? rowScale)
    {
        using var scope = NewDisposeScope();
        double tau = divergence.Temperature;
        var ids = teacher.Ids;
        var t = teacher.Logits;
        if (ids is null && divergence.TopK is { } k)
        {
            ids = t.topk((int)Math.Min(k, t.shape[1]), dim: 1).indexes;
            t = t.gather(1, ids);
        }
        bool tail = ids is not null && divergence.StudentTail;
        Tensor LogSoftmax(Tensor x)
        {
            if (tau == 1) return nn.functional.log_softmax(x, 1);
            using var scaled = x / tau;
            return nn.functional.log_softmax(scaled, 1);
        }
        Tensor a, b, T;
        Tensor? logT = null;
        if (ids is null || !tail)
        {
            if (ids is null) a = LogSoftmax(student);
            else using (var gathered = student.gather(1, ids)) a = LogSoftmax(gathered);
            b = LogSoftmax(t);
            T = b.exp();
        }
        else
        {
            // the teacher's top-k distribution extended by zero mass; log T = -inf outside, log eps where a finite one is needed
            a = LogSoftmax(student);
            using var bk = LogSoftmax(t);
            using var pk = bk.exp();
            T = zeros_like(a).scatter_(1, ids, pk);
            b = full_like(a, divergence.TailLogProb).scatter_(1, ids, bk);
            if (divergence.Effective == DivergenceKind.GeneralizedJsd)
                logT = full_like(a, double.NegativeInfinity).scatter_(1, ids, bk);
        }
        var S = a.exp();
        Tensor value, g;
        switch (divergence.Effective)
        {
            case DivergenceKind.ForwardKl:
            {
                using var work = b - a;
                value = TeacherWeighted(work, T).sum(1);
                g = T.neg_();
                break;
            }
            case DivergenceKind.ReverseKl:
            {
                var diff = a - b;
                using (var weighted = diff * S) value = weighted.sum(1);
                g = diff.add_(1).mul_(S);
                break;
            }
            case DivergenceKind.GeneralizedJsd:
            {
                double beta = divergence.Beta;
                Tensor m;
                using (var x = a + Math.Log(1 - beta))
                using (var y = (logT ?? b) + Math.Log(beta))
                    m = logaddexp(x, y);
                using (var work = b - m) value = TeacherWeighted(work, T).sum(1).mul_(beta);
                var own = (a - m).mul_(S);
                using (var part = own.sum(1)) value.add_(part, 1 - beta);
                g = own.mul_(1 - beta);
                break;
            }
            default:
            {
                var gap = S - T;
                using (var abs = gap.abs()) value = abs.sum(1).mul_(0.5);
                g = gap.sign_().mul_(S).mul_(0.5);
                break;
            }
        }
        if (rowScale is null)
        {
            scope.MoveToOuter(value);
            return (value, null);
        }
        // chain through the student's log-softmax over the support, then the temperature and the row's upstream gradient
        using (var total = g.sum(1, keepdim: true))
        using (var share = S.mul_(total))
            g.sub_(share);
        using (var scale = rowScale.unsqueeze(1) / tau) g.mul_(scale);
        if (ids is not null && !tail)
            g = zeros_like(student).scatter_(1, ids, g);
        scope.MoveToOuter(value, g);
        return (value, g);
    }

    /// <summary>T * x in place where the teacher's probability is positive, 0 where it is 0 (so 0 * (-inf) never makes NaN).</summary>
    private static Tensor TeacherWeighted(Tensor x, Tensor T)
    {
        using var none = T == 0;
        return x.mul_(T).masked_fill_(none, 0);
    }
}
