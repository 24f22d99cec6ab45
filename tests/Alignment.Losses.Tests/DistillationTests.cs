using Alignment.Losses;
using static Alignment.Losses.Tests.DistillationOracle;

namespace Alignment.Losses.Tests;

/// <summary>
/// The distillation family (spec §13): the spec's 3-class values, the JSD's endpoints, every divergence and support
/// against the float64 oracle (values and finite-difference gradients, four dtypes), the fused two-head path against
/// materialised logits, packed against padded, windows, the teacher's top-k given or computed, and bad inputs.
/// </summary>
public class DistillationTests
{
    const int N = 3, T = 4, V = 7;

    /// <summary>Random logits (the teacher's spread so that its top-k has no near-ties in any dtype), labels with ignored
    /// positions and a mask.</summary>
    static Batch RandomBatch(int seed, int n = N, int t = T, int v = V)
    {
        var rng = new Random(seed);
        double[][][] Grid(Func<double[]> row) => Enumerable.Range(0, n).Select(_ => Enumerable.Range(0, t).Select(_ => row()).ToArray()).ToArray();
        var student = Grid(() => Enumerable.Range(0, v).Select(_ => rng.NextDouble() * 4 - 2).ToArray());
        var teacher = Grid(() => Enumerable.Range(0, v).OrderBy(_ => rng.Next()).Select(r => r * 0.6 - 2 + rng.NextDouble() * 0.2).ToArray());
        var labels = Enumerable.Range(0, n).Select(_ => Enumerable.Range(0, t).Select(_ => rng.Next(5) == 0 ? -100L : rng.Next(v)).ToArray()).ToArray();
        var mask = Enumerable.Range(0, n).Select(i => Enumerable.Range(0, t).Select(j => !(i == n - 1 && j == 0)).ToArray()).ToArray();
        labels[0][0] = 1;   // at least one valid position
        return new Batch(student, teacher, labels, mask);
    }

    static Tensor Logits(double[][][] x, ScalarType dtype) =>
        tensor(x.SelectMany(r => r.SelectMany(p => p)).ToArray(), dtype: ScalarType.Float64).reshape(x.Length, x[0].Length, x[0][0].Length).to_type(dtype);

    static Tensor Labels(Batch x) => tensor(x.Labels.SelectMany(r => r).ToArray()).reshape(x.Labels.Length, x.Labels[0].Length);

    static Tensor Mask(Batch x) => tensor(x.Mask.SelectMany(r => r).ToArray()).reshape(x.Mask.Length, x.Mask[0].Length);

    /// <summary>The batch's values as the dtype holds them (the oracle sees what the library sees).</summary>
    static Batch Rounded(Batch x, ScalarType dtype)
    {
        double[][][] R(double[][][] g) => g.Select(r => r.Select(p => TensorUtil.Values(tensor(p).to_type(dtype))).ToArray()).ToArray();
        return x with { Student = R(x.Student), Teacher = R(x.Teacher) };
    }

    static TokenDivergence Make(string kind, string support, double tau)
    {
        var d = kind switch
        {
            "jsd" => TokenDivergence.Jsd(0.3, tau),
            "forward" => TokenDivergence.ForwardKl(tau),
            "reverse" => TokenDivergence.ReverseKl(tau),
            _ => TokenDivergence.TotalVariation(tau),
        };
        return support switch { "top3" => d.WithTopK(3), "top3+tail" => d.WithTopK(3, studentTail: true), _ => d };
    }

    // ---- the spec's reference values and the directions ----

    static double ThreeClass(TokenDivergence d)
    {
        using var scope = NewDisposeScope();
        var s = tensor(new[] { 1.0, 0, -1 }).reshape(1, 1, 3);
        var t = tensor(new[] { 0.0, 1, 0.5 }).reshape(1, 1, 3);
        using var r = new DistillationLoss(new DistillationOptions { Divergence = d }).Compute(s, t, null, null, LabelAlignment.Aligned);
        return r.Loss.ToDouble();
    }

