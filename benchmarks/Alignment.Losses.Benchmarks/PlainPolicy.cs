using static TorchSharp.torch;

namespace Alignment.Losses.Benchmarks;

/// <summary>
/// The benchmark's 7 policy-gradient objectives as bare TorchSharp ops, the formulas the PyTorch peer
/// (<c>benchmarks/pytorch/policy_losses.py</c>) computes, with a 0.04 k3 KL: no masking of NaN, no checks, no metrics.
/// The "plain TorchSharp" column of the comparison: what the same eager algorithm costs from .NET.
/// </summary>
internal static class PlainPolicy
{
    private const double Beta = 0.04;

    /// <summary>The loss named <paramref name="name"/> on the inputs (float32 computed in float32, float64 in float64).</summary>
    public static Tensor Loss(string name, PolicyInputs x)
    {
        var dtype = x.LogProbs.dtype;
        var l = x.LogProbs;
        var m = x.Mask.to_type(dtype);
        var a = x.Advantages.to_type(dtype).unsqueeze(1);
        var logRatio = l - x.Old.to_type(dtype);
        var u = x.Reference.to_type(dtype) - l;
        var kl = u.exp() - u - 1;
        Tensor SequenceMean(Tensor perToken) => ((perToken * m).sum(-1) / m.sum(-1).clamp_min(1.0)).mean();
        Tensor TokenMean(Tensor perToken) => (perToken * m).sum() / m.sum().clamp_min(1.0);
        Tensor Clipped(Tensor rho, double low, double high) => -minimum(rho * a, rho.clamp(1 - low, 1 + high) * a) + kl * Beta;
        switch (name)
        {
            case "grpo": return SequenceMean(Clipped(logRatio.exp(), 0.2, 0.2));
            case "dapo": return TokenMean(Clipped(logRatio.exp(), 0.2, 0.28));
            case "bnpo": return TokenMean(Clipped(logRatio.exp(), 0.2, 0.2));
            case "dr_grpo": return (Clipped(logRatio.exp(), 0.2, 0.2) * m).sum() / (double)(l.shape[0] * l.shape[1]);
            case "gspo":
                var sequence = ((logRatio * m).sum(-1) / m.sum(-1).clamp_min(1.0)).unsqueeze(-1).exp();
                return SequenceMean(Clipped(sequence, 3e-4, 4e-4));
            case "cispo":
                Tensor weight;
                using (no_grad()) weight = logRatio.exp().clamp_max(5.0);
                return TokenMean(-weight * a * l + kl * Beta);
            case "sapo":
                var tau = where(a > 0, full_like(a, 1.0), full_like(a, 1.05));
                return SequenceMean(-((logRatio.exp() - 1) * tau).sigmoid() * 4 / tau * a + kl * Beta);
            default: throw new ArgumentException($"no plain formula for '{name}'", nameof(name));
        }
    }
}
