using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>Validation, layout and diagnostics of a distillation call's student and teacher sources.</summary>
internal static class DistillationInputs
{
    /// <summary>What the sources agree on: rows, positions, vocabulary, device, and the tensor labels are checked against.</summary>
    internal sealed record Layout(Tensor Reference, string ReferenceName, long Rows, long Positions, long Vocab, string VocabName, Device Device,
        ScalarType DType, long DefaultChunk, string Sizes);

    /// <summary>Structural checks (shapes, dtypes, devices, vocabularies); throws at once.</summary>
    internal static Layout Validate(DistillationStudent student, DistillationTeacher teacher, TokenDivergence divergence)
    {
        Tensor reference;
        string referenceName;
        long vocab;
        string vocabName;
        var all = new List<Tensor?>();
        if (student.IsHead)
        {
            var (h, w, b) = (student.Hidden!, student.Weight!, student.Bias);
            Head(h, w, b, "student hidden", "student weight", "student bias");
            (reference, referenceName, vocab, vocabName) = (h, "student hidden", w.shape[0], "student weight");
            all.AddRange(new[] { h, w, b });
        }
        else
        {
            var l = student.Logits!;
            Logits(l, "studentLogits");
            (reference, referenceName, vocab, vocabName) = (l, "studentLogits", l.shape[2], "studentLogits");
            all.Add(l);
        }
        if (vocab == 0) throw new ArgumentException($"{vocabName} has an empty vocabulary (V = 0).", vocabName);
        void SameGrid(Tensor t, string name)
        {
            if (t.shape[0] != reference.shape[0] || t.shape[1] != reference.shape[1])
                throw new ArgumentException(
                    $"{name} must cover the student's positions [{reference.shape[0]}, {reference.shape[1]}, ·] (same rows, same layout); got {Guard.Shape(t)}.", name);
            Guard.SameDevice(reference, referenceName, t, name);
        }
        if (teacher.IsHead)
        {
            var (h, w, b) = (teacher.Hidden!, teacher.Weight!, teacher.Bias);
            Head(h, w, b, "teacher hidden", "teacher weight", "teacher bias");
            SameGrid(h, "teacher hidden");
            if (w.shape[0] != vocab)
                throw new ArgumentException($"The teacher's head scores {w.shape[0]} tokens but the student's {vocab}: distillation needs one vocabulary (teacher weight [V, H_t] with V = {vocab}).", "teacher weight");
            all.AddRange(new[] { h, w, b });
        }
        else if (teacher.IsTopK)
        {
            var (l, ids) = (teacher.Logits!, teacher.TopKIds!);
            Logits(l, "teacher top-k logits");
            SameGrid(l, "teacher top-k logits");
            Guard.Usable(ids, "teacher top-k ids");
            if (ids.dtype != ScalarType.Int64)
                throw new ArgumentException($"teacher top-k ids must be int64 token ids; got {ids.dtype}.", "teacher top-k ids");
            if (!ids.shape.SequenceEqual(l.shape))
                throw new ArgumentException($"teacher top-k ids must have the top-k logits' shape {Guard.Shape(l)}; got {Guard.Shape(ids)}.", "teacher top-k ids");
            Guard.SameDevice(reference, referenceName, ids, "teacher top-k ids");
            long k = l.shape[2];
            if (k > vocab)
                throw new ArgumentException($"The teacher gives its top-{k} tokens but the vocabulary has {vocab}.", "teacher top-k logits");
            if (divergence.TopK is { } want && want != k)
                throw new ArgumentException($"The divergence asks for the teacher's top-{want} but the teacher gives its top-{k}; set TopK to {k} (or null).", "divergence");
            all.Add(l);
        }
        else
        {
            var l = teacher.Logits!;
            Logits(l, "teacherLogits");
            SameGrid(l, "teacherLogits");
            if (l.shape[2] != vocab)
                throw new ArgumentException($"teacherLogits score {l.shape[2]} tokens but the student's {vocab}: distillation needs one vocabulary.", "teacherLogits");
            all.Add(l);
        }
        if (divergence.TopK is { } topK && topK > vocab)
            throw new ArgumentException($"TopK {topK} exceeds the vocabulary ({vocab}).", "divergence");
        var dtype = Numerics.DTypeFor(all.ToArray());
        long elements = reference.device_type == DeviceType.CUDA ? SequenceLogProbsOptions.DefaultCudaChunkElements : SequenceLogProbsOptions.DefaultCpuChunkElements;
        var sizes = $"student {Native.Describe(student.Logits ?? student.Hidden)}, teacher {Native.Describe(teacher.Logits ?? teacher.Hidden)}, V {vocab}";
        return new Layout(reference, referenceName, reference.shape[0], reference.shape[1], vocab, vocabName, reference.device, dtype,
            Math.Max(1, elements / (4 * vocab)), sizes);   // a quarter of the log-prob path's chunk: two models, ~8 [rows, V] buffers live
    }

    private static void Logits(Tensor l, string name)
    {
        Guard.Usable(l, name);
        Guard.Rank(l, 3, name, "of logits [N, T, V]");
        Guard.Floating(l, name);
        Guard.NotEmpty(l, name);
    }