    [Theory]
    [InlineData(0.0, 0.5082868)]
    [InlineData(0.1, 0.0452787)]
    [InlineData(0.5, 0.1260875)]
    [InlineData(0.9, 0.0486519)]
    [InlineData(1.0, 0.5581303)]
    public void The_generalised_jsd_gives_the_spec_values_with_TRLs_endpoints(double beta, double expected) =>
        Assert.Equal(expected, ThreeClass(TokenDivergence.Jsd(beta)), 7);

    [Fact]
    public void Forward_kl_is_KL_teacher_to_student_and_reverse_kl_is_KL_student_to_teacher()
    {
        // S = softmax([1, 0, -1]), T = softmax([0, 1, 0.5]): KL(T || S) = 0.5082868, KL(S || T) = 0.5581303
        Assert.Equal(0.5082868, ThreeClass(TokenDivergence.ForwardKl()), 7);
        Assert.Equal(0.5581303, ThreeClass(TokenDivergence.ReverseKl()), 7);
        Assert.Equal(0.4789172, ThreeClass(TokenDivergence.TotalVariation()), 7);
    }

    [Fact]
    public void The_interior_jsd_tends_to_zero_at_both_ends_so_the_defined_endpoints_are_a_jump()
    {
        Assert.True(ThreeClass(TokenDivergence.Jsd(1e-9)) < 1e-7);
        Assert.True(ThreeClass(TokenDivergence.Jsd(1 - 1e-9)) < 1e-7);
        Assert.True(ThreeClass(TokenDivergence.Jsd(0)) > 0.5 && ThreeClass(TokenDivergence.Jsd(1)) > 0.5);
        Assert.Equal(DivergenceKind.ForwardKl, TokenDivergence.Jsd(0).Effective);
        Assert.Equal(DivergenceKind.ReverseKl, TokenDivergence.Jsd(1).Effective);
    }

    [Fact]
    public void Identical_distributions_have_zero_divergence_of_every_kind()
    {
        using var scope = NewDisposeScope();
        var logits = randn(2, 3, 9, dtype: ScalarType.Float64);
        foreach (var kind in new[] { "jsd", "forward", "reverse", "tvd" })
            foreach (var support in new[] { "full", "top3" })   // with the student's tail, its mass outside the top-k counts: not 0
            {
                using var r = new DistillationLoss(new DistillationOptions { Divergence = Make(kind, support, 1) })
                    .Compute(logits, logits.clone(), null, null, LabelAlignment.Aligned);
                Assert.True(Math.Abs(r.Loss.ToDouble()) < 1e-12, $"{kind} {support}: {r.Loss.ToDouble()}");
            }
    }

    // ---- the float64 oracle ----

    public static IEnumerable<object[]> Cases() =>
        from kind in new[] { "jsd", "forward", "reverse", "tvd" }
        from support in new[] { "full", "top3", "top3+tail" }
        from dtype in new[] { ScalarType.Float64, ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16 }
        select new object[] { kind, support, dtype };

