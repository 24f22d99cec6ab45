using Alignment.Losses;
using FsCheck.Fluent;
using TorchSharp;

namespace Alignment.Losses.Tests;

/// <summary>
/// Native memory: only what a loss returns survives a call. RSS is process-wide, so this collection runs with no other
/// test in parallel (their allocations would otherwise count against the bound). 1,000 forward+backward calls of each loss in a caller's scope keep the thread's
/// live tensor count flat and the process RSS bounded; a loss inside a caller's scope leaves exactly its result there.
/// </summary>
[Collection("Memory")]
public class MemoryTests
{
    public static IEnumerable<object[]> OnePerLossClass => new[]
    {
        "dpo", "cdpo", "robust_dpo", "hinge", "ipo_per_token", "dpo_nll", "odpo", "spo", "sppo", "rpo", "rpo_diagonal", "rpo_unpaired",
        "exo_pair", "apo_down", "aot", "sft", "mpo", "cpo", "simpo", "alphapo", "orpo", "kto", "bco", "bradley_terry",
    }.Select(n => new object[] { n });

    [Theory, MemberData(nameof(OnePerLossClass))]
    public void A_thousand_forward_backward_calls_in_a_scope_leak_no_tensor_and_keep_rss_flat(string name)
    {
        var c = LossCatalog.Get(name);
        var x = Generators.One(32, 32);
        using var inputs = NewDisposeScope();
        var t = new BatchTensors(x, ScalarType.Float32);
        var batch = c.Batch(t);
        var loss = c.Make(x);
        void Step()
        {
            using var scope = NewDisposeScope();
            using var r = loss.Compute(batch);
            r.Loss.backward();
        }
        for (int i = 0; i < 200; i++) Step();                     // warm-up: allocator pools, JIT
        var stats = DisposeScopeManager.Statistics;
        long liveBefore = stats.ThreadTotalLiveCount;
        long rssBefore = ProcessMemory.Rss();
        for (int i = 0; i < 1_000; i++) Step();
        long rssGrowth = ProcessMemory.Rss() - rssBefore;
        Assert.Equal(liveBefore, stats.ThreadTotalLiveCount);
        Assert.True(rssGrowth < 64L << 20, $"{name}: RSS grew by {rssGrowth / (1 << 20)} MiB over 1,000 calls");
    }

