using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace Alignment.Losses.Benchmarks;

/// <summary>
/// The suites' 29 preference losses as bare TorchSharp ops, the formulas the PyTorch peer
/// (<c>benchmarks/pytorch/reference_losses.py</c>) computes, one eager op per line: no validation, no checks, no metrics.
/// The "plain TorchSharp" column of the comparison: what the same eager algorithm costs from .NET, so that a ratio to the
/// peer separates TorchSharp's per-op cost from the library's.
/// </summary>
internal static class PlainPreference
{
    private const double Beta = 0.1;

    /// <summary>BCO's running mean of the rewards (the peer's <c>RunningMean</c>): updated by every call, read back to the host.</summary>
    private static double _bcoMean, _bcoCount = 1e-24;

    /// <summary>A fresh running mean, as a fresh BCO loss has (the cross-check's single call).</summary>
    public static void ResetState() => (_bcoMean, _bcoCount) = (0, 1e-24);

    /// <summary>The loss named <paramref name="name"/> on the inputs (half precision upcast to float32, as the peer does).</summary>
    public static Tensor Loss(string name, BenchInputs x)
    {
        static Tensor Up(Tensor t) => t.dtype is ScalarType.BFloat16 or ScalarType.Float16 ? t.to_type(ScalarType.Float32) : t;
        var (pc, pr) = (Up(x.PolicyChosen), Up(x.PolicyRejected));
        var (uw, ul) = (pc - Up(x.RefChosen), pr - Up(x.RefRejected));
        var counts = x.Counts;
        Tensor Dpo() => -F.logsigmoid(Beta * (uw - ul)).mean();
        Tensor BcoPair() => (-F.logsigmoid(Beta * uw) - F.logsigmoid(-Beta * ul)).mean();
        Tensor Sft() => -pc.sum() / counts.sum();
        switch (name)
        {
            case "dpo": return Dpo();
            case "cdpo":
            {
                var z = Beta * (uw - ul);
                return (-F.logsigmoid(z) * 0.9 - F.logsigmoid(-z) * 0.1).mean();
            }
            case "robust_dpo":
            {
                var z = Beta * (uw - ul);
                return ((-F.logsigmoid(z) * 0.9 + F.logsigmoid(-z) * 0.1) / 0.8).mean();
            }
            case "ipo": return ((uw - ul) - 1 / (2 * Beta)).pow(2).mean();
            case "hinge": return F.relu(1 - Beta * (uw - ul)).mean();
            case "dpo_nll": return (-F.logsigmoid(Beta * (uw - ul)) + 1.0 * (-pc / counts)).mean();
            case "rpo":
            {
                Tensor w;
                using (no_grad())
                {
                    var e = F.normalize(Up(x.Embeddings), dim: -1);
                    var distance = 1 - e.matmul(e.T);
                    w = softmax(-distance / 0.5, dim: -1);
                }
                var a = uw.unsqueeze(1) - ul.unsqueeze(0);
                return -F.logsigmoid(Beta * w * a).mean();
            }
            case "spo": return (-F.logsigmoid(1.0 * (pc - pr)) / 1.0).mean();       // alpha = 1, written as the peer writes it
            case "odpo": return -F.logsigmoid(Beta * (uw - ul) - 1.0 * log(x.ScoreChosen - x.ScoreRejected)).mean();
            case "sppo":
            {
                const double eta = 1 / 0.001;
                return (0.5 * ((uw - eta * (x.WinChosen - 0.5)).pow(2) + (ul - eta * (x.WinRejected - 0.5)).pow(2))).mean();
            }
            case "exo_pair":
            {
                const double eps = 1e-3;
                var z = Beta * (uw - ul);
                var (qw, ql) = (sigmoid(z), sigmoid(-z));
                return (qw * (F.logsigmoid(z) - Math.Log(1 - eps)) + ql * (F.logsigmoid(-z) - Math.Log(eps))).mean();
            }
            case "nca_pair":
            {
                var (rw, rl) = (Beta * uw, Beta * ul);
                return (-F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)).mean();
            }
            case "bco_pair": return BcoPair();
            case "apo_zero": return ((1 - sigmoid(Beta * uw)) + sigmoid(Beta * ul)).mean();
            case "apo_down": return (sigmoid(Beta * uw) + (1 - sigmoid(Beta * (uw - ul)))).mean();
            case "aot":
            {
                const double eps = 0;
                var d = (pc - pr).sort(0).Values - (Up(x.RefChosen) - Up(x.RefRejected)).sort(0).Values;
                return (-F.logsigmoid(Beta * d) * (1 - eps) - F.logsigmoid(-Beta * d) * eps).mean();
            }
            case "discopop":
            {
                var z = Beta * (uw - ul);
                var m = sigmoid(z / 0.05);
                return (-F.logsigmoid(z) * (1 - m) + exp(-z) * m).mean();
            }
            case "sigmoid_norm": return -F.logsigmoid(Beta * (uw / counts - ul / counts)).mean();
            case "sft": return Sft();
            case "mpo": return 0.8 * Dpo() + 0.2 * BcoPair() + Sft();
            case "dpo_js": return -F.logsigmoid(Beta * (F.logsigmoid(uw) - F.logsigmoid(ul))).mean();
            case "cpo": return -F.logsigmoid(Beta * (pc - pr)).mean() + 1.0 * Sft();
            case "simpo": return -F.logsigmoid(Beta * ((pc / counts - pr / counts) - 0.5 / Beta)).mean();
            case "alphapo":
            {
                const double alpha = 0.25;
                var (qw, ql) = (exp(pc / counts), exp(pr / counts));
                var logits = (1 - qw.pow(-alpha)) / alpha - (1 - ql.pow(-alpha)) / alpha;
                return -F.logsigmoid(Beta * (logits - 0.5 / Beta)).mean();
            }
            case "orpo":
            {
                var (aw, al) = (pc / counts, pr / counts);
                var logOdds = (aw - al) - (log1p(-exp(aw)) - log1p(-exp(al)));
                var nllAll = -(pc + Up(x.PromptLogps)).sum() / (counts + x.PromptCounts).sum();
                return nllAll - Beta * F.logsigmoid(logOdds).mean();
            }
            case "kto":
            {
                Tensor kl;
                using (no_grad()) kl = (Up(x.PolicyChosen).roll(1) - Up(x.RefChosen).roll(1)).mean().clamp_min(0);
                return cat(new[] { 1 - sigmoid(Beta * (uw - kl)), 1 - sigmoid(Beta * (kl - ul)) }, 0).mean();
            }
            case "apo_zero_unpaired": return cat(new[] { 1 - sigmoid(Beta * uw), sigmoid(Beta * ul) }, 0).mean();
            case "bco":
            {
                var (rw, rl) = (Beta * uw, Beta * ul);
                var rewards = cat(new[] { rw, rl }, 0).detach();
                double total = _bcoCount + rewards.numel();
                _bcoMean += (rewards.mean().ToDouble() - _bcoMean) * rewards.numel() / total;
                _bcoCount = total;
                var delta = tensor(_bcoMean, dtype: rw.dtype, device: rw.device);
                return cat(new[] { -F.logsigmoid(rw - delta), -F.logsigmoid(-(rl - delta)) }, 0).mean();
            }
            case "bradley_terry": return -F.logsigmoid(pc - pr).mean();
            default: throw new ArgumentException($"no plain formula for '{name}'", nameof(name));
        }
    }
}