    [Theory, MemberData(nameof(Cases))]
    public void Value_and_gradient_match_the_float64_oracle(string kind, string support, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var d = Make(kind, support, 0.7);
        var x = Rounded(RandomBatch(kind.Length * 31 + support.Length), dtype);
        const double hard = 0.3, soft = 0.7;
        var student = Logits(x.Student, dtype).requires_grad_(true);
        var loss = new DistillationLoss(new DistillationOptions { Divergence = d, HardWeight = hard, SoftWeight = soft, ChunkTokens = 5 });
        using var r = loss.Compute(student, Logits(x.Teacher, dtype), Labels(x), Mask(x), LabelAlignment.Aligned);
        r.Backward();
        double expected = Loss(x, d, hard, soft);
        double tol = dtype == ScalarType.Float64 ? 1e-10 : 1e-5;
        Assert.True(Math.Abs(r.Loss.ToDouble() - expected) <= tol * Math.Max(1, Math.Abs(expected)), $"loss {r.Loss.ToDouble()} vs {expected}");
        var want = Gradient(x, d, hard, soft).SelectMany(a => a.SelectMany(p => p)).ToArray();
        var got = TensorUtil.Values(student.grad!.flatten());
        // the gradient comes back in the logits' dtype: bf16 keeps ~3 significant digits, fp16 ~4
        double gtol = dtype switch { ScalarType.Float64 => 1e-7, ScalarType.Float32 => 1e-5, ScalarType.Float16 => 2e-3, _ => 1e-2 };
        double scale = want.Max(Math.Abs);
        for (int i = 0; i < want.Length; i++)
            Assert.True(Math.Abs(got[i] - want[i]) <= gtol * scale, $"gradient {i}: {got[i]} vs {want[i]} ({kind}, {support}, {dtype})");
        Assert.Equal(ScalarType.Float64 == dtype ? ScalarType.Float64 : ScalarType.Float32, r.Loss.dtype);
    }

    [Fact]
    public void Metrics_report_the_divergence_and_the_cross_entropy_as_token_means()
    {
        using var scope = NewDisposeScope();
        var x = RandomBatch(5);
        var d = TokenDivergence.Jsd(0.5);
        using var r = new DistillationLoss(DistillationOptions.Liger()).Compute(Logits(x.Student, ScalarType.Float64), Logits(x.Teacher, ScalarType.Float64),
            Labels(x), Mask(x), LabelAlignment.Aligned);
        Assert.Equal(Loss(x, d, 0, 1), r[MetricNames.DistillationDivergence], 10);
        Assert.Equal(Loss(x, d, 1, 0), r[MetricNames.DistillationCrossEntropy], 10);
        Assert.Equal(0.5 * Loss(x, d, 1, 0) + 0.5 * Loss(x, d, 0, 1), r.Loss.ToDouble(), 10);
    }

    // ---- the fused two-head path ----

    public static IEnumerable<object[]> FusedCases() =>
        from kind in new[] { "jsd", "forward", "reverse", "tvd" }
        from support in new[] { "full", "top3+tail", "top3" }
        select new object[] { kind, support };

    [Theory, MemberData(nameof(FusedCases))]
    public void Fused_from_hidden_states_and_both_heads_equals_materialised_logits(string kind, string support)
    {
        using var scope = NewDisposeScope();
        manual_seed(11);
        var dtype = ScalarType.Float64;
        var h = randn(3, 5, 4, dtype: dtype).requires_grad_(true);
        var w = randn(V, 4, dtype: dtype).requires_grad_(true);
        var b = randn(V, dtype: dtype).requires_grad_(true);
        var ht = randn(3, 5, 6, dtype: dtype);
        var wt = randn(V, 6, dtype: dtype);
        var bt = randn(V, dtype: dtype);
        var labels = randint(0, V, new long[] { 3, 5 });
        labels[1, 2] = tensor(-100L);
        var mask = ones(3, 5, dtype: ScalarType.Bool);
        mask[2, 4] = tensor(false);
        var options = new DistillationOptions { Divergence = Make(kind, support, 0.8), HardWeight = 0.4, SoftWeight = 0.6, ChunkTokens = 2 };
        var loss = new DistillationLoss(options);

        using var fused = loss.Compute(DistillationStudent.FromHead(h, w, b), DistillationTeacher.FromHead(ht, wt, bt), labels, mask, LabelAlignment.ShiftByOne);
        fused.Backward();
        var (gh, gw, gb) = (h.grad!.clone(), w.grad!.clone(), b.grad!.clone());
        h.grad!.zero_(); w.grad!.zero_(); b.grad!.zero_();

        var studentLogits = matmul(h, w.t()) + b;
        var teacherLogits = matmul(ht, wt.t()) + bt;
        using var plain = loss.Compute(studentLogits, teacherLogits, labels, mask, LabelAlignment.ShiftByOne);
        plain.Backward();
        Assert.True(Math.Abs(fused.Loss.ToDouble() - plain.Loss.ToDouble()) <= 1e-12, $"{fused.Loss.ToDouble()} vs {plain.Loss.ToDouble()}");
        TensorUtil.AssertClose(h.grad!, gh, 1e-10, "grad hidden");
        TensorUtil.AssertClose(w.grad!, gw, 1e-10, "grad weight");
        TensorUtil.AssertClose(b.grad!, gb, 1e-10, "grad bias");
        Assert.True(h.grad!.narrow(1, 4, 1).abs().max().ToDouble() == 0, "the last position predicts nothing when shifted");
    }

