using System.Diagnostics;
using Alignment.Losses;
using Alignment.Losses.MpiRanks;

namespace Alignment.Losses.Tests;

/// <summary>Runs where MPICH's launcher is installed (Debian: apt-get install mpich; .ci/run installs it); skipped with the reason otherwise.</summary>
public sealed class MpiFactAttribute : FactAttribute
{
    public MpiFactAttribute()
    {
        if (DistributedTests.Mpiexec.Value is null)
            Skip = "mpiexec.mpich is not installed here (apt-get install mpich provides it); the multi-process MPI tests run where it is.";
    }
}

/// <summary>
/// Batch statistics across ranks (spec §14): the same sharded GRPO check on in-process ranks (threads) and on real MPI
/// processes (mpiexec.mpich -n 2 and 4 on localhost), the window counter, gradient averaging, and the failure modes: a
/// wrong world size and a dead rank end with clear errors instead of hanging.
/// </summary>
[Collection("Processes")]
public class DistributedTests
{
    internal static readonly Lazy<string?> Mpiexec = new(() =>
        Environment.GetEnvironmentVariable("PATH")?.Split(Path.PathSeparator).Select(d => Path.Combine(d, "mpiexec.mpich")).FirstOrDefault(File.Exists));

    /// <summary>Runs <paramref name="body"/> on <paramref name="world"/> in-process ranks, one thread each, and returns each rank's result.</summary>
    internal static T[] OnThreads<T>(int world, Func<ICollectives, T> body)
    {
        var ranks = Collectives.InProcess(world, TimeSpan.FromSeconds(30));
        var results = new T[world];
        var failures = new Exception?[world];
        var threads = Enumerable.Range(0, world).Select(r => new Thread(() =>
        {
            try { results[r] = body(ranks[r]); }
            catch (Exception e) { failures[r] = e; }
        })).ToArray();
        foreach (var t in threads) t.Start();
        foreach (var t in threads) t.Join();
        // the first rank that failed on its own, before those that timed out waiting for it
        if (failures.OrderBy(f => f is TimeoutException).FirstOrDefault(f => f is not null) is { } failure) throw new Xunit.Sdk.XunitException(failure.ToString());
        return results;
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(5)]
    public void A_batch_split_across_in_process_ranks_and_micro_batches_gives_the_whole_batch(int world)
    {
        foreach (var (ok, line) in OnThreads(world, ShardedGrpoCheck.Run)) Assert.True(ok, line);
    }

    [Fact]
    public void The_window_counter_sums_tokens_and_sequences_over_micro_batches_and_ranks()
    {
        var windows = OnThreads(2, c =>
        {
            using var scope = NewDisposeScope();
            // rank 0: lengths 2, 0 | 3; rank 1: lengths 1 | 4, 4 (one empty sequence in all)
            Tensor Mask(params int[] lengths) => arange(5).unsqueeze(0) < tensor(lengths.Select(l => (long)l).ToArray()).unsqueeze(1);
            var masks = c.Rank == 0 ? new[] { Mask(2, 0), Mask(3) } : new[] { Mask(1), Mask(4, 4) };
            var w = GlobalBatch.CountWindow(masks, c);
            var all = GlobalBatch.CountWindow(masks, c, countEmptySequences: true, gradientsAveraged: false);
            return (w.Tokens == 14 && w.Sequences == 5 && w.DataParallelSize == 2 && w.MicroBatches == 2 && all.Sequences == 6 && all.DataParallelSize == 1,
                $"{w} / {all}");
        });
        foreach (var (ok, line) in windows) Assert.True(ok, line);
        using var scope = NewDisposeScope();
        var e = Assert.Throws<ArgumentException>(() => GlobalBatch.CountWindow(new[] { zeros(2, 3) }));
        Assert.Contains("no valid token", e.Message);
        Assert.Throws<ArgumentException>(() => GlobalBatch.CountWindow(Array.Empty<Tensor>()));
    }

    [Fact]
    public void Contiguous_groups_cut_by_a_rank_are_refused_and_ids_may_span_ranks()
    {
        var results = OnThreads(2, c =>
        {
            using var scope = NewDisposeScope();
            var rewards = c.Rank == 0 ? tensor(new[] { 1.0, 0, 1 }) : tensor(new[] { 0.0 });
            var e = Assert.Throws<ArgumentException>(() => GlobalBatch.Advantages(c, rewards, GroupIds.Contiguous(2), (r, g) => Advantages.Grpo(r, g)));
            // the same rows as one prompt's group of 4 by id: the advantages of [1, 0, 1, 0] in one group
            using var a = GlobalBatch.Advantages(c, rewards, GroupIds.FromIds(c.Rank == 0 ? new long[] { 7, 7, 7 } : new long[] { 7 }), (r, g) => Advantages.Grpo(r, g));
            var values = TensorUtil.Values(a.Values);
            bool ok = e.Message.Contains("rank 0 holds 3 completions") && values.All(v => Math.Abs(Math.Abs(v) - 0.865875) < 1e-6)
                      && a.Metrics[MetricNames.Reward] == 0.5;
            return (ok, $"{e.Message} / {string.Join(", ", values)}");
        });
        foreach (var (ok, line) in results) Assert.True(ok, line);
    }

