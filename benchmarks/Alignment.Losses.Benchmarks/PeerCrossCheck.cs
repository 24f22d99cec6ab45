using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Benchmarks;

/// <summary>
/// <c>--crosscheck FILE</c>: every loss of the suites on the PyTorch peer's inputs (<c>reference_losses.py --dump FILE</c>),
/// value and gradients against the peer's, in float64. A timing ratio only means something when both sides compute the
/// same function: this is what shows they do, loss by loss.
/// </summary>
internal static class PeerCrossCheck
{
    public static int Run(string path)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        var root = doc.RootElement;
        var inputs = root.GetProperty("inputs").EnumerateObject()
            .ToDictionary(p => p.Name, p => p.Value.EnumerateArray().Select(e => e.GetDouble()).ToArray());
        int dim = root.GetProperty("embedding_dim").GetInt32();
        var peers = root.GetProperty("losses");
        Console.WriteLine($"cross-check against the PyTorch {root.GetProperty("torch").GetString()} peer, B = {inputs["pc"].Length}, float64");
        int failures = 0;
        foreach (var name in BenchInputs.LossNames)
        {
            if (!peers.TryGetProperty(name, out var peer))
            {
                Console.WriteLine($"FAIL {name}: not in the peer's file");
                failures++;
                continue;
            }
            using var scope = NewDisposeScope();
            using var x = new BenchInputs(inputs, dim);
            using var result = BenchInputs.Create(name).Compute(x.BatchFor(name));
            result.Loss.backward();
            double value = result.Loss.ToDouble(), want = peer.GetProperty("value").GetDouble();
            double valueError = Math.Abs(value - want) / Math.Max(1, Math.Abs(want));
            double gradError = Math.Max(GradError(x.PolicyChosen, peer.GetProperty("grad_chosen")), GradError(x.PolicyRejected, peer.GetProperty("grad_rejected")));
            bool ok = valueError < 1e-9 && gradError < 1e-9;
            if (!ok) failures++;
            Console.WriteLine($"{(ok ? "PASS" : "FAIL")} {name}: ours {value:R}, peer {want:R}, value rel err {valueError:G3}, grad rel err {gradError:G3}");

            // the plain TorchSharp formula of the timings' third column must be the peer's formula too
            x.PolicyChosen.grad = null;
            x.PolicyRejected.grad = null;
            PlainPreference.ResetState();
            var plain = PlainPreference.Loss(name, x);
            plain.backward();
            double plainError = Math.Abs(plain.ToDouble() - want) / Math.Max(1, Math.Abs(want));
            double plainGradError = Math.Max(GradError(x.PolicyChosen, peer.GetProperty("grad_chosen")), GradError(x.PolicyRejected, peer.GetProperty("grad_rejected")));
            bool plainOk = plainError < 1e-9 && plainGradError < 1e-9;
            if (!plainOk) failures++;
            Console.WriteLine($"{(plainOk ? "PASS" : "FAIL")} {name} (plain TorchSharp): value rel err {plainError:G3}, grad rel err {plainGradError:G3}");
        }
        Console.WriteLine(failures == 0 ? $"all {BenchInputs.LossNames.Length} losses agree with the peer (ours, and the plain TorchSharp formulas)"
            : $"{failures} of {2 * BenchInputs.LossNames.Length} checks (ours and the plain TorchSharp formulas) fail: losses differ from the peer");
        return failures == 0 ? 0 : 1;
    }

    /// <summary>Largest difference from the peer's gradient, relative to the peer's largest component (0 where none flows).</summary>
    private static double GradError(Tensor leaf, JsonElement peer)
    {
        var want = peer.EnumerateArray().Select(e => e.GetDouble()).ToArray();
        var ours = leaf.grad is { } g ? g.to_type(ScalarType.Float64).data<double>().ToArray() : new double[want.Length];
        double scale = Math.Max(1e-300, want.Max(Math.Abs));
        return ours.Zip(want, (a, b) => Math.Abs(a - b)).Max() / scale;
    }
}