    [Fact]
    public void Fused_masked_positions_contribute_nothing_even_with_NaN_hidden_states_there()
    {
        using var scope = NewDisposeScope();
        var h = randn(2, 3, 4, dtype: ScalarType.Float64).requires_grad_(true);
        var w = randn(V, 4, dtype: ScalarType.Float64).requires_grad_(true);
        var ht = randn(2, 3, 4, dtype: ScalarType.Float64);
        ht[1, 2] = full(4, double.NaN, dtype: ScalarType.Float64);
        var hNaN = h.detach().clone();
        hNaN[1, 2] = full(4, double.NaN, dtype: ScalarType.Float64);
        hNaN.requires_grad_(true);
        var mask = ones(2, 3, dtype: ScalarType.Bool);
        mask[1, 2] = tensor(false);
        var labels = randint(0, V, new long[] { 2, 3 });
        var loss = new DistillationLoss(new DistillationOptions { HardWeight = 1 });
        using var r = loss.Compute(DistillationStudent.FromHead(hNaN, w), DistillationTeacher.FromHead(ht, w.detach()), labels, mask, LabelAlignment.Aligned);
        r.Backward();
        Assert.True(double.IsFinite(r.Loss.ToDouble()));
        Assert.True(isfinite(w.grad!).all().item<bool>() && isfinite(hNaN.grad!).all().item<bool>());
        Assert.Equal(0, hNaN.grad![1, 2].abs().sum().ToDouble());
    }

    // ---- teacher top-k given, packed, windows ----

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void A_precomputed_top_k_teacher_equals_the_full_teacher_restricted_to_its_top_k(bool tail)
    {
        using var scope = NewDisposeScope();
        var x = RandomBatch(9);
        var s1 = Logits(x.Student, ScalarType.Float64).requires_grad_(true);
        var s2 = s1.detach().clone().requires_grad_(true);
        var teacher = Logits(x.Teacher, ScalarType.Float64);
        var d = TokenDivergence.ReverseKl(0.9).WithTopK(3, tail);
        var loss = new DistillationLoss(new DistillationOptions { Divergence = d });
        using var full = loss.Compute(s1, teacher, Labels(x), Mask(x), LabelAlignment.Aligned);
        full.Backward();
        var ids = teacher.topk(3, dim: 2).indexes;
        var logProbs = nn.functional.log_softmax(teacher, 2).gather(2, ids);   // log-probs work as well as logits
        using var given = loss.Compute(DistillationStudent.FromLogits(s2), DistillationTeacher.FromTopK(logProbs, ids), Labels(x), Mask(x), LabelAlignment.Aligned);
        given.Backward();
        Assert.Equal(full.Loss.ToDouble(), given.Loss.ToDouble(), 12);
        TensorUtil.AssertClose(s1.grad!, s2.grad!, 1e-12, "grad");
    }

