using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>
/// Native memory without a caller's dispose scope: 400 forward+backward calls of every entry point, each result
/// disposed, keep the thread's live-tensor count exactly flat (the original backward passes left 7 to 20 handles per call
/// to the finalizer), and the same loop inside a scope per step is flat too. Then the gradient buffers: after backward,
/// a leaf's gradient is the library's buffer itself, not a copy of it beside the original.
/// </summary>
[Collection("Memory")]
public class NoScopeMemoryTests
{
    /// <summary>Runs <paramref name="step"/> on a fresh thread, which has no dispose scope at all, with and without a scope per step.</summary>
    internal static void AssertFlat(string what, Func<Action> setup, int iterations = 400)
    {
        foreach (bool scoped in new[] { false, true })
        {
            Exception? failure = null;
            var thread = new Thread(() =>
            {
                try
                {
                    var step = setup();
                    var stats = DisposeScopeManager.Statistics;
                    void Run()
                    {
                        if (!scoped) { step(); return; }
                        using var scope = NewDisposeScope();
                        step();
                    }
                    for (int i = 0; i < 20; i++) Run();                       // warm-up (lazy caches, allocator pools)
                    long before = stats.ThreadTotalLiveCount;
                    for (int i = 0; i < iterations; i++) Run();
                    long leaked = stats.ThreadTotalLiveCount - before;
                    Assert.True(leaked == 0, $"{what} ({(scoped ? "scope per step" : "no scope")}): {leaked} live tensors more after {iterations} calls");
                }
                catch (Exception e) { failure = e; }
            });
            thread.Start();
            thread.Join();
            if (failure is not null) throw new Xunit.Sdk.XunitException(failure.ToString());
        }
    }

    public static IEnumerable<object[]> Losses => MemoryTests.OnePerLossClass;

    [Theory, MemberData(nameof(Losses))]
    public void Every_loss_leaks_nothing_without_a_scope_when_the_result_is_disposed(string name) =>
        AssertFlat(name, () =>
        {
            var c = LossCatalog.Get(name);
            var x = Generators.One(8, 8);
            var batch = c.Batch(new BatchTensors(x, ScalarType.Float32));
            var loss = c.Make(x);
            return () =>
            {
                using var r = loss.Compute(batch);
                r.Loss.backward();
            };
        });