    [Fact]
    public void Averaging_gradients_gives_every_rank_the_mean()
    {
        var results = OnThreads(3, c =>
        {
            using var scope = NewDisposeScope();
            var p = zeros(2, 2).requires_grad_(true);
            var q = zeros(3).requires_grad_(true);                       // no rank has a gradient: it stays without one
            (p * (c.Rank + 1)).sum().backward();
            c.AverageGradients(new[] { p, q });
            return (p.grad!.allclose(full(2, 2, 2.0f)) && q.grad is null, $"{p.grad}");
        });
        foreach (var (ok, line) in results) Assert.True(ok, line);
    }

    [Fact]
    public void Kto_with_the_global_reference_point_gives_the_whole_batch_across_ranks_and_micro_batches()
    {
        using var scope = NewDisposeScope();
        var g = new Generator(3);
        Tensor R(long n) => -1 - 5 * rand(new long[] { n }, generator: g, dtype: ScalarType.Float64);
        var (chosen, rejected, refChosen, refRejected) = (R(6), R(4), R(6), R(4));
        var (mPolicy, mReference) = (R(10), R(10));        // the 10 mismatched pairs, as the collator builds them per example
        var kto = new KtoLoss(new KtoOptions { Beta = 0.2 });
        PreferenceBatch Batch(Tensor c, Tensor r, Tensor rc, Tensor rr, Tensor? z0, MismatchedLogps? m) =>
            new(PreferenceLogps.Unpaired(c, r), PreferenceLogps.Unpaired(rc, rr)) { Mismatched = m, KlDivergence = z0 };
        double whole;
        using (var r = kto.Compute(Batch(chosen, rejected, refChosen, refRejected, null, new MismatchedLogps(mPolicy, mReference)))) whole = r.Loss.ToDouble();

        // 2 ranks x 2 micro-batches: rank 0 holds chosen 0-3 and rejected 0-1, rank 1 the rest; mismatched pairs split alike
        var results = OnThreads(2, c =>
        {
            using var inner = NewDisposeScope();
            var parts = c.Rank == 0
                ? new[] { (C: (0, 1), Rj: (0, 1), M: (0, 2)), (C: (1, 3), Rj: (1, 1), M: (2, 4)) }
                : new[] { (C: (4, 2), Rj: (2, 0), M: (6, 2)), (C: (6, 0), Rj: (2, 2), M: (8, 2)) };
            var z0 = GlobalBatch.KtoReferencePoint(c, parts.Select(p => new MismatchedLogps(mPolicy.narrow(0, p.M.Item1, p.M.Item2), mReference.narrow(0, p.M.Item1, p.M.Item2))));
            double share = 0;
            foreach (var p in parts)
            {
                using var r = kto.Compute(Batch(chosen.narrow(0, p.C.Item1, p.C.Item2), rejected.narrow(0, p.Rj.Item1, p.Rj.Item2),
                    refChosen.narrow(0, p.C.Item1, p.C.Item2), refRejected.narrow(0, p.Rj.Item1, p.Rj.Item2), z0, null));
                share += r.Loss.ToDouble() * (p.C.Item2 + p.Rj.Item2) / 10.0;    // this micro-batch's share of the window's 10 examples
            }
            double total = c.AllReduceSum(new[] { share })[0];
            return (Math.Abs(total - whole) < 1e-12, $"rank {c.Rank}: {total:R} vs {whole:R}");
        });
        foreach (var (ok, line) in results) Assert.True(ok, line);
    }

    [Fact]
    public void The_bco_baseline_advances_once_per_step_with_the_global_mean_identically_on_every_rank()
    {
        var all = new[] { 0.5, -1.0, 2.0, 0.25, 1.5 };
        var single = new BcoRewardBaseline();
        single.Update(all);
        var results = OnThreads(2, c =>
        {
            using var scope = NewDisposeScope();
            var baseline = new BcoRewardBaseline { Training = false };
            GlobalBatch.AdvanceBaseline(c, baseline, tensor(c.Rank == 0 ? all.Take(2).ToArray() : all.Skip(2).ToArray()));
            return (Math.Abs(baseline.Mean - single.Mean) < 1e-15 && baseline.Count == 5, $"rank {c.Rank}: {baseline.Mean} ({baseline.Count}) vs {single.Mean}");
        });
        foreach (var (ok, line) in results) Assert.True(ok, line);
    }