    [Fact]
    public void A_packed_batch_equals_its_padded_rows()
    {
        using var scope = NewDisposeScope();
        manual_seed(3);
        var lengths = new long[] { 3, 5 };
        var student = randn(2, 5, V, dtype: ScalarType.Float64);
        var teacher = randn(2, 5, V, dtype: ScalarType.Float64);
        var labels = randint(0, V, new long[] { 2, 5 });
        var mask = tensor(new[] { true, true, true, false, false, true, true, true, true, true }).reshape(2, 5);
        var loss = new DistillationLoss(new DistillationOptions { Divergence = TokenDivergence.Jsd(0.4), HardWeight = 0.5 });
        var padded = student.clone().requires_grad_(true);
        using var a = loss.Compute(padded, teacher, labels, mask, LabelAlignment.ShiftByOne);
        a.Backward();
        var packed = cat(new[] { student[0].narrow(0, 0, 3), student[1] }, 0).unsqueeze(0).requires_grad_(true);
        var packedTeacher = cat(new[] { teacher[0].narrow(0, 0, 3), teacher[1] }, 0).unsqueeze(0);
        var packedLabels = cat(new[] { labels[0].narrow(0, 0, 3), labels[1] }, 0).unsqueeze(0);
        using var b = loss.Compute(DistillationStudent.FromLogits(packed), DistillationTeacher.FromLogits(packedTeacher), packedLabels, null,
            SequenceBoundaries.FromLengths(lengths), LabelAlignment.ShiftByOne);
        b.Backward();
        Assert.Equal(a.Loss.ToDouble(), b.Loss.ToDouble(), 12);
        var gradPacked = cat(new[] { padded.grad![0].narrow(0, 0, 3), padded.grad![1] }, 0).unsqueeze(0);
        TensorUtil.AssertClose(gradPacked, packed.grad!, 1e-12, "grad");
        TensorUtil.AssertClose(a.PerSequence, b.PerSequence, 1e-12, "per sequence");
    }

    [Fact]
    public void Micro_batches_and_ranks_with_the_window_count_give_the_whole_batch()
    {
        using var scope = NewDisposeScope();
        var x = RandomBatch(21, n: 4);
        var student = Logits(x.Student, ScalarType.Float64);
        var teacher = Logits(x.Teacher, ScalarType.Float64);
        var labels = Labels(x);
        var mask = Mask(x);
        var loss = new DistillationLoss(DistillationOptions.Liger());
        var whole = student.clone().requires_grad_(true);
        using var w = loss.Compute(whole, teacher, labels, mask, LabelAlignment.Aligned);
        w.Backward();
        double tokens = ((mask & (labels != -100)).sum()).ToDouble();
        // two ranks (D = 2) of two micro-batches each, of unequal sizes: rows {0}, {1} on rank 0 and {2, 3}, {} ... cut as 1 + 1 | 2
        var parts = new[] { (0, 1), (1, 1), (2, 2) };
        var window = new TokenWindow { Tokens = tokens, DataParallelSize = 2 };
        var grad = zeros_like(student);
        double rank0 = 0, rank1 = 0;
        foreach (var (start, count) in parts)
        {
            var part = student.narrow(0, start, count).clone().requires_grad_(true);
            using var r = loss.Compute(part, teacher.narrow(0, start, count), labels.narrow(0, start, count), mask.narrow(0, start, count), LabelAlignment.Aligned, window);
            r.Backward();
            if (start < 2) rank0 += r.Loss.ToDouble(); else rank1 += r.Loss.ToDouble();
            grad.narrow(0, start, count).add_(part.grad! / 2);   // DDP averages over the 2 ranks
        }
        Assert.Equal(w.Loss.ToDouble(), (rank0 + rank1) / 2, 12);
        TensorUtil.AssertClose(whole.grad!, grad, 1e-12, "grad");
    }

    [Fact]
    public void An_empty_micro_batch_is_an_error_alone_and_adds_zero_inside_a_window()
    {
        using var scope = NewDisposeScope();
        var s = randn(2, 3, V).requires_grad_(true);
        var t = randn(2, 3, V);
        var labels = full(2, 3, -100L, dtype: ScalarType.Int64);
        var loss = new DistillationLoss();
        var e = Assert.Throws<ArgumentException>(() => loss.Compute(s, t, labels, null, LabelAlignment.Aligned));
        Assert.Equal("labels", e.ParamName);
        Assert.Contains("No position counts", e.Message);
        using var r = loss.Compute(s, t, labels, null, LabelAlignment.Aligned, new TokenWindow { Tokens = 10 });
        Assert.Equal(0, r.Loss.ToDouble());
    }

