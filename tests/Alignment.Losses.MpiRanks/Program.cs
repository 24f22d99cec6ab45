// One global batch of GRPO completions, split across the MPI ranks: completion i goes to rank i % world, so every
// prompt's group spans ranks, and each rank cuts its share into two micro-batches of unequal sizes. Each rank computes
// the global advantages (GlobalBatch.Advantages), the window's counts (GlobalBatch.CountWindow), its micro-batches'
// losses with that window, and the gradient of the replicated log-probs averaged over ranks (AverageGradients). Every
// rank then compares with the whole batch computed alone: advantages, summed loss and gradient to 1e-12. Then the same for
// the batch-coupled sequence-pair losses (ShardedPreferenceCheck: RPO, AOT, ORPO, KTO, BCO, SPPO, SPO, ODPO, DPO).
//
//   mpiexec.mpich -n 3 dotnet Alignment.Losses.MpiRanks.dll [--expect-world N] [--die-rank R]
using Alignment.Losses;
using Alignment.Losses.Mpi;
using TorchSharp;
using static TorchSharp.torch;

int Arg(string name, int fallback) => Array.IndexOf(args, name) is var i and >= 0 && i + 1 < args.Length ? int.Parse(args[i + 1]) : fallback;
using var mpi = new MpiCollectives(args);
int rank = mpi.Rank, world = mpi.WorldSize;
try
{
    if (Arg("--expect-world", 0) is > 0 and var expected) mpi.RequireWorldSize(expected);
}
catch (InvalidOperationException e)
{
    Console.Error.WriteLine($"rank {rank}: {e.Message}");
    return 3;
}
if (Arg("--die-rank", -1) == rank)
{
    Console.Error.WriteLine($"rank {rank}: dying before the first collective (the --die-rank case)");
    Console.Error.Flush();
    Environment.Exit(5);                                          // a crash: no MPI_Finalize, the launcher must end the job
}

var (ok, line) = Alignment.Losses.MpiRanks.ShardedGrpoCheck.Run(mpi);
Console.WriteLine(line);
var (preferenceOk, preferenceLine) = Alignment.Losses.MpiRanks.ShardedPreferenceCheck.Run(mpi);
Console.WriteLine(preferenceLine);
return ok && preferenceOk ? 0 : 1;
