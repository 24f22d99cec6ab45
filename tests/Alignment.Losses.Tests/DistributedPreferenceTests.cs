using Alignment.Losses;
using Alignment.Losses.MpiRanks;

namespace Alignment.Losses.Tests;

/// <summary>
/// The sequence-pair losses over the whole data-parallel batch (GlobalBatch.Compute, spec §14): every batch-coupled loss
/// split over in-process ranks and unequal micro-batches equals the whole batch (ShardedPreferenceCheck, also run over MPI
/// by DistributedTests), the drop-in wrapper, and the failure modes, each thrown on every rank instead of leaving one waiting.
/// </summary>
public class DistributedPreferenceTests
{
    static T[] OnThreads<T>(int world, Func<ICollectives, T> body) => DistributedTests.OnThreads(world, body);

    public static IEnumerable<object[]> CasesAndWorlds() =>
        ShardedPreferenceCheck.Cases.SelectMany(c => new[] { 1, 2, 3, 5 }.Select(w => new object[] { c.Name, w }));

    [Theory]
    [MemberData(nameof(CasesAndWorlds))]
    public void A_batch_coupled_loss_split_across_ranks_and_micro_batches_equals_the_whole_batch(string name, int world)
    {
        var c = ShardedPreferenceCheck.Cases.Single(x => x.Name == name);
        foreach (var (ok, line) in OnThreads(world, r => ShardedPreferenceCheck.RunCase(r, c))) Assert.True(ok, line);
    }

    [Fact]
    public void The_rpo_contrast_of_a_split_batch_is_not_the_mean_of_per_rank_contrasts()
    {
        // the check above would pass vacuously if every rank's loss only saw its own rows: the per-rank computation differs
        using var scope = NewDisposeScope();
        var x = ShardedPreferenceCheck.Inputs.Make(8, 8, 0, seed: 3);
        var c = ShardedPreferenceCheck.Cases.Single(k => k.Name == "rpo paired");
        var all = arange(8);
        double whole;
        using (var r = c.Loss().Compute(c.Batch(x, new(all, all, arange(0), all)))) whole = r.Loss.ToDouble();
        double perRank = 0;
        foreach (var half in new[] { arange(0, 4), arange(4, 8) })
            using (var r = c.Loss().Compute(c.Batch(x, new(half, half, arange(0), half)))) perRank += r.Loss.ToDouble() / 2;
        Assert.True(Math.Abs(whole - perRank) > 1e-4, $"{whole} vs {perRank}");
    }

    [Fact]
    public void The_wrapper_runs_an_unchanged_training_step_data_parallel()
    {
        // 2 ranks, each wrapping its loss once; a linear "policy" whose parameters are replicated, gradients averaged
        var results = OnThreads(2, c =>
        {
            using var scope = NewDisposeScope();
            var g = new Generator(11);
            var features = randn(new long[] { 12, 3 }, generator: g, dtype: ScalarType.Float64);
            var embeddings = randn(new long[] { 6, 4 }, generator: g, dtype: ScalarType.Float64);
            var weight = tensor(new[] { 0.3, -0.2, 0.1 }, dtype: ScalarType.Float64).requires_grad_(true);
            Tensor Logps(Tensor rows) => -(features.index_select(0, rows).matmul(weight)).exp();
            var loss = new RpoLoss();
            // the whole batch: 6 pairs (chosen rows 0-5, rejected rows 6-11)
            using (var r = loss.Compute(new PreferenceBatch(new PreferenceLogps(Logps(arange(6)), Logps(arange(6, 12)))) { PromptEmbeddings = PromptEmbeddings.Paired(embeddings) }))
                r.Backward();
            var expected = weight.grad!.clone();
            weight.grad = null;
            // this rank's 3 pairs through the wrapper
            var mine = arange(3 * c.Rank, 3 * c.Rank + 3);
            var parallel = loss.AcrossRanks(c);
            using var result = parallel.Compute(new PreferenceBatch(new PreferenceLogps(Logps(mine), Logps(mine + 6))) { PromptEmbeddings = PromptEmbeddings.Paired(embeddings.index_select(0, mine)) });
            result.Backward();
            c.AverageGradients(new[] { weight });
            double error = (weight.grad! - expected).abs().max().ToDouble();
            return (error < 1e-13 && parallel.Name == "rpo", $"rank {c.Rank}: {error:E2}");
        });
        foreach (var (ok, line) in results) Assert.True(ok, line);
    }

    [Fact]
    public void Without_averaging_the_surrogate_carries_the_plain_global_gradient()
    {
        var results = OnThreads(2, c =>
        {
            using var scope = NewDisposeScope();
            var chosen = tensor(new[] { -1.0 - c.Rank }, dtype: ScalarType.Float64).requires_grad_(true);
            var rejected = tensor(new[] { -2.0 + c.Rank * 0.5 }, dtype: ScalarType.Float64).requires_grad_(true);
            using var averaged = GlobalBatch.Compute(c, new DpoLoss(), new PreferenceBatch(new PreferenceLogps(chosen, rejected)));
            averaged.Backward();
            var a = chosen.grad!.ToDouble();
            chosen.grad = null;
            using var summed = GlobalBatch.Compute(c, new DpoLoss(), new PreferenceBatch(new PreferenceLogps(chosen, rejected)), gradientsAveraged: false);
            summed.Backward();
            var s = chosen.grad!.ToDouble();
            return (Math.Abs(a - 2 * s) < 1e-15 && Math.Abs(averaged.Loss.ToDouble() - summed.Loss.ToDouble()) == 0, $"{a} vs {s}");
        });
        foreach (var (ok, line) in results) Assert.True(ok, line);
    }