    private static void Head(Tensor h, Tensor w, Tensor? b, string hName, string wName, string bName)
    {
        Guard.Usable(h, hName);
        Guard.Usable(w, wName);
        Guard.Rank(h, 3, hName, "of hidden states [N, T, H]");
        Guard.Rank(w, 2, wName, "of the head weight [V, H]");
        Guard.Floating(h, hName);
        Guard.Floating(w, wName);
        Guard.NotEmpty(h, hName);
        if (w.shape[1] != h.shape[2])
            throw new ArgumentException($"{wName} must be [V, {h.shape[2]}] to match the hidden size; got {Guard.Shape(w)}.", wName);
        Guard.SameDevice(h, hName, w, wName);
        if (b is null) return;
        Guard.Usable(b, bName);
        Guard.Floating(b, bName);
        if (b.dim() != 1 || b.shape[0] != w.shape[0])
            throw new ArgumentException($"{bName} must be [{w.shape[0]}]; got {Guard.Shape(b)}.", bName);
        Guard.SameDevice(h, hName, b, bName);
    }

    /// <summary>The pass's plan and its tensor arguments (the teacher's detached).</summary>
    internal static (DistillationPlan Plan, List<Tensor> Tensors) Plan(DistillationStudent student, DistillationTeacher teacher, TokenDivergence divergence,
        Targets.Prepared prepared, Layout layout, long chunk, bool targets)
    {
        var tensors = new List<Tensor>();
        if (student.IsHead)
        {
            tensors.Add(student.Hidden!);
            tensors.Add(student.Weight!);
            if (student.Bias is { } b) tensors.Add(b);
        }
        else tensors.Add(student.Logits!);
        TeacherSource source;
        if (teacher.IsHead)
        {
            source = TeacherSource.Head;
            tensors.Add(teacher.Hidden!.detach());
            tensors.Add(teacher.Weight!.detach());
            if (teacher.Bias is { } b) tensors.Add(b.detach());
        }
        else if (teacher.IsTopK)
        {
            source = TeacherSource.TopK;
            tensors.Add(teacher.Logits!.detach());
            tensors.Add(teacher.TopKIds!);
        }
        else
        {
            source = TeacherSource.Logits;
            tensors.Add(teacher.Logits!.detach());
        }
        tensors.Add(prepared.Targets);
        tensors.Add(prepared.Valid);
        var plan = new DistillationPlan(student.IsHead, student.Bias is not null, source, teacher.Bias is not null, prepared.Shift, chunk,
            layout.DType, divergence, targets);
        return (plan, tensors);
    }

    /// <summary>Deferred checks of precomputed top-k ids at the valid positions: in [0, V) and distinct.</summary>
    internal static void CheckTopKIds(DistillationTeacher teacher, Targets.Prepared prepared, long vocab, ValueChecks checks)
    {
        if (teacher.TopKIds is not { } ids) return;
        using var noGrad = no_grad();
        var scored = SequenceLogProbs.Scored(ids, prepared.Shift);
        var valid = prepared.Valid.unsqueeze(2);
        var outOfRange = (((scored < 0) | (scored >= vocab)) & valid).any();
        checks.Add(outOfRange.logical_not(), () => new ArgumentException(
            $"teacher top-k ids must be token ids in [0, {vocab}) at every valid position.", "teacher top-k ids"));
        if (scored.shape[2] > 1)
        {
            var sorted = scored.sort(2).Values;
            var repeated = ((sorted.narrow(2, 1, sorted.shape[2] - 1) == sorted.narrow(2, 0, sorted.shape[2] - 1)) & valid).any();
            checks.Add(repeated.logical_not(), () => new ArgumentException(
                "teacher top-k ids repeat a token at some valid position; the k ids of a position must be distinct.", "teacher top-k ids"));
        }
    }

    /// <summary>Only on failure: names the non-finite input at a valid position, or reports an overflow.</summary>
    internal static Exception NotFinite(DistillationStudent student, DistillationTeacher teacher, Targets.Prepared prepared, DistillationPlan plan,
        DistillationOptions options)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        Guard.AllFinite((student.Weight, "student weight"), (student.Bias, "student bias"), (teacher.Weight, "teacher weight"), (teacher.Bias, "teacher bias"));
        foreach (var (t, name) in new[] { (student.Logits ?? student.Hidden, student.IsHead ? "student hidden" : "studentLogits"),
                     (teacher.Logits ?? teacher.Hidden, teacher.IsHead ? "teacher hidden" : teacher.IsTopK ? "teacher top-k logits" : "teacherLogits") })
        {
            var bad = (~isfinite(SequenceLogProbs.Scored(t!.detach(), plan.Shift))).any(-1) & prepared.Valid;
            if (!bad.any().item<bool>()) continue;
            var rows = bad.any(1).nonzero().flatten().cpu().data<long>().Take(8);
            return new ArgumentException($"{name} contains NaN or Inf at valid positions of row(s) {string.Join(", ", rows)}.", name);
        }
        return new ArithmeticException(
            $"The distillation loss overflowed {plan.DType} although every input is finite at the valid positions (divergence {options.Divergence}). " +
            "Check the logits' scale and the temperature.");
    }
}
