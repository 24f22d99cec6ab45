using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>Numeric conventions shared by the losses: the compute dtype and the upcast (the stable forms are <see cref="PreferenceMath"/>).</summary>
internal static class Numerics
{
    /// <summary>float64 when any input is float64 (so float64 oracles can be matched), float32 otherwise (bf16/fp16 are upcast).</summary>
    internal static ScalarType DTypeFor(params Tensor?[] inputs) =>
        inputs.Any(t => t is not null && t.dtype == ScalarType.Float64) ? ScalarType.Float64 : ScalarType.Float32;

    /// <summary>Upcasts to the compute dtype; a no-op alias when the dtype already matches.</summary>
    internal static Tensor As(Tensor t, ScalarType dtype) => t.dtype == dtype ? t.alias() : t.to_type(dtype);
}
