using Alignment.Losses;
using Alignment.Losses.Internal;

namespace Alignment.Losses.Tests;

/// <summary>
/// The fused CPU pass of the policy-gradient losses (PolicyGradientOptions.FusedCpu, FusedPolicyPass): against the
/// op-by-op path (FusedCpu = false) in loss, per-token and per-sequence losses, metrics and the gradients of l and H, to
/// 1e-12 in float64 and float32 rounding otherwise, over random batches and every option that changes the formula (KL
/// estimators and their clamp and bias correction, rollout corrections, top-entropy mask, entropy bonus, log-ratio clamp,
/// reductions with and without a window, token and sequence advantages, masks of every dtype, NaN padding); the path is
/// taken exactly when it should be; the same errors; thread-count independence; memory.
/// </summary>
[Collection("Memory")]
public class FusedPolicyTests
{
    /// <summary>The objectives with a fused term, each in the variants whose term differs.</summary>
    public static IEnumerable<object[]> Objectives() => new[]
    {
        "grpo", "dapo", "dr_grpo", "bnpo", "gspo_token", "dual_clip", "delta", "cispo", "cispo_clip", "cispo_sequence", "sapo", "reinforce",
        "grpo_sequence_mean_token_sum", "gspo", "rloo", "sapo_sequence",
    }.Select(n => new object[] { n });

    /// <summary>The objective <paramref name="name"/> with the extras of <paramref name="extras"/> and the path chosen.</summary>
    internal static ITokenLoss Make(string name, Extras extras, bool fused)
    {
        T With<T>(T o) where T : PolicyGradientOptions => o with
        {
            FusedCpu = fused, Kl = extras.Kl, RolloutCorrection = extras.Rollout, TopEntropyQuantile = extras.Quantile,
            EntropyCoefficient = extras.EntropyCoefficient, LogRatioClamp = extras.Clamp,
        };
        return name switch
        {
            "grpo" => new ClippedPolicyLoss(With(new ClippedPolicyOptions()), "grpo"),
            "dapo" => new ClippedPolicyLoss(With(new ClippedPolicyOptions { EpsilonHigh = 0.28, Reduction = TokenReduction.TokenMean }), "dapo"),
            "dr_grpo" => new ClippedPolicyLoss(With(new ClippedPolicyOptions { Reduction = TokenReduction.ConstantNormalizer(7) }), "dr_grpo"),
            "bnpo" => new ClippedPolicyLoss(With(new ClippedPolicyOptions { Reduction = TokenReduction.LocalTokenMean }), "bnpo"),
            "gspo_token" => new ClippedPolicyLoss(With(new ClippedPolicyOptions { EpsilonLow = 0.05, EpsilonHigh = 0.06, Ratio = ImportanceRatio.SequenceMeanToken }), "gspo_token"),
            "dual_clip" => new ClippedPolicyLoss(With(new ClippedPolicyOptions { DualClip = 1.5 }), "dual_clip"),
            "delta" => new ClippedPolicyLoss(With(new ClippedPolicyOptions { Delta = 1.3, Reduction = new TokenReduction(TokenAggregation.SequenceMeanTokenMean, countEmptySequences: true) }), "delta"),
            "cispo" => new CispoLoss(With(new CispoOptions { EpsilonHigh = 1.2 })),
            "cispo_clip" => new CispoLoss(With(new CispoOptions { Bound = CispoBound.Clip, EpsilonHigh = 0.1 })),
            "cispo_sequence" => new CispoLoss(With(new CispoOptions { EpsilonHigh = 1.1, Ratio = ImportanceRatio.SequenceMean })),
            "sapo" => new SapoLoss(With(new SapoOptions())),
            "reinforce" => new ReinforceLoss(With(new ReinforceOptions())),
            "grpo_sequence_mean_token_sum" => new ClippedPolicyLoss(With(new ClippedPolicyOptions { Reduction = TokenReduction.SequenceMeanTokenSum }), "g"),
            "gspo" => new ClippedPolicyLoss(With(new ClippedPolicyOptions { EpsilonLow = 0.05, EpsilonHigh = 0.06, Ratio = ImportanceRatio.SequenceMean }), "gspo"),
            "rloo" => new ClippedPolicyLoss(With(new ClippedPolicyOptions
            {
                Ratio = ImportanceRatio.SequenceSum, Reduction = new TokenReduction(TokenAggregation.SequenceMeanTokenMean, countEmptySequences: true),
            }), "rloo"),
            "sapo_sequence" => new SapoLoss(With(new SapoOptions { Ratio = ImportanceRatio.SequenceMean })),
            _ => throw new ArgumentException(name),
        };
    }

