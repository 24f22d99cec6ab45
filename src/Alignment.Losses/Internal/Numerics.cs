using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>Numeric conventions shared by the losses: the compute dtype and stable log-sigmoid forms.</summary>
internal static class Numerics
{
    /// <summary>float64 when any input is float64 (so float64 oracles can be matched), float32 otherwise (bf16/fp16 are upcast).</summary>
    internal static ScalarType DTypeFor(params Tensor?[] inputs) =>
        inputs.Any(t => t is not null && t.dtype == ScalarType.Float64) ? ScalarType.Float64 : ScalarType.Float32;

    /// <summary>Upcasts to the compute dtype; a no-op alias when the dtype already matches.</summary>
    internal static Tensor As(Tensor t, ScalarType dtype) => t.dtype == dtype ? t.alias() : t.to_type(dtype);

    /// <summary>
    /// -log sigmoid(z) = softplus(-z), evaluated without forming sigmoid(z). libtorch's softplus returns x itself above its
    /// threshold (default 20), an error of log1p(e^-20) ≈ 2e-9 that is below float32 resolution but not float64's, so the
    /// threshold is raised to 40 for float64 (e^-40 ≈ 4e-18 is below double precision at that magnitude).
    /// </summary>
    internal static Tensor NegLogSigmoid(Tensor z) => Softplus(-z);

    /// <summary>softplus(x) = log(1 + e^x) with the dtype-aware linear threshold described on <see cref="NegLogSigmoid"/>.</summary>
    internal static Tensor Softplus(Tensor x) =>
        nn.functional.softplus(x, beta: 1, threshold: x.dtype == ScalarType.Float64 ? 40 : 20);
}
