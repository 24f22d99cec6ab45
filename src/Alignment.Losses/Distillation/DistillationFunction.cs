using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>How the teacher's side of a distillation pass is given.</summary>
internal enum TeacherSource { Logits, Head, TopK }

/// <summary>
/// What one chunked distillation pass computes, and how its tensor arguments are laid out: the student's (logits, or
/// hidden + weight [+ bias]), the teacher's (logits, hidden + weight [+ bias], or top-k logits + ids), then the targets
/// and the validity mask, both [N, T'].
/// </summary>
internal sealed record DistillationPlan(bool StudentHead, bool StudentBias, TeacherSource Teacher, bool TeacherBias, bool Shift, long Chunk,
    ScalarType DType, TokenDivergence Divergence, bool Hard)
{
    internal int StudentTensors => StudentHead ? (StudentBias ? 3 : 2) : 1;
    internal int TeacherTensors => Teacher switch { TeacherSource.Logits => 1, TeacherSource.TopK => 2, _ => TeacherBias ? 3 : 2 };
}

/// <summary>
/// The chunked distillation pass as one custom autograd function. Forward: for each chunk of tokens, the student's
/// logits (materialised, or h W^T + b) and the teacher's, the per-token divergence and (for the hard loss) the target
/// log-prob at temperature 1; the chunk is freed. Output [2, N, T']: divergence, target log-prob, 0 where no token counts.
/// Backward: each chunk recomputed, d loss / d student logits = g_div dD/dz + g_lp (onehot - softmax), then written to
/// the logits' gradient, or to grad_hidden = G W, grad_W += G^T h, grad_b += sum G. Peak: about one [rows, V] chunk per
/// model plus the gradients of the student's inputs.
/// </summary>
internal sealed class DistillationFunction : LibraryFunction<DistillationFunction>
{
    public override string Name => "AlignmentLosses.Distillation";

    /// <summary>Runs the pass; <paramref name="tensors"/> are laid out as <paramref name="plan"/> says.</summary>
    internal static Tensor Run(DistillationPlan plan, IReadOnlyList<Tensor> tensors)
    {
        var vars = new object[1 + tensors.Count];
        vars[0] = plan;
        for (int i = 0; i < tensors.Count; i++)
            vars[1 + i] = i < plan.StudentTensors && tensors[i].requires_grad ? tensors[i].view(tensors[i].shape) : tensors[i];   // see FusedLinearLogProbs
        return apply(vars);
    }

    protected override Tensor Forward(autograd.AutogradContext ctx, object[] vars)
    {
        var plan = (DistillationPlan)vars[0];
        var tensors = vars.Skip(1).Cast<Tensor>().ToList();
        ctx.save_for_backward(tensors);
        ctx.save_data("plan", plan);
        return Pass(plan, tensors, null).Output!;
    }

    protected override Tensor?[] Backward(autograd.AutogradContext ctx, IReadOnlyList<Tensor> saved, Tensor gradOutput)
    {
        var plan = (DistillationPlan)ctx.get_data("plan")!;
        var grads = Pass(plan, saved, gradOutput).Grads!;
        var result = new Tensor?[1 + saved.Count];
        for (int i = 0; i < grads.Length; i++) result[1 + i] = grads[i];
        return result;
    }

    /// <summary>A block's precomputed top-k ids, 0 where nothing counts and clamped into the vocabulary (ids out of range
    /// are reported by the call's deferred check, not by an indexing failure here).</summary>
    private static Tensor TopKIds(ChunkMath.Block block, Tensor ids, Tensor rowValid, long vocab) =>
        block.Of(ids).reshape(block.Count, ids.shape[2]).clamp(0, vocab - 1).where(rowValid.unsqueeze(1), zeros(1, dtype: ScalarType.Int64, device: ids.device));