    [Fact]
    public void Inside_a_caller_scope_only_the_result_remains()
    {
        var stats = DisposeScopeManager.Statistics;
        using var inputs = NewDisposeScope();
        var policy = new PreferenceLogps((randn(8) - 20).requires_grad_(true), (randn(8) - 20).requires_grad_(true));
        var reference = new PreferenceLogps(randn(8) - 20, randn(8) - 20);
        var embeddings = randn(8, 5);
        long before = stats.ThreadTotalLiveCount;
        using (var scope = NewDisposeScope())
        {
            var r = RpoLoss.Compute(policy, reference, embeddings);
            Assert.Equal(before + 3, stats.ThreadTotalLiveCount);    // loss, per-example losses, metrics
            _ = r.Metrics;                                           // reading the metrics leaves nothing behind
            Assert.Equal(before + 3, stats.ThreadTotalLiveCount);
            r.Loss.backward();
        }
        Assert.Equal(before, stats.ThreadTotalLiveCount);            // the caller's scope disposed the result
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Without_any_caller_scope_the_result_owns_its_tensors_and_dispose_frees_them(bool fused)
    {
        // a fresh thread has no dispose scope at all
        long created = -1, baseline = -1, liveAfterCall = -1, liveAfterDispose = -1;
        double loss = double.NaN;
        Exception? error = null;
        var thread = new Thread(() =>
        {
            try
            {
                var stats = DisposeScopeManager.Statistics;
                stats.Reset();
                using var chosen = tensor(Enumerable.Range(0, 8).Select(i => -1f - i).ToArray());
                using var rejected = tensor(Enumerable.Range(0, 8).Select(i => -2f - 0.5f * i).ToArray());
                baseline = stats.ThreadTotalLiveCount;                    // the two inputs
                var r = DpoLoss.Compute(new PreferenceLogps(chosen, rejected), options: new DpoOptions { FusedCpu = fused });
                liveAfterCall = stats.ThreadTotalLiveCount;
                created = stats.CreatedInScopeCount;
                loss = r.Loss.ToDouble();
                r.Dispose();
                liveAfterDispose = stats.ThreadTotalLiveCount;
            }
            catch (Exception e) { error = e; }                              // reported below, not a crashed test host
        });
        thread.Start();
        thread.Join();
        Assert.Null(error);
        Assert.True(double.IsFinite(loss));
        // op by op, the temporaries are created inside the loss's own scope (the fused pass, without grad, makes almost none)
        if (!fused) Assert.True(created > 3, "the loss creates its temporaries inside its own scope");
        Assert.Equal(baseline + 3, liveAfterCall);                   // only the 3 result tensors outlive the call
        Assert.Equal(baseline, liveAfterDispose);                    // and disposing the result frees them
    }

    /// <summary>
    /// RPO's [M, N] work is the memory limit on the largest batch: a forward+backward keeps W and S and at most one
    /// temporary (the similarity logits, the per-entry losses and the entropy's w ln w are freed as soon as they are
    /// reduced). Before that, about six [B, B] matrices were alive at the peak.
    /// </summary>
    [PeakMemoryFact]
    public void Rpo_peak_memory_is_at_most_four_batch_by_batch_matrices()
    {
        const int b = 4096;                                                    // large enough that fixed costs (~10 MiB) are small
        long matrix = 4L * b * b;                                              // one float32 [B, B]: 64 MiB
        using var scope = NewDisposeScope();
        manual_seed(0);
        var chosen = (rand(b) * -100).requires_grad_(true);
        var rejected = (rand(b) * -100).requires_grad_(true);
        var reference = new PreferenceLogps(rand(b) * -100, rand(b) * -100);
        var embeddings = PromptEmbeddings.Paired(randn(b, 64));
        using (var warm = RpoLoss.Compute(new PreferenceLogps(chosen.narrow(0, 0, 8), rejected.narrow(0, 0, 8)), null, PromptEmbeddings.Paired(randn(8, 64))))
            warm.Loss.backward();
        long before = ProcessMemory.Rss();
        ProcessMemory.ResetPeak();
        using (var r = RpoLoss.Compute(new PreferenceLogps(chosen, rejected), reference, embeddings))
            r.Loss.backward();
        double matrices = (ProcessMemory.PeakRss() - before) / (double)matrix;
        Assert.True(matrices <= 4.0, $"RPO at B = {b} grew the peak RSS by {matrices:F2} [B, B] matrices");
    }

    /// <summary>SequenceLogProbs: peak memory bounded by the chunk (moved here so no parallel test shares the process RSS).</summary>
    [PeakMemoryFact]
    public void Memory_stays_bounded_by_the_chunk_not_by_T_times_V()
    {
        // 2 x 4096 x 8192 fp32 logits = 256 MiB. A naive fp32 log_softmax would add another 256 MiB; the chunked path
        // (256 tokens x 8192 x 4 B = 8 MiB per temporary) must add far less than one copy of the logits.
        using var scope = NewDisposeScope();
        var logits = randn(2, 4096, 8192);
        var labels = randint(0, 8192, new long[] { 2, 4096 });
        long before = ProcessMemory.Rss();
        ProcessMemory.ResetPeak();
        using (var r = SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.Aligned, new SequenceLogProbsOptions { ChunkTokens = 256 }))
        {
            long extra = ProcessMemory.PeakRss() - before;
            Assert.True(extra < 64L << 20, $"forward peak grew by {extra >> 20} MiB for 256 MiB of logits");
        }
    }
}

[CollectionDefinition("Memory", DisableParallelization = true)]
public sealed class MemoryCollection { }