    static PreferenceBatch Rpo(long rows, long d, ScalarType dtype = ScalarType.Float32) =>
        new(new PreferenceLogps(-rand(rows, dtype: dtype) - 1, -rand(rows, dtype: dtype) - 1)) { PromptEmbeddings = PromptEmbeddings.Paired(randn(rows, d)) };

    [Fact]
    public void Inputs_that_disagree_across_ranks_fail_identically_on_every_rank()
    {
        // a different embedding size, a reference on one rank only, another dtype, a weight matrix of the wrong width
        var cases = new (string Expected, Func<ICollectives, PreferenceBatch> Batch)[]
        {
            ("values per row", c => Rpo(3, c.Rank == 0 ? 4 : 5)),
            ("is given in", c => c.Rank == 0 ? Rpo(3, 4) : Rpo(3, 4) with { Reference = new PreferenceLogps(-ones(3), -ones(3)) }),
            ("Float64", c => Rpo(3, 4, c.Rank == 0 ? ScalarType.Float32 : ScalarType.Float64)),
            ("columns", c => new PreferenceBatch(new PreferenceLogps(-ones(2), -ones(2))) { RpoWeights = ones(2, 2) }),
        };
        foreach (var (expected, batch) in cases)
        {
            var messages = OnThreads(2, c =>
            {
                using var scope = NewDisposeScope();
                return Assert.Throws<ArgumentException>(() => GlobalBatch.Compute(c, new RpoLoss(), batch(c))).Message;
            });
            Assert.All(messages, m => Assert.Contains(expected, m));
            Assert.Equal(messages[0], messages[1]);
        }
    }

    [Fact]
    public void A_rank_that_cannot_read_its_batch_throws_its_error_and_the_others_name_it()
    {
        var errors = OnThreads(3, c =>
        {
            using var scope = NewDisposeScope();
            var batch = Rpo(2, 3);
            if (c.Rank == 1) batch.Policy.Chosen.Dispose();
            try { GlobalBatch.Compute(c, new RpoLoss(), batch); return "no error"; }
            catch (Exception e) { return e.GetType().Name + ": " + e.Message; }
        });
        Assert.Contains("policy.Chosen", errors[1]);
        Assert.Contains("rank 1 of 3 could not read its preference batches", errors[0]);
        Assert.Equal(errors[0], errors[2]);
    }

    [Fact]
    public void A_loss_error_in_the_global_batch_is_thrown_on_every_rank_and_says_where()
    {
        var errors = OnThreads(2, c =>
        {
            using var scope = NewDisposeScope();
            var batch = Rpo(3, 4);
            if (c.Rank == 1) batch = batch with { Policy = new PreferenceLogps(batch.Policy.Chosen, tensor(new[] { -1f, float.NaN, -2f })) };
            var e = Assert.Throws<ArgumentException>(() => GlobalBatch.Compute(c, new RpoLoss(), batch));
            return (e.ParamName, e.Message);
        });
        Assert.All(errors, e => Assert.Equal("policy.Rejected", e.ParamName));
        Assert.All(errors, e => Assert.Contains("in the global batch of 2 micro-batch(es) from 2 rank(s)", e.Message));
        // an unpaired RPO micro-batch may have an empty side; the global batch needs both
        var empty = OnThreads(2, c =>
        {
            using var scope = NewDisposeScope();
            var batch = new PreferenceBatch(PreferenceLogps.Unpaired(-ones(2), -ones(0))) { PromptEmbeddings = PromptEmbeddings.Unpaired(randn(2, 3), randn(0, 3)) };
            return Assert.Throws<ArgumentException>(() => GlobalBatch.Compute(c, new RpoLoss(), batch)).Message;
        });
        Assert.All(empty, m => Assert.Contains("at least one chosen and one rejected", m));
    }

    [Fact]
    public void The_results_own_their_tensors_and_leave_none_behind_with_or_without_a_scope() =>
        NoScopeMemoryTests.AssertFlat("GlobalBatch.Compute (RPO)", () =>
        {
            var ranks = Collectives.InProcess(1);
            var batch = Rpo(4, 3);
            var policy = new PreferenceLogps(batch.Policy.Chosen.requires_grad_(true), batch.Policy.Rejected.requires_grad_(true));
            batch = batch with { Policy = policy };
            return () =>
            {
                using (var r = GlobalBatch.Compute(ranks[0], new RpoLoss(), batch))
                {
                    r.Backward();
                    _ = r.Metrics;
                }
                policy.Chosen.grad = null;
                policy.Rejected.grad = null;
            };
        }, iterations: 200);
}
