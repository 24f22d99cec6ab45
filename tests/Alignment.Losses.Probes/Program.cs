// Each case prints one line, "EXCEPTION <type>: <message>" or "OK <detail>", and exits 0; an abort (exit 134) or a
// crash is what the tests exist to catch. Usage: Alignment.Losses.Probes <case>.
using System.Runtime.InteropServices;
using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

var cases = new Dictionary<string, Action>
{
    // RPO's [B, B] matrices at B = 100,000 (3 x 40 GB): refused before any allocation
    ["rpo-huge-batch"] = () => RpoLoss.Compute(new PreferenceLogps(-rand(100_000), -rand(100_000)), null, randn(100_000, 8)),
    ["cosine-weighting-huge"] = () => new CosineSoftmaxWeighting(0.5).ComputeWeights(randn(100_000, 8), randn(100_000, 8), ScalarType.Float32),
    // the head product [2, V] with V = 2^33 (64 GiB) fails inside libtorch: caught and named, with and without a bias
    ["fused-huge-vocabulary"] = () => FusedLinearLogProbs.Compute(randn(1, 2, 8), randn(1, 8).expand(1L << 33, 8), null,
        zeros(1, 2, dtype: ScalarType.Int64), null, LabelAlignment.Aligned),
    ["fused-huge-vocabulary-bias"] = () => FusedLinearLogProbs.Compute(randn(1, 2, 8), randn(1, 8).expand(1L << 33, 8), zeros(1).expand(1L << 33),
        zeros(1, 2, dtype: ScalarType.Int64), null, LabelAlignment.Aligned),
    // a failure inside a backward pass (here an injected out-of-memory error) must not cross the native frames
    ["backward-failure"] = () =>
    {
        Alignment.Losses.Internal.LibraryFunctionTesting.FailNextBackward = () => new ExternalException("CUDA out of memory. Tried to allocate 2.00 GiB (injected)");
        var chosen = (-rand(4)).requires_grad_(true);                 // log-probs: at most 0
        using var r = RpoLoss.Compute(new PreferenceLogps(chosen, -rand(4)), null, randn(4, 3));
        try { r.Loss.backward(); }
        catch (ExternalException e)
        {
            Console.WriteLine($"backward threw: {e.Message.Split('\n')[0]}");
            throw BackwardFailures.Last ?? new InvalidOperationException("no failure recorded");
        }
    },
};

if (args.Length != 1 || !cases.TryGetValue(args[0], out var run))
{
    Console.Error.WriteLine($"usage: Alignment.Losses.Probes <{string.Join("|", cases.Keys)}>");
    return 2;
}
try
{
    run();
    Console.WriteLine("OK no exception");
}
catch (Exception e)
{
    Console.WriteLine($"EXCEPTION {e.GetType().FullName}: {e.Message.Split('\n')[0]}");
}
return 0;