    [Fact]
    public void Metrics_computed_over_ranks_are_the_global_batchs_weighted_means_on_every_rank()
    {
        // what one accumulator sees for the whole batch
        var whole = new Metrics.MetricsAccumulator();
        var parts = new[] { ("loss", 1.0, 3.0), ("kl", 0.2, 3.0), ("loss", 2.0, 1.0), ("kl", 0.6, 1.0), ("loss", 4.0, 4.0), ("kl", 0.1, 4.0) };
        foreach (var (n, v, w) in parts) whole.Add(n, v, w);
        var s1 = new LogProbStatistics(2, 4, 1, 2, 0.5, 0.25, 2);
        var s2 = new LogProbStatistics(3, 6, 2, 3, 1.5, 0.75, 3);
        whole.Add(s1 + s2);
        var expected = whole.Compute();
        var results = OnThreads(2, c =>
        {
            var a = new Metrics.MetricsAccumulator();
            foreach (var (n, v, w) in c.Rank == 0 ? parts.Take(4) : parts.Skip(4)) a.Add(n, v, w);
            a.Add(c.Rank == 0 ? s1 : s2);
            var global = a.Flush(c);
            bool ok = global.Count == expected.Count && expected.All(kv => Math.Abs(global[kv.Key] - kv.Value) < 1e-15) && a.Count == 0;
            return (ok, string.Join(", ", global.Select(kv => $"{kv.Key}={kv.Value}")));
        });
        foreach (var (ok, line) in results) Assert.True(ok, line);
        // ranks reporting different metrics are told so
        var mismatch = OnThreads(2, c =>
        {
            var a = new Metrics.MetricsAccumulator();
            a.Add(c.Rank == 0 ? "loss" : "kl", 1);
            var e = Assert.Throws<InvalidOperationException>(() => a.Compute(c));
            return (e.Message.Contains("other metrics than rank 0"), e.Message);
        });
        foreach (var (ok, line) in mismatch) Assert.True(ok, line);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void The_top_entropy_quantile_over_ranks_is_the_whole_batchs_with_the_global_threshold(int world)
    {
        const int N = 12, T = 6;
        var loss = new ClippedPolicyLoss(new ClippedPolicyOptions { TopEntropyQuantile = 0.3, EntropyCoefficient = 0.01 });
        (Tensor LogProbs, Tensor Entropy, Tensor Mask, Tensor Advantages) Make()
        {
            var g = new Generator(5);
            var lengths = randint(1, T + 1, new long[] { N }, generator: g);
            var mask = arange(T).unsqueeze(0) < lengths.unsqueeze(1);
            var logProbs = (-0.05 - 2 * rand(new long[] { N, T }, generator: g, dtype: ScalarType.Float64)).requires_grad_(true);
            var entropy = (3 * rand(new long[] { N, T }, generator: g, dtype: ScalarType.Float64)).requires_grad_(true);
            return (logProbs, entropy, mask, randn(new long[] { N }, generator: g, dtype: ScalarType.Float64));
        }
        double whole;
        Tensor wholeGrad;
        using (var scope = NewDisposeScope())
        {
            var (l, h, m, a) = Make();
            using (var r = loss.Compute(new TokenBatch(l, m) { Entropy = h, Advantages = a })) { r.Backward(); whole = r.Loss.ToDouble(); }
            wholeGrad = cat(new[] { l.grad!, h.grad! }).clone().DetachFromDisposeScope();
        }
        var results = OnThreads(world, c =>
        {
            using var scope = NewDisposeScope();
            var (l, h, m, a) = Make();
            var rows = Enumerable.Range(0, N).Where(i => i % world == c.Rank).Select(i => (long)i).ToArray();
            var parts = new[] { rows.Take(3).ToArray(), rows.Skip(3).ToArray() }.Select(p => tensor(p)).ToArray();
            var batches = parts.Select(p => new TokenBatch(l.index_select(0, p), m.index_select(0, p)) { Entropy = h.index_select(0, p), Advantages = a.index_select(0, p) }).ToList();
            var window = GlobalBatch.CountWindow(batches, c) with { EntropyThreshold = GlobalBatch.EntropyThreshold(c, batches, 0.3) };
            double local = 0;
            foreach (var b in batches)
            {
                using var r = loss.Compute(b.WithWindow(window));
                r.Backward();
                local += r.Loss.ToDouble();
            }
            double total = c.AllReduceSum(new[] { local })[0] / c.WorldSize;
            c.AverageGradients(new[] { l, h });
            double error = (cat(new[] { l.grad!, h.grad! }) - wholeGrad).abs().max().ToDouble();
            // without the global threshold, each micro-batch keeps its own top 30%: another objective
            double perPart = 0;
            foreach (var b in batches)
                using (var r = loss.Compute(b.WithWindow(GlobalBatch.CountWindow(batches, c)))) perPart += r.Loss.ToDouble();
            double perPartTotal = c.AllReduceSum(new[] { perPart })[0] / c.WorldSize;
            // (with one rank the per-part masks happen to keep the same tokens here: only the thresholds differ)
            var ownThresholds = batches.Select(b => GlobalBatch.EntropyThreshold(null, new[] { b }, 0.3)).ToArray();
            bool differs = ownThresholds.All(t => t != window.EntropyThreshold) && (c.WorldSize == 1 || Math.Abs(perPartTotal - whole) > 1e-6);
            return (Math.Abs(total - whole) < 1e-12 && error < 1e-12 && differs,
                $"rank {c.Rank}: {total:R} vs {whole:R} (per-part thresholds {perPartTotal:R}), grad {error:E2}, threshold {window.EntropyThreshold} vs {string.Join(", ", ownThresholds)}");
        });
        foreach (var (ok, line) in results) Assert.True(ok, line);
        // one process alone: exactly the loss's own threshold, float32 included
        using var s = NewDisposeScope();
        var entropy = rand(3, 5) * 2;
        var batch = new TokenBatch(-rand(3, 5) - 0.1f, ones(3, 5)) { Entropy = entropy, Advantages = randn(3) };
        using var own = loss.Compute(batch);
        using var given = loss.Compute(batch.WithWindow(new TokenWindow { EntropyThreshold = GlobalBatch.EntropyThreshold(null, new[] { batch }, 0.3) }));
        Assert.Equal(own.Loss.ToDouble(), given.Loss.ToDouble());
        Assert.Throws<ArgumentException>(() => GlobalBatch.EntropyThreshold(null, new[] { new TokenBatch(-ones(2, 2), ones(2, 2)) }, 0.3));
        Assert.Throws<ArgumentOutOfRangeException>(() => GlobalBatch.EntropyThreshold(null, new[] { batch }, 0));
    }

    [Fact]
    public void A_rank_that_never_arrives_times_out_with_a_clear_error_instead_of_hanging()
    {
        var ranks = Collectives.InProcess(2, TimeSpan.FromMilliseconds(300));
        var sw = Stopwatch.StartNew();
        var e = Assert.Throws<TimeoutException>(() => ranks[0].AllReduceSum(new[] { 1.0 }));
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(10));
        Assert.Contains("waited", e.Message);
        Assert.Contains("a rank failed or stopped", e.Message);
        Assert.Equal(new[] { 3.0 }, Collectives.SingleProcess.AllReduceSum(new[] { 3.0 }));
        Assert.Single(Collectives.SingleProcess.AllGather(new[] { 1.0, 2.0 }));
    }

