using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// The machinery both loss contracts share (the sequence-pair one of <see cref="PreferenceLoss{TOptions}"/> and the token
/// one of <see cref="TokenLoss{TOptions}"/>): a loss's own metrics checked and packed with its value into one detached
/// device tensor, the finite check over that tensor, and the single read-back of every deferred verdict.
/// </summary>
/// <remarks>
/// A loss call therefore costs one host-device synchronisation whatever its number of checks and metrics: the packed
/// tensor is examined on the device (one isfinite), the verdicts are read together, and the metrics themselves are copied
/// to the host only when the caller first reads them. Both contracts also share <see cref="Native.Run{T}"/> (allocation
/// failures named), <see cref="ValueChecks"/> and the compute dtype rule of <see cref="Numerics.DTypeFor"/>.
/// </remarks>
internal static class LossEngine
{
    /// <summary>Named errors for the mistakes a custom loss can make in the metrics it returns.</summary>
    internal static void CheckMetrics(IReadOnlyList<(string Name, Tensor Value)>? metrics, string owner)
    {
        foreach (var (name, value) in metrics ?? Array.Empty<(string, Tensor)>())
            if (string.IsNullOrEmpty(name) || value is null || value.IsInvalid || value.numel() != 1)
                throw new InvalidOperationException($"{owner} returned metric '{name}' that is not a named one-element tensor.");
    }

    /// <summary>
    /// [head, metrics...] as one detached 1-D tensor in <paramref name="dtype"/> (no synchronisation), and the metric names
    /// (the head's names first, then the loss's own). The head's first entry is the loss value and has no name.
    /// </summary>
    internal static (Tensor Packed, string[] Names) Pack(Tensor head, IReadOnlyList<string> headNames,
        IReadOnlyList<(string Name, Tensor Value)>? metrics, ScalarType dtype)
    {
        using var noGrad = no_grad();
        if (TensorMemory.HostVectors(head) && (metrics ?? Array.Empty<(string, Tensor)>()).All(m => m.Value.device_type == DeviceType.CPU))
        {
            // the CPU: one tensor built from the values (each metric read with item, no views or copies)
            var values = TensorMemory.RentDoubles(head);
            int count = (int)head.shape[0];
            try
            {
                var all = new double[count + (metrics?.Count ?? 0)];
                values.AsSpan(0, count).CopyTo(all);
                for (int i = 0; i < (metrics?.Count ?? 0); i++)
                    all[count + i] = metrics![i].Value.dtype switch
                    {
                        ScalarType.Float32 => metrics[i].Value.item<float>(),
                        ScalarType.Float64 => metrics[i].Value.item<double>(),
                        _ => metrics[i].Value.to_type(ScalarType.Float64).item<double>(),
                    };
                return (TensorMemory.FromValues(all, dtype), headNames.Concat(metrics?.Select(m => m.Name) ?? Array.Empty<string>()).ToArray());
            }
            finally
            {
                System.Buffers.ArrayPool<double>.Shared.Return(values);
            }
        }
        var packed = Numerics.As(head.detach(), dtype).reshape(-1);
        var names = headNames.ToList();
        if (metrics is { Count: > 0 })
        {
            var parts = new List<Tensor>(1 + metrics.Count) { packed };
            parts.AddRange(metrics.Select(m => Numerics.As(m.Value.detach(), dtype).reshape(1)));
            packed = cat(parts, 0);
            names.AddRange(metrics.Select(m => m.Name));
        }
        return (packed, names.ToArray());
    }

    /// <summary>
    /// Registers the finite check over the packed [loss, metrics] (when <paramref name="checkFinite"/>) after the call's
    /// other checks, and reads every verdict in one synchronisation; the first failing check's error is thrown.
    /// </summary>
    internal static void Verify(ValueChecks checks, Tensor packed, bool checkFinite, Func<Exception> notFinite)
    {
        if (checkFinite && TensorMemory.HostVectors(packed))
        {
            var values = TensorMemory.RentDoubles(packed);                // the CPU: read in place, no tensor ops
            bool finite = true;
            for (int i = 0; i < packed.shape[0]; i++) finite &= double.IsFinite(values[i]);
            System.Buffers.ArrayPool<double>.Shared.Return(values);
            checks.AddVerdict(finite, notFinite);
        }
        else if (checkFinite)
        {
            using (no_grad())
                checks.Add(isfinite(packed).all(), notFinite);
        }
        checks.Verify();
    }
}