    [Fact]
    public void No_gradient_reaches_the_teacher()
    {
        using var scope = NewDisposeScope();
        var s = randn(2, 3, V).requires_grad_(true);
        var t = randn(2, 3, V).requires_grad_(true);
        using (var r = new DistillationLoss().Compute(s, t, null, null, LabelAlignment.Aligned)) r.Backward();
        Assert.Null(t.grad);
        var h = randn(2, 3, 4).requires_grad_(true);
        var w = randn(V, 4).requires_grad_(true);
        var ht = randn(2, 3, 5).requires_grad_(true);
        var wt = randn(V, 5).requires_grad_(true);
        using (var r = new DistillationLoss().Compute(DistillationStudent.FromHead(h, w), DistillationTeacher.FromHead(ht, wt), null, null, LabelAlignment.Aligned))
            r.Backward();
        Assert.Null(ht.grad);
        Assert.Null(wt.grad);
        Assert.NotNull(w.grad);
    }

    // ---- bad inputs ----

    [Fact]
    public void Bad_inputs_are_clear_errors_naming_the_argument()
    {
        using var scope = NewDisposeScope();
        var s = randn(2, 3, V).requires_grad_(true);
        var t = randn(2, 3, V);
        var loss = new DistillationLoss();
        void Throws<TEx>(string param, Action call) where TEx : ArgumentException
        {
            var e = Assert.Throws<TEx>(call);
            Assert.Equal(param, e.ParamName);
        }
        Throws<ArgumentOutOfRangeException>("beta", () => TokenDivergence.Jsd(1.5));
        Throws<ArgumentOutOfRangeException>("beta", () => TokenDivergence.Jsd(-0.1));
        Throws<ArgumentOutOfRangeException>("temperature", () => TokenDivergence.Jsd(0.5, 0));
        Throws<ArgumentOutOfRangeException>("temperature", () => TokenDivergence.ReverseKl(-1));
        Throws<ArgumentOutOfRangeException>("temperature", () => TokenDivergence.ForwardKl(double.NaN));
        Throws<ArgumentException>("beta", () => new TokenDivergence(DivergenceKind.ForwardKl, beta: 0.2));
        Throws<ArgumentOutOfRangeException>("topK", () => TokenDivergence.ForwardKl().WithTopK(0));
        Throws<ArgumentException>("studentTail", () => new TokenDivergence(DivergenceKind.ReverseKl, studentTail: true));
        Throws<ArgumentOutOfRangeException>("HardWeight", () => new DistillationOptions { HardWeight = -1 });
        Throws<ArgumentException>("options", () => new DistillationLoss(new DistillationOptions { SoftWeight = 0 }));
        Throws<ArgumentException>("labels", () => new DistillationLoss(DistillationOptions.Liger()).Compute(s, t, null, null, LabelAlignment.Aligned));
        Throws<ArgumentException>("teacherLogits", () => loss.Compute(s, randn(2, 3, V + 1), null, null, LabelAlignment.Aligned));
        Throws<ArgumentException>("teacherLogits", () => loss.Compute(s, randn(2, 4, V), null, null, LabelAlignment.Aligned));
        Throws<ArgumentException>("teacher weight", () => loss.Compute(DistillationStudent.FromHead(randn(2, 3, 4), randn(V, 4)),
            DistillationTeacher.FromHead(randn(2, 3, 5), randn(V + 2, 5)), null, null, LabelAlignment.Aligned));
        Throws<ArgumentException>("student weight", () => loss.Compute(DistillationStudent.FromHead(randn(2, 3, 4), randn(V, 5)),
            DistillationTeacher.FromLogits(t), null, null, LabelAlignment.Aligned));
        Throws<ArgumentException>("divergence", () => new DistillationLoss(new DistillationOptions { Divergence = TokenDivergence.ForwardKl().WithTopK(V + 1) })
            .Compute(s, t, null, null, LabelAlignment.Aligned));
        Throws<ArgumentException>("labels", () => loss.Compute(s, t, full(2, 3, (long)V, dtype: ScalarType.Int64), null, LabelAlignment.Aligned));

        var nan = s.detach().clone();
        nan[1, 2, 3] = tensor(float.NaN);
        Throws<ArgumentException>("studentLogits", () => loss.Compute(nan, t, null, null, LabelAlignment.Aligned));
        var tnan = t.clone();
        tnan[0, 1, 0] = tensor(float.PositiveInfinity);
        Throws<ArgumentException>("teacherLogits", () => loss.Compute(s, tnan, null, null, LabelAlignment.Aligned));
        var m = ones(2, 3, dtype: ScalarType.Bool);
        m[1, 2] = tensor(false);
        using (var ok = loss.Compute(nan, t, null, m, LabelAlignment.Aligned))   // NaN where nothing counts: fine
            Assert.True(double.IsFinite(ok.Loss.ToDouble()));

        var (_, ids) = t.topk(3, dim: 2);
        var repeated = ids.clone();
        repeated[0, 0, 1] = repeated[0, 0, 0];
        Throws<ArgumentException>("teacher top-k ids", () => loss.Compute(DistillationStudent.FromLogits(s), DistillationTeacher.FromTopK(t.gather(2, ids), repeated), null, null, LabelAlignment.Aligned));
        var outside = ids.clone();
        outside[1, 1, 2] = tensor((long)V);
        Throws<ArgumentException>("teacher top-k ids", () => loss.Compute(DistillationStudent.FromLogits(s), DistillationTeacher.FromTopK(t.gather(2, ids), outside), null, null, LabelAlignment.Aligned));
        Throws<ArgumentException>("teacher top-k ids", () => loss.Compute(DistillationStudent.FromLogits(s), DistillationTeacher.FromTopK(t.gather(2, ids), ids.to_type(ScalarType.Int32)), null, null, LabelAlignment.Aligned));
        Throws<ArgumentException>("divergence", () => new DistillationLoss(new DistillationOptions { Divergence = TokenDivergence.ReverseKl().WithTopK(2) })
            .Compute(DistillationStudent.FromLogits(s), DistillationTeacher.FromTopK(t.gather(2, ids), ids), null, null, LabelAlignment.Aligned));
    }