    private static (Tensor? Output, Tensor?[]? Grads) Pass(DistillationPlan plan, IReadOnlyList<Tensor> t, Tensor? gradOutput)
    {
        var dtype = plan.DType;
        int si = plan.StudentTensors, ti = si + plan.TeacherTensors;
        Tensor targets = t[ti], valid = t[ti + 1];
        long vocab = plan.StudentHead ? t[1].shape[0] : t[0].shape[2];
        long n = valid.shape[0], tokens = valid.shape[1];
        Tensor Scored(Tensor x) => SequenceLogProbs.Scored(x, plan.Shift);

        // the student
        Tensor? sLogits = null, sHidden = null, sW = null, sWt = null, sB = null;
        if (plan.StudentHead)
        {
            sHidden = Scored(t[0]);
            sW = t[1].to_type(dtype);
            sWt = sW.t();
            sB = plan.StudentBias ? t[2].to_type(dtype) : null;
        }
        else sLogits = Scored(t[0]);
        // the teacher
        Tensor? tLogits = null, tHidden = null, tWt = null, tB = null, tIds = null;
        switch (plan.Teacher)
        {
            case TeacherSource.Logits: tLogits = Scored(t[si]); break;
            case TeacherSource.TopK: tLogits = Scored(t[si]); tIds = Scored(t[si + 1]); break;
            default:
                tHidden = Scored(t[si]);
                tWt = t[si + 1].to_type(dtype).t();
                tB = plan.TeacherBias ? t[si + 2].to_type(dtype) : null;
                break;
        }

        Tensor? output = null, gradDiv = null, gradLp = null;
        Tensor? gradLogits = null, gradLogitsScored = null, gradHidden = null, gradHiddenScored = null, gradW = null, gradB = null;
        if (gradOutput is null) output = zeros(2, n, tokens, dtype: dtype, device: valid.device);
        else
        {
            var g = gradOutput.to_type(dtype);
            gradDiv = ChunkMath.Masked(g[0], valid);
            gradLp = ChunkMath.Masked(g[1], valid);
            if (plan.StudentHead)
            {
                (gradHidden, gradHiddenScored) = SequenceLogProbs.GradientBuffer(t[0], t[0].dtype, plan.Shift);
                gradW = zeros(t[1].shape, dtype: dtype, device: t[1].device);
                gradB = plan.StudentBias ? zeros(t[2].shape, dtype: dtype, device: t[2].device) : null;
            }
            else (gradLogits, gradLogitsScored) = SequenceLogProbs.GradientBuffer(t[0], t[0].dtype, plan.Shift);
        }

        foreach (var block in ChunkMath.Blocks(n, tokens, plan.Chunk))
        {
            using var inner = NewDisposeScope();
            var rowValid = block.Flat(valid);
            var rowMasked = rowValid.logical_not().unsqueeze(1);
            Tensor? h = null;
            Tensor z;
            if (plan.StudentHead)
            {
                h = block.Rows2D(sHidden!, dtype).masked_fill(rowMasked, 0);   // masked rows: 0, so NaN there never reaches G^T h
                z = sB is null ? h.mm(sWt!) : addmm(sB, h, sWt!, 1, 1);
            }
            else z = block.Rows2D(sLogits!, dtype);
            DivergenceMath.TeacherBlock teacher;
            if (plan.Teacher == TeacherSource.Head)
            {
                var th = block.Rows2D(tHidden!, dtype).masked_fill(rowMasked, 0);
                teacher = new(tB is null ? th.mm(tWt!) : addmm(tB, th, tWt!, 1, 1), null);
            }
            else teacher = new(block.Rows2D(tLogits!, dtype), tIds is null ? null : TopKIds(block, tIds, rowValid, vocab));
            var y = block.Flat(targets);

            if (gradOutput is null)
            {
                var (value, _) = DivergenceMath.Evaluate(z, teacher, plan.Divergence, null);
                block.Of(output![0]).copy_(value.view(block.Rows, block.Tokens));
                if (plan.Hard)
                {
                    var (_, lp) = ChunkMath.Forward(z, y);
                    block.Of(output[1]).copy_(lp.view(block.Rows, block.Tokens));
                }
                continue;
            }

            var gd = block.Flat(gradDiv!);
            var gl = block.Flat(gradLp!);
            var (_, grad) = DivergenceMath.Evaluate(z, teacher, plan.Divergence, gd);
            if (plan.Hard)
            {
                var lse = z.logsumexp(1, keepdim: true);
                grad = grad!.sub_((z - lse).exp_().mul_(gl.unsqueeze(1)));   // - g softmax
                grad.scatter_add_(1, y.unsqueeze(1), gl.unsqueeze(1));      // + g at the target
            }
            grad = grad!.masked_fill_(rowMasked, 0);
            if (plan.StudentHead)
            {
                block.Of(gradHiddenScored!).copy_(grad.mm(sW!).view(block.Rows, block.Tokens, sHidden!.shape[2]));
                gradW!.addmm_(grad.t(), h!);
                gradB?.add_(grad.sum(dim: 0));
            }
            else block.Of(gradLogitsScored!).copy_(grad.view(block.Rows, block.Tokens, sLogits!.shape[2]));
        }

        if (gradOutput is null)
        {
            output!.masked_fill_(valid.logical_not().unsqueeze(0), 0);
            return (output, null);
        }
        var grads = new Tensor?[t.Count];
        if (plan.StudentHead)
        {
            grads[0] = gradHidden;
            grads[1] = gradW!.to_type(t[1].dtype);
            if (plan.StudentBias) grads[2] = gradB!.to_type(t[2].dtype);
        }
        else grads[0] = gradLogits;
        return (null, grads);
    }
}