    [Theory, InlineData(true), InlineData(false)]
    public void Sequence_log_probs_leak_nothing_without_a_scope(bool fusedCpu) =>
        AssertFlat($"SequenceLogProbs, FusedCpu = {fusedCpu}", () =>
        {
            var logits = randn(4, 6, 11).requires_grad_(true);
            var labels = randint(0, 11, new long[] { 4, 6 });
            return () =>
            {
                // the CPU kernel or the chunked path, with the extras
                using var r = SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.ShiftByOne,
                    new SequenceLogProbsOptions { ChunkTokens = 4, FusedCpu = fusedCpu, StepStatistics = true, WpoTerms = true });
                using var total = r.Sum.sum();
                total.backward();
            };
        });

    [Fact]
    public void Fused_linear_log_probs_and_the_fused_loss_leak_nothing_without_a_scope()
    {
        Func<Action> Setup(bool loss, bool retain = false) => () =>
        {
            var hidden = randn(4, 5, 6).requires_grad_(true);
            var weight = randn(13, 6).requires_grad_(true);
            var bias = randn(13).requires_grad_(true);
            var labels = randint(0, 13, new long[] { 4, 5 });
            var reference = new PreferenceLogps(tensor(new[] { -20f, -25f }), tensor(new[] { -22f, -21f }));
            var dpo = new DpoLoss();
            return loss
                ? () =>
                {
                    using var r = FusedLinearLogProbs.ComputeLoss(dpo, hidden, weight, bias, labels, null, LabelAlignment.ShiftByOne, reference,
                        new SequenceLogProbsOptions { ChunkTokens = 3, RetainHeadLogits = retain });
                    r.Loss.backward();
                }
                : () =>
                {
                    using var r = FusedLinearLogProbs.Compute(hidden, weight, null, labels, null, LabelAlignment.Aligned,
                        new SequenceLogProbsOptions { ChunkTokens = 3, RetainHeadLogits = retain });
                    using var total = r.Sum.sum();
                    total.backward();
                };
        };
        AssertFlat("FusedLinearLogProbs.Compute", Setup(loss: false));
        AssertFlat("FusedLinearLogProbs.ComputeLoss", Setup(loss: true));
        AssertFlat("FusedLinearLogProbs.Compute, retained logits", Setup(loss: false, retain: true));
        AssertFlat("FusedLinearLogProbs.ComputeLoss, retained logits", Setup(loss: true, retain: true));
    }

    [Fact]
    public void Collator_packing_reference_cache_statistics_and_the_new_objectives_leak_nothing_without_a_scope()
    {
        var dir = Directory.CreateTempSubdirectory("alignment-noscope-");
        try
        {
            AssertFlat("data pipeline and objective families", () =>
            {
                var examples = new[]
                {
                    new Alignment.Losses.Data.PreferenceExample(new[] { 1, 2 }, new[] { 3, 4 }, new[] { 5 }),
                    new Alignment.Losses.Data.PreferenceExample(new[] { 6 }, new[] { 7 }, new[] { 8, 9, 2 }),
                };
                var collator = new Alignment.Losses.Data.PreferenceCollator(new Alignment.Losses.Data.PreferenceCollatorOptions { PadToMultipleOf = 4 });
                var table = randn(10, 10);
                var cache = Alignment.Losses.Data.ReferenceLogProbCache.Build(examples, collator,
                    b => SequenceLogProbs.Compute(table.index_select(0, b.InputIds.flatten()).view(b.InputIds.shape[0], b.InputIds.shape[1], 10), b.Labels, null, LabelAlignment.ShiftByOne),
                    Path.Combine(dir.FullName, Guid.NewGuid().ToString("N") + ".cache"), new Alignment.Losses.Data.ReferenceCacheOptions { Progress = null });
                var logits = randn(1, 16, 10).requires_grad_(true);   // 13 tokens padded to 16
                var baseline = new BcoRewardBaseline();
                var unpaired = PreferenceLogps.Unpaired((-rand(2) - 1).requires_grad_(true), (-rand(3) - 1).requires_grad_(true));
                var unpairedRef = PreferenceLogps.Unpaired(-rand(2) - 1, -rand(3) - 1);
                var counts = tensor(new[] { 3.0f, 4.0f });
                var paired = new PreferenceLogps(-(rand(2) + 1).requires_grad_(true), -(rand(2) + 1).requires_grad_(true), counts, counts);
                var losses = new (IPreferenceLoss Loss, PreferenceBatch Batch)[]
                {
                    (new CpoLoss(), new PreferenceBatch(paired)), (new AlphaPoLoss(), new PreferenceBatch(paired)), (new OrpoLoss(), new PreferenceBatch(paired) { Prompt = new PromptLogps(-rand(2), counts) }),
                    (new KtoLoss(), new PreferenceBatch(unpaired, unpairedRef) { KlDivergence = zeros(1) }), (new BcoLoss(baseline), new PreferenceBatch(unpaired, unpairedRef)),
                    (new BradleyTerryLoss(), new PreferenceBatch(new PreferenceLogps(randn(2).requires_grad_(true), randn(2).requires_grad_(true)))),
                };
                return () =>
                {
                    using (var padded = collator.Collate(examples))
                    {
                        var reference = cache.Lookup(padded);   // the caller owns the four tensors
                        foreach (var t in new[] { reference.Chosen, reference.Rejected, reference.ChosenTokenCounts!, reference.RejectedTokenCounts! }) t.Dispose();
                    }
                    using var packed = collator.CollatePacked(examples);
                    using (var mask = packed.Boundaries!.CausalAttentionMask(16)) { }
                    using (var positions = packed.Boundaries.PositionIds(16)) { }
                    using (var r = SequenceLogProbs.Compute(logits, packed.Labels, null, packed.Boundaries, LabelAlignment.ShiftByOne, new SequenceLogProbsOptions { StepStatistics = true }))
                    {
                        r.Statistics();
                        using var total = r.Sum.sum();
                        total.backward();
                    }
                    foreach (var (loss, batch) in losses)
                    {
                        using var result = loss.Compute(batch);
                        result.Loss.backward();
                    }
                };
            }, iterations: 200);
        }
        finally { dir.Delete(true); }
    }

    [Fact]
    public void Token_kl_listwise_spo_weighting_and_win_rates_leak_nothing_without_a_scope()
    {
        AssertFlat("TokenKl", () =>
        {
            var policy = randn(2, 3, 7).requires_grad_(true);
            var reference = randn(2, 3, 7);
            var mask = ones(2, 3);
            return () =>
            {
                using var kl = TokenKl.Compute(policy, reference, mask, chunkElements: 14);
                using var total = kl.sum();
                total.backward();
            };
        });
        AssertFlat("SpoLoss.ListwisePreference", () =>
        {
            var candidates = (randn(3, 4) - 10).requires_grad_(true);
            var best = tensor(new long[] { 0, 2, 1 });
            return () =>
            {
                using var loss = SpoLoss.ListwisePreference(candidates, best, 0.7);
                loss.backward();
            };
        });
        AssertFlat("CosineSoftmaxWeighting", () =>
        {
            var e = randn(5, 4);
            var weighting = new CosineSoftmaxWeighting(0.5);
            return () => weighting.ComputeWeights(e, e, ScalarType.Float32).Dispose();
        });
        AssertFlat("SppoWinRateEstimator", () =>
        {
            var scores = randn(3, 5, dtype: ScalarType.Float64);
            return () =>
            {
                var s = SppoWinRateEstimator.FromScores(scores);
                foreach (var t in new[] { s.ChosenIndex, s.RejectedIndex, s.WinRates.Chosen!, s.WinRates.Rejected!, s.AllWinRates }) t.Dispose();
            };
        });
        AssertFlat("SppoWinRateEstimator.FromPairwiseLogits", () =>
        {
            var logits = randn(3, 4, 4, dtype: ScalarType.Float64);
            return () =>
            {
                var s = SppoWinRateEstimator.FromPairwiseLogits(logits);
                foreach (var t in new[] { s.ChosenIndex, s.RejectedIndex, s.WinRates.Chosen!, s.WinRates.Rejected!, s.AllWinRates }) t.Dispose();
            };
        });
    }

    /// <summary>RSS growth from <paramref name="before"/>, in units of <paramref name="bytes"/>.</summary>
    static double Growth(long before, long bytes) => (ProcessMemory.Rss() - before) / (double)bytes;

    [Theory]
    [InlineData(LabelAlignment.Aligned)]
    [InlineData(LabelAlignment.ShiftByOne)]
    public void After_backward_a_leaf_logits_gradient_is_the_only_logits_sized_buffer(LabelAlignment alignment)
    {
        // 2 x 4096 x 8192 fp32 = 256 MiB of logits. Naive log_softmax + gather leaves one gradient buffer (+1.0x); the
        // original chunked path left its own buffer beside the copy libtorch made for .grad (+2.0x, +3.0x when shifted).
        using var scope = NewDisposeScope();
        var logits = randn(2, 4096, 8192).requires_grad_(true);
        var labels = randint(0, 8192, new long[] { 2, 4096 });
        long bytes = 4L * logits.numel();
        long before = ProcessMemory.Rss();
        using var r = SequenceLogProbs.Compute(logits, labels, null, alignment, new SequenceLogProbsOptions { ChunkTokens = 256 });
        using (var total = r.Sum.sum()) total.backward();
        double growth = Growth(before, bytes);
        Assert.True(growth < 1.25, $"{alignment}: after backward the process holds {growth:F2} logits-sized buffers more (expected one, the gradient)");
    }

    [Fact]
    public void After_backward_a_leaf_head_weight_gradient_is_the_only_weight_sized_buffer()
    {
        using var scope = NewDisposeScope();
        var weight = (randn(32768, 1024) * 0.02).requires_grad_(true);           // 128 MiB
        var hidden = randn(2, 16, 1024).requires_grad_(true);
        var labels = randint(0, 32768, new long[] { 2, 16 });
        long bytes = 4L * weight.numel();
        long before = ProcessMemory.Rss();
        using var r = FusedLinearLogProbs.Compute(hidden, weight, null, labels, null, LabelAlignment.ShiftByOne, new SequenceLogProbsOptions { ChunkTokens = 8 });
        using (var total = r.Sum.sum()) total.backward();
        double growth = Growth(before, bytes);
        Assert.True(growth < 1.25, $"after backward the process holds {growth:F2} weight-sized buffers more (expected one, the gradient)");
    }
}