    /// <summary>The options around the policy term.</summary>
    internal sealed record Extras(KlPenalty? Kl = null, RolloutCorrection? Rollout = null, double Quantile = 1, double EntropyCoefficient = 0,
        double? Clamp = 20, bool Entropy = false)
    {
        public override string ToString() =>
            $"kl {(Kl is null ? "none" : $"{Kl.Estimator} beta {Kl.Beta} clamp {Kl.Clamp} bias {Kl.BiasCorrected}")}, rollout {(Rollout is null ? "none" : $"{Rollout.Level} {Rollout.Mode} [{Rollout.Min}, {Rollout.Max}]")}, " +
            $"q {Quantile}, c {EntropyCoefficient}, clamp {Clamp}, entropy {Entropy}";
    }

    /// <summary>Option sets covering every branch of the pass (a random pick per case keeps the suite short).</summary>
    internal static Extras RandomExtras(Random rng)
    {
        KlPenalty? kl = rng.Next(3) == 0 ? null : new KlPenalty(rng.Next(4) == 0 ? 0 : 0.05 + rng.NextDouble(), (KlEstimator)rng.Next(4))
        {
            Clamp = rng.Next(2) == 0, BiasCorrected = rng.Next(3) == 0,
        };
        RolloutCorrection? rollout = rng.Next(3) == 0 ? null : new RolloutCorrection((RolloutCorrectionLevel)rng.Next(2), (RolloutCorrectionMode)rng.Next(2),
            rng.Next(3) == 0 ? null : 1.05 + rng.NextDouble(), rng.Next(2) == 0 ? null : 0.5 + 0.4 * rng.NextDouble());
        bool entropy = rng.Next(2) == 0;
        return new Extras(kl, rollout, entropy && rng.Next(2) == 0 ? 0.3 + 0.6 * rng.NextDouble() : 1, entropy && rng.Next(2) == 0 ? 0.01 + rng.NextDouble() : 0,
            rng.Next(4) == 0 ? null : rng.Next(2) == 0 ? 20 : 0.25, entropy);
    }

    /// <summary>A random batch: lengths 0..T (an empty row now and then), NaN where no token counts, ratios across the clip range.</summary>
    internal sealed record Case(int N, int T, double[,] L, double[,] Old, double[,] Ref, double[,] Beh, double[,] H, double[] SeqAdv, double[,] TokAdv, bool[,] Valid);

