using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.MpiRanks;

/// <summary>
/// One global batch of GRPO completions split across the ranks of <paramref name="collectives"/>: completion i goes to
/// rank i % world, so every prompt's group spans ranks, and each rank cuts its share into two micro-batches of unequal
/// sizes. Each rank computes the global advantages (<see cref="GlobalBatch.Advantages"/>), the window's counts
/// (<see cref="GlobalBatch.CountWindow(IEnumerable{TokenBatch}, ICollectives?, bool, bool)"/>), its micro-batches' losses
/// with that window and the gradient of the replicated log-probs averaged over ranks, then compares them with the whole
/// batch computed alone. The same code runs over MPI processes (Program.cs) and in-process ranks (the tests).
/// </summary>
public static class ShardedGrpoCheck
{
    public static (bool Ok, string Line) Run(ICollectives collectives)
    {
        using var scope = NewDisposeScope();
        int rank = collectives.Rank, world = collectives.WorldSize;
        const int N = 12, T = 7, G = 3;
        var g = new Generator(42);
        var lengths = randint(1, T + 1, new long[] { N }, generator: g);
        var mask = arange(T).unsqueeze(0) < lengths.unsqueeze(1);
        var logProbs = (-0.05 - 2 * rand(new long[] { N, T }, generator: g, dtype: ScalarType.Float64)).requires_grad_(true);   // replicated "parameters"
        var old = (logProbs.detach() + 0.1 * randn(new long[] { N, T }, generator: g, dtype: ScalarType.Float64)).clamp_max(-1e-4);
        var rewards = randint(0, 2, new long[] { N }, generator: g).to_type(ScalarType.Float64);
        var prompt = Enumerable.Range(0, N).Select(i => (long)(i / G)).ToArray();
        var loss = PolicyLosses.Create("dapo");

        // the whole batch, alone
        using var wholeAdvantages = Advantages.Grpo(rewards, GroupIds.FromIds(prompt));
        var wholeBatch = new TokenBatch(logProbs, mask) { OldLogProbs = old, Advantages = wholeAdvantages.Values };
        double wholeLoss;
        using (var r = loss.Compute(wholeBatch)) { r.Backward(); wholeLoss = r.Loss.ToDouble(); }
        var wholeGrad = logProbs.grad!.clone();
        logProbs.grad = null;

        // this rank's share: rows i % world == rank, in two micro-batches of unequal sizes
        var rows = Enumerable.Range(0, N).Where(i => i % world == rank).ToArray();
        using var index = tensor(rows.Select(i => (long)i).ToArray());
        using var advantages = GlobalBatch.Advantages(collectives, rewards.index_select(0, index), GroupIds.FromIds(rows.Select(i => prompt[i]).ToArray()),
            (r, groups) => Advantages.Grpo(r, groups));
        int cut = Math.Max(1, rows.Length / 3);
        var parts = new[] { (0, cut), (cut, rows.Length - cut) }.Where(p => p.Item2 > 0).ToArray();
        TokenBatch Part((int Start, int Count) p)
        {
            var at = index.narrow(0, p.Start, p.Count);
            return new TokenBatch(logProbs.index_select(0, at), mask.index_select(0, at))
            {
                OldLogProbs = old.index_select(0, at), Advantages = advantages.Values.narrow(0, p.Start, p.Count),
            };
        }
        var batches = parts.Select(Part).ToList();
        var window = GlobalBatch.CountWindow(batches, collectives);
        double localLoss = 0;
        foreach (var b in batches)
        {
            using var r = loss.Compute(b.WithWindow(window));
            r.Backward();
            localLoss += r.Loss.ToDouble();
        }
        collectives.AverageGradients(new[] { logProbs });
        double summedLoss = collectives.AllReduceSum(new[] { localLoss })[0] / world;                 // DDP: the mean of the ranks' losses
        double advantageError = (advantages.Values - wholeAdvantages.Values.index_select(0, index)).abs().max().ToDouble();
        double gradError = (logProbs.grad! - wholeGrad).abs().max().ToDouble();
        double lossError = Math.Abs(summedLoss - wholeLoss);
        bool ok = advantageError < 1e-12 && gradError < 1e-12 && lossError < 1e-12;
        return (ok, $"rank {rank} of {world}: {(ok ? "PASS" : "FAIL")} window {window.Tokens} tokens / {window.Sequences} sequences, " +
                          $"advantage err {advantageError:G3}, loss err {lossError:G3} ({summedLoss:R} vs {wholeLoss:R}), grad err {gradError:G3}");

    }
}
