using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// The numerically stable building blocks the library's losses are written in, public so that a loss of your own
/// (<see cref="PreferenceLoss{TOptions}"/>) computes the same way.
/// </summary>
/// <remarks>
/// None of them forms sigmoid(z) and then takes its logarithm: log(sigmoid(z)) underflows to -Inf for z below about
/// -104 in float32 (-745 in float64), while softplus(-z) stays exact.
/// </remarks>
public static class PreferenceMath
{
    /// <summary>
    /// softplus(x) = log(1 + e^x). libtorch's softplus returns x itself above its threshold (default 20), an error of
    /// log1p(e^-20) ≈ 2e-9 that is below float32 resolution but not float64's, so the threshold is 40 for float64
    /// (e^-40 ≈ 4e-18 is below double precision at that magnitude).
    /// </summary>
    public static Tensor Softplus(Tensor x) =>
        nn.functional.softplus(x, beta: 1, threshold: x.dtype == ScalarType.Float64 ? 40 : 20);

    /// <summary>-log sigmoid(z) = softplus(-z): the DPO link. ln 2 at z = 0; about -z for z → -inf; about e^-z for z → +inf.</summary>
    public static Tensor NegLogSigmoid(Tensor z) => Softplus(-z);

    /// <summary>
    /// The label-smoothing mixture (1 - eps) * softplus(-z) + eps * softplus(z), computed as softplus(-z) + eps * z
    /// (softplus(z) = softplus(-z) + z): one softplus, no cancellation. Stationary at z* = ln((1 - eps) / eps).
    /// </summary>
    /// <param name="z">The logit (e.g. beta times the margin).</param>
    /// <param name="eps">The assumed label-flip probability, in [0, 1].</param>
    public static Tensor LabelSmoothed(Tensor z, double eps) =>
        eps == 0 ? NegLogSigmoid(z) : NegLogSigmoid(z) + z * eps;
}
