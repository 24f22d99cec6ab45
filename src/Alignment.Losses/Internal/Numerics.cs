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

    /// <summary>
    /// A tensor of <paramref name="shape"/> from host values, in <paramref name="dtype"/> on <paramref name="device"/>; the
    /// intermediate CPU tensor and views are disposed here, not left to the finalizer.
    /// </summary>
    internal static Tensor FromHost<T>(T[] data, long[] shape, ScalarType dtype, Device device) where T : unmanaged
    {
        using var scope = NewDisposeScope();
        Tensor host = data switch
        {
            long[] l => tensor(l, dtype: ScalarType.Int64),
            bool[] b => tensor(b, dtype: ScalarType.Bool),
            double[] d => tensor(d, dtype: ScalarType.Float64),
            _ => throw new ArgumentException($"no host conversion for {typeof(T).Name}[]", nameof(data)),
        };
        return host.view(shape).to(dtype, device).MoveToOuterDisposeScope();
    }

    /// <summary>The (1 - q) quantile of <paramref name="values"/> [n &gt; 0] with torch.quantile's linear interpolation, 0-d, in their dtype.</summary>
    internal static Tensor QuantileThreshold(Tensor values, double quantile)
    {
        long n = values.shape[0];
        var sorted = values.sort().Values;
        double position = (1 - quantile) * (n - 1);
        long lo = (long)Math.Floor(position), hi = (long)Math.Ceiling(position);
        return sorted[lo] + (sorted[hi] - sorted[lo]) * (position - lo);
    }
}