    internal static Case RandomCase(Random rng, int n, int t)
    {
        var (l, old, reference, beh, h, tok, valid) = (new double[n, t], new double[n, t], new double[n, t], new double[n, t], new double[n, t], new double[n, t], new bool[n, t]);
        var seq = new double[n];
        double Normal() => Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble());
        for (int i = 0; i < n; i++)
        {
            int length = rng.Next(6) == 0 ? 0 : 1 + rng.Next(t);
            seq[i] = rng.Next(5) == 0 ? 0 : Normal();
            for (int k = 0; k < t; k++)
            {
                valid[i, k] = k < length;
                double x = -0.05 - 4 * rng.NextDouble();
                l[i, k] = valid[i, k] ? x : double.NaN;                                   // garbage where no token counts
                old[i, k] = Math.Min(0, x + 0.3 * Normal());
                reference[i, k] = Math.Min(0, x + 0.5 * Normal());
                beh[i, k] = Math.Min(0, old[i, k] + 0.2 * Normal());
                h[i, k] = valid[i, k] ? 3 * rng.NextDouble() : double.NaN;
                tok[i, k] = rng.Next(5) == 0 ? 0 : Normal();
            }
        }
        return new Case(n, t, l, old, reference, beh, h, seq, tok, valid);
    }

    internal sealed record Outcome(double Loss, double[] PerToken, double[] PerSequence, Dictionary<string, double> Metrics, double[] GradL, double[]? GradH);

    static double[] Flat(Tensor x)
    {
        using var d = x.detach().to_type(ScalarType.Float64).contiguous();
        return d.data<double>().ToArray();
    }

    internal enum MaskKind { Bool, Float, Long }

    /// <summary>The case's tensors in <paramref name="dtype"/> (with <paramref name="inFloat64"/>: rounded to it, then held in float64,
    /// for an op-by-op reference in float64 of exactly the values the fused pass reads).</summary>
    internal static TokenBatch Batch(Case x, ScalarType dtype, bool tokenAdvantages, bool withOld, Extras extras, MaskKind mask, TokenWindow? window,
        out Tensor leaf, out Tensor? entropyLeaf, bool inFloat64 = false)
    {
        Tensor As(Tensor v) => inFloat64 ? v.to_type(dtype).to_type(ScalarType.Float64) : v.to_type(dtype);
        Tensor G(double[,] v) => As(tensor(v, dtype: ScalarType.Float64));
        leaf = G(x.L).requires_grad_(true);
        entropyLeaf = extras.Entropy ? G(x.H).requires_grad_(true) : null;
        var valid = tensor(x.Valid.Cast<bool>().ToArray(), new long[] { x.N, x.T });
        var m = mask switch { MaskKind.Bool => valid, MaskKind.Float => valid.to_type(ScalarType.Float32) * 2.5, _ => valid.to_type(ScalarType.Int64) };
        return new TokenBatch(leaf, m)
        {
            OldLogProbs = withOld ? G(x.Old) : null,
            ReferenceLogProbs = extras.Kl is not null ? G(x.Ref) : null,
            BehaviourLogProbs = extras.Rollout is not null ? G(x.Beh) : null,
            Entropy = entropyLeaf,
            Advantages = tokenAdvantages ? G(x.TokAdv) : As(tensor(x.SeqAdv)),
            Window = window,
        };
    }

    internal static Outcome Run(ITokenLoss loss, Func<(TokenBatch Batch, Tensor Leaf, Tensor? EntropyLeaf)> make)
    {
        using var scope = NewDisposeScope();
        var (batch, leaf, entropyLeaf) = make();
        using var r = loss.Compute(batch);
        if (r.Loss.requires_grad) r.Loss.backward();
        return new Outcome(r.Loss.ToDouble(), Flat(r.PerToken), Flat(r.PerSequence), r.Metrics.ToDictionary(kv => kv.Key, kv => kv.Value),
            leaf.grad is null ? new double[leaf.numel()] : Flat(leaf.grad), entropyLeaf?.grad is { } g ? Flat(g) : null);
    }

    static void AssertClose(Outcome expected, Outcome actual, double tol, string what)
    {
        static double Scale(double[] x) => Math.Max(1e-300, x.Select(Math.Abs).DefaultIfEmpty(0).Max());
        // relative to the largest value of the part, or of the per-token losses it sums (float32 rounds each summand)
        void Close(double[] e, double[] a, string part, double? over = null)
        {
            Assert.Equal(e.Length, a.Length);
            double s = Math.Max(Scale(e), over ?? 0);
            for (int i = 0; i < e.Length; i++)
                Assert.True(Math.Abs(e[i] - a[i]) <= tol * (s + Math.Abs(e[i])), $"{what}: {part}[{i}] {a[i]:R} vs op-by-op {e[i]:R}");
        }
        Assert.True(Math.Abs(expected.Loss - actual.Loss) <= tol * (1e-300 + Math.Abs(expected.Loss) + Scale(expected.PerToken)), $"{what}: loss {actual.Loss:R} vs {expected.Loss:R}");
        Close(expected.PerToken, actual.PerToken, "per-token");
        Close(expected.PerSequence, actual.PerSequence, "per-sequence", Scale(expected.PerToken));
        Close(expected.GradL, actual.GradL, "dL/dl");
        if (expected.GradH is not null) Close(expected.GradH, actual.GradH!, "dL/dH");
        else Assert.Null(actual.GradH);
        Assert.Equal(expected.Metrics.Keys, actual.Metrics.Keys);
        foreach (var (key, value) in expected.Metrics)
            Assert.True(Math.Abs(actual.Metrics[key] - value) <= tol * (1 + Math.Abs(value)), $"{what}: {key} {actual.Metrics[key]:R} vs {value:R}");
    }

    [Theory, MemberData(nameof(Objectives))]
    public void The_fused_pass_equals_the_op_by_op_path_over_random_batches_and_options(string name)
    {
        var rng = new Random(name.GetHashCode(StringComparison.Ordinal) & 0xFFFF);
        for (int trial = 0; trial < 60; trial++)
        {
            var x = RandomCase(rng, 1 + rng.Next(7), 1 + rng.Next(13));
            var extras = RandomExtras(rng);
            var dtype = trial % 3 == 2 ? ScalarType.Float32 : ScalarType.Float64;
            bool tokenAdvantages = rng.Next(2) == 0, withOld = rng.Next(4) != 0;
            var mask = (MaskKind)rng.Next(3);
            var window = rng.Next(3) == 0 ? new TokenWindow { Tokens = 50 + rng.Next(50), Sequences = 9 + rng.Next(5), DataParallelSize = 1 + rng.Next(3), MicroBatches = 1 + rng.Next(2) } : null;
            string what = $"{name} trial {trial} {dtype} N {x.N} T {x.T} token advantages {tokenAdvantages} old {withOld} mask {mask} window {window is not null}, {extras}";
            (TokenBatch, Tensor, Tensor?) Make() { var b = Batch(x, dtype, tokenAdvantages, withOld, extras, mask, window, out var leaf, out var h); return (b, leaf, h); }
            // the reference: op by op in float64 on the same values (the fused pass computes in float64 too; float32 op by op
            // loses digits where the KL's exp(u) - u - 1 cancels)
            (TokenBatch, Tensor, Tensor?) Reference() { var b = Batch(x, dtype, tokenAdvantages, withOld, extras, mask, window, out var leaf, out var h, inFloat64: true); return (b, leaf, h); }
            Outcome plain, fused;
            try { plain = Run(FusedPolicyTests.Make(name, extras, fused: false), Reference); }
            catch (Exception refused) when (refused is ArgumentException or ArithmeticException)
            {
                // e.g. a batch without a valid token and an IS-ratio metric (min over nothing): the fused path refuses it the same way
                var opByOp = Assert.ThrowsAny<Exception>(() => Run(FusedPolicyTests.Make(name, extras, fused: false), Make));
                var same = Assert.ThrowsAny<Exception>(() => Run(FusedPolicyTests.Make(name, extras, fused: true), Make));
                Assert.Equal(opByOp.GetType(), same.GetType());
                Assert.Equal(opByOp.Message.Replace("FusedCpu = False", ""), same.Message.Replace("FusedCpu = True", ""));
                continue;
            }
            int before = FusedPolicyPass.CompletedOnThisThread;
            fused = Run(FusedPolicyTests.Make(name, extras, fused: true), Make);
            Assert.True(FusedPolicyPass.CompletedOnThisThread == before + 1 || x.Valid.Cast<bool>().All(v => !v), $"{what}: the fused path did not run");
            AssertClose(plain, fused, dtype == ScalarType.Float64 ? 1e-12 : 1e-5, what);
        }
    }

    /// <summary>A user's loss: PPO's unclipped surrogate -rho A, with its term also given as a <see cref="TokenLink"/>.</summary>
    sealed record UnclippedOptions : PolicyGradientOptions
    {
        protected override TokenReduction DefaultReduction => TokenReduction.SequenceMeanTokenMean;
    }

    sealed class UnclippedPolicyLoss(UnclippedOptions options, bool withLink) : PolicyGradientLoss<UnclippedOptions>(options)
    {
        public override string Name => "unclipped";

        protected override (Tensor PerToken, bool SequenceLevel) PolicyTerm(TokenTerms terms, Tensor logRatio, List<(string Name, Tensor Value)> metrics) =>
            (-(Ratio(terms, logRatio, ImportanceRatio.Token) * terms.Advantages!), false);

        protected override TokenLink? Link => withLink
            ? TokenLink.FromFunction((l, r, c, a) =>
            {
                double rho = Math.Exp(r);
                return (-rho * a, -rho * a * c);
            })
            : null;
    }

    [Fact]
    public void A_users_term_from_a_function_takes_the_fused_pass_and_equals_its_own_policy_term()
    {
        var rng = new Random(77);
        for (int trial = 0; trial < 30; trial++)
        {
            var x = RandomCase(rng, 1 + rng.Next(6), 1 + rng.Next(11));
            if (x.Valid.Cast<bool>().All(v => !v)) continue;
            var extras = RandomExtras(rng) with { Quantile = 1 };
            var dtype = trial % 2 == 0 ? ScalarType.Float64 : ScalarType.Float32;
            var options = new UnclippedOptions { Kl = extras.Kl, RolloutCorrection = extras.Rollout, EntropyCoefficient = extras.EntropyCoefficient, LogRatioClamp = extras.Clamp };
            (TokenBatch, Tensor, Tensor?) Make() { var b = Batch(x, dtype, false, true, extras, MaskKind.Bool, null, out var leaf, out var h); return (b, leaf, h); }
            (TokenBatch, Tensor, Tensor?) Reference() { var b = Batch(x, dtype, false, true, extras, MaskKind.Bool, null, out var leaf, out var h, inFloat64: true); return (b, leaf, h); }
            Outcome plain;
            try { plain = Run(new UnclippedPolicyLoss(options, withLink: false), Reference); }
            catch (Exception e) when (e is ArgumentException or ArithmeticException) { continue; }
            int before = FusedPolicyPass.CompletedOnThisThread;
            var fused = Run(new UnclippedPolicyLoss(options, withLink: true), Make);
            Assert.Equal(before + 1, FusedPolicyPass.CompletedOnThisThread);
            AssertClose(plain, fused, dtype == ScalarType.Float64 ? 1e-12 : 1e-5, $"user's term, trial {trial} {dtype}, {extras}");
        }
        Assert.Throws<ArgumentException>(() => TokenLink.FromFunction((l, r, c, a) => (0, 0), ImportanceRatio.SequenceMean));
    }

    sealed class ThrowingTermLoss(UnclippedOptions options) : PolicyGradientLoss<UnclippedOptions>(options)
    {
        public override string Name => "throwing";

        protected override (Tensor PerToken, bool SequenceLevel) PolicyTerm(TokenTerms terms, Tensor logRatio, List<(string Name, Tensor Value)> metrics) =>
            (-(terms.Advantages! * terms.LogProbs), false);

        protected override TokenLink? Link => TokenLink.FromFunction((l, r, c, a) => l < -2 ? throw new InvalidOperationException("the user's term refused") : (-a * l, -a));
    }

    [Fact]
    public void A_users_term_that_throws_surfaces_its_own_exception_on_any_thread_count()
    {
        var x = RandomCase(new Random(4), 96, 300);                   // enough work for the rows to run in parallel
        int threads = torch.get_num_threads();
        try
        {
            foreach (int count in new[] { 1, Math.Max(2, threads) })
            {
                torch.set_num_threads(count);
                using var scope = NewDisposeScope();
                var batch = Batch(x, ScalarType.Float32, false, true, new Extras(), MaskKind.Bool, null, out _, out _);
                var e = Assert.Throws<InvalidOperationException>(() => new ThrowingTermLoss(new UnclippedOptions()).Compute(batch));
                Assert.Equal("the user's term refused", e.Message);
            }
        }
        finally
        {
            torch.set_num_threads(threads);
        }
    }

    [Fact]
    public void A_mask_counts_where_it_is_nonzero_in_its_own_dtype()
    {
        // float64 mask values that float32 would round to 0, negative ones, and int32: valid exactly where mask != 0
        var x = RandomCase(new Random(9), 4, 7);
        var extras = new Extras(new KlPenalty(0.1));
        foreach (var make in new Func<Tensor, Tensor>[]
                 {
                     v => v.to_type(ScalarType.Float64) * 1e-50, v => -v.to_type(ScalarType.Float64), v => v.to_type(ScalarType.Int32),
                 })
        {
            (TokenBatch, Tensor, Tensor?) Make()
            {
                var b = Batch(x, ScalarType.Float32, false, true, extras, MaskKind.Bool, null, out var leaf, out var h);
                return (new TokenBatch(b.LogProbs, make(b.Mask)) { OldLogProbs = b.OldLogProbs, ReferenceLogProbs = b.ReferenceLogProbs, Advantages = b.Advantages }, leaf, h);
            }
            var plain = Run(FusedPolicyTests.Make("grpo", extras, false), Make);
            int before = FusedPolicyPass.CompletedOnThisThread;
            var fused = Run(FusedPolicyTests.Make("grpo", extras, true), Make);
            Assert.Equal(before + 1, FusedPolicyPass.CompletedOnThisThread);
            AssertClose(plain, fused, 1e-5, "grpo with an unusual mask");
        }
    }

    [Fact]
    public void Bfloat16_inputs_are_upcast_in_the_pass_as_op_by_op()
    {
        var rng = new Random(5);
        var x = RandomCase(rng, 6, 11);
        var extras = new Extras(new KlPenalty(0.1), new RolloutCorrection(RolloutCorrectionLevel.Token, RolloutCorrectionMode.Truncate), 1, 0.05, 20, true);
        (TokenBatch, Tensor, Tensor?) Make() { var b = Batch(x, ScalarType.BFloat16, false, true, extras, MaskKind.Bool, null, out var leaf, out var h); return (b, leaf, h); }
        var plain = Run(FusedPolicyTests.Make("grpo", extras, false), Make);      // both upcast to float32; the gradients are bfloat16
        var fused = Run(FusedPolicyTests.Make("grpo", extras, true), Make);
        AssertClose(plain, fused, 1e-5, "grpo bfloat16");
    }

    [Fact]
    public void Gmpo_and_packed_batches_run_op_by_op()
    {
        const string name = "gmpo";
        using var scope = NewDisposeScope();
        var x = RandomCase(new Random(3), 4, 6);
        var loss = PolicyLosses.Create(name);
        var batch = Batch(x, ScalarType.Float64, false, true, new Extras(), MaskKind.Bool, null, out _, out _);
        int before = FusedPolicyPass.CompletedOnThisThread;
        using (loss.Compute(batch)) { }
        Assert.Equal(before, FusedPolicyPass.CompletedOnThisThread);
        using (PolicyLosses.Create("grpo").Compute(batch)) { }
        Assert.Equal(before + 1, FusedPolicyPass.CompletedOnThisThread);
        // a packed batch: one row with boundaries
        var packed = new TokenBatch(tensor(new[] { -1.0, -2.0, -0.5, -0.7 }).reshape(1, 4).requires_grad_(true), ones(1, 4, dtype: ScalarType.Bool))
        {
            Advantages = tensor(new[] { 1.0, -1.0 }),
            Boundaries = SequenceBoundaries.FromLengths(new long[] { 2, 2 }),
        };
        using (PolicyLosses.Create("grpo").Compute(packed)) { }
        Assert.Equal(before + 1, FusedPolicyPass.CompletedOnThisThread);
    }

    public static IEnumerable<object[]> BadBatches() => new[] { "nan_logprob", "positive_logprob", "nan_advantage", "nan_old", "inf_reference", "nan_mask" }
        .Select(n => new object[] { n });

    [Theory, MemberData(nameof(BadBatches))]
    public void A_failed_check_reruns_op_by_op_and_throws_the_same_error(string bad)
    {
        var extras = new Extras(new KlPenalty(0.1), null);
        Exception Throw(bool fused)
        {
            using var scope = NewDisposeScope();
            var x = RandomCase(new Random(11), 3, 5);
            x.Valid[0, 0] = true;
            x.L[0, 0] = bad switch { "nan_logprob" => double.NaN, "positive_logprob" => 0.5, _ => -1.0 };
            if (bad == "nan_advantage") x.SeqAdv[0] = double.NaN;
            if (bad == "nan_old") x.Old[0, 0] = double.NaN;
            if (bad == "inf_reference") x.Ref[0, 0] = double.PositiveInfinity;
            var batch = Batch(x, ScalarType.Float32, false, true, extras, bad == "nan_mask" ? MaskKind.Float : MaskKind.Bool, null, out _, out _);
            if (bad == "nan_mask") batch = new TokenBatch(batch.LogProbs, batch.Mask.index_put_(tensor(float.NaN), tensor(0L), tensor(0L)))
            {
                OldLogProbs = batch.OldLogProbs, ReferenceLogProbs = batch.ReferenceLogProbs, Advantages = batch.Advantages,
            };
            return Assert.ThrowsAny<Exception>(() => Make("grpo", extras, fused).Compute(batch));
        }
        var (plain, fused) = (Throw(false), Throw(true));
        Assert.Equal(plain.GetType(), fused.GetType());
        Assert.Equal(plain.Message, fused.Message);
    }

    [Fact]
    public void The_result_does_not_depend_on_the_thread_count()
    {
        var rng = new Random(21);
        var x = RandomCase(rng, 96, 300);                             // enough work for the rows to run in parallel
        var extras = new Extras(new KlPenalty(0.04), new RolloutCorrection(RolloutCorrectionLevel.Sequence, RolloutCorrectionMode.Mask), 0.5, 0.01, 20, true);
        (TokenBatch, Tensor, Tensor?) Make() { var b = Batch(x, ScalarType.Float32, false, true, extras, MaskKind.Bool, null, out var leaf, out var h); return (b, leaf, h); }
        int threads = torch.get_num_threads();
        try
        {
            torch.set_num_threads(1);
            var one = Run(FusedPolicyTests.Make("grpo", extras, true), Make);
            torch.set_num_threads(Math.Max(2, threads));
            var many = Run(FusedPolicyTests.Make("grpo", extras, true), Make);
            Assert.Equal(one.PerToken, many.PerToken);
            Assert.Equal(one.GradL, many.GradL);
            Assert.Equal(one.GradH, many.GradH);
            Assert.Equal(one.Metrics, many.Metrics);
        }
        finally
        {
            torch.set_num_threads(threads);
        }
    }

    [Fact]
    public void The_fused_graph_is_a_handful_of_tensors_and_leaks_nothing()
    {
        var x = RandomCase(new Random(8), 8, 16);
        var extras = new Extras(new KlPenalty(0.04), new RolloutCorrection(RolloutCorrectionLevel.Token, RolloutCorrectionMode.Truncate), 0.8, 0.01, 20, true);
        long Handles(bool fused)
        {
            using var scope = NewDisposeScope();
            var batch = Batch(x, ScalarType.Float32, false, true, extras, MaskKind.Bool, null, out _, out _);
            var loss = Make("grpo", extras, fused);
            var stats = DisposeScopeManager.Statistics;
            long before = stats.CreatedInScopeCount + stats.CreatedOutsideScopeCount;
            using (loss.Compute(batch)) { }
            return stats.CreatedInScopeCount + stats.CreatedOutsideScopeCount - before;
        }
        var (plain, fused) = (Handles(false), Handles(true));
        Assert.True(fused * 4 < plain, $"fused {fused} tensors, op by op {plain}");
        NoScopeMemoryTests.AssertFlat("fused grpo", () =>
        {
            var batch = Batch(x, ScalarType.Float32, false, true, extras, MaskKind.Bool, null, out _, out _);
            var loss = Make("grpo", extras, true);
            return () =>
            {
                using var r = loss.Compute(batch);
                r.Loss.backward();
            };
        }, iterations: 200);
    }
}