    // ---- real processes ----

    static string RanksApp => Path.Combine(
        AppContext.BaseDirectory.Replace("Alignment.Losses.Tests" + Path.DirectorySeparatorChar + "bin", "Alignment.Losses.MpiRanks" + Path.DirectorySeparatorChar + "bin", StringComparison.Ordinal),
        "Alignment.Losses.MpiRanks.dll");

    static ProcessRunner.Result Mpi(int ranks, params string[] args) =>
        ProcessRunner.Run(Mpiexec.Value!, ProcessRunner.RepoRoot, TimeSpan.FromMinutes(2), new[] { "-n", $"{ranks}", "dotnet", RanksApp }.Concat(args).ToArray());

    [MpiFact]
    public void Over_mpi_processes_the_split_batch_gives_the_whole_batch_on_every_rank()
    {
        foreach (int n in new[] { 2, 4 })
        {
            var r = Mpi(n);
            Assert.True(r.ExitCode == 0, $"mpiexec -n {n}: exit {r.ExitCode}\n{r.Output}");
            for (int rank = 0; rank < n; rank++)
            {
                Assert.Contains($"rank {rank} of {n}: PASS", r.Output);
                Assert.Contains($"rank {rank} of {n}: preference losses PASS", r.Output);
            }
        }
    }

    [MpiFact]
    public void Over_mpi_a_wrong_world_size_and_a_dead_rank_fail_clearly_and_quickly()
    {
        var wrong = Mpi(2, "--expect-world", "3");
        Assert.NotEqual(0, wrong.ExitCode);
        Assert.Contains("runs on 2 MPI rank(s) but expects 3", wrong.Output);
        var sw = Stopwatch.StartNew();
        var dead = Mpi(3, "--die-rank", "1");
        Assert.NotEqual(0, dead.ExitCode);
        Assert.Contains("rank 1: dying", dead.Output);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(60), $"the job took {sw.Elapsed} to end after a rank died");
    }
}