    // ---- native memory ----

    [Fact]
    public void Both_paths_leak_nothing_without_a_scope()
    {
        NoScopeMemoryTests.AssertFlat("DistillationLoss (logits)", () =>
        {
            var s = randn(2, 4, V).requires_grad_(true);
            var t = randn(2, 4, V);
            var labels = randint(0, V, new long[] { 2, 4 });
            var loss = new DistillationLoss(new DistillationOptions { Divergence = TokenDivergence.Jsd(0.5).WithTopK(3, true), HardWeight = 0.5, ChunkTokens = 3 });
            return () =>
            {
                using var r = loss.Compute(s, t, labels, null, LabelAlignment.ShiftByOne);
                r.Backward();
            };
        }, iterations: 300);
        NoScopeMemoryTests.AssertFlat("DistillationLoss (fused heads)", () =>
        {
            var h = randn(2, 4, 5).requires_grad_(true);
            var w = randn(V, 5).requires_grad_(true);
            var b = randn(V).requires_grad_(true);
            var ht = randn(2, 4, 3);
            var wt = randn(V, 3);
            var labels = randint(0, V, new long[] { 2, 4 });
            var loss = new DistillationLoss(new DistillationOptions { HardWeight = 0.5, ChunkTokens = 3 });
            return () =>
            {
                using var r = loss.Compute(DistillationStudent.FromHead(h, w, b), DistillationTeacher.FromHead(ht, wt), labels, null, LabelAlignment.ShiftByOne);
                r.Backward();
            };
        }, iterations: 300);
    }
}
