using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>Argument checks shared by every loss. Messages name the argument, what was expected and what came.</summary>
internal static class Guard
{
    /// <summary>The smallest positive scale hyperparameter accepted (see <see cref="Scale"/>).</summary>
    internal const double MinScale = 1e-12;

    /// <summary>The largest scale or weight hyperparameter accepted (see <see cref="Scale"/>).</summary>
    internal const double MaxScale = 1e12;

    internal static string Shape(Tensor t) => "[" + string.Join(", ", t.shape) + "]";

    internal static bool IsFloating(ScalarType t) =>
        t is ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float32 or ScalarType.Float64;

    internal static void Floating(Tensor t, string name)
    {
        if (!IsFloating(t.dtype))
            throw new ArgumentException(
                $"{name} must have a floating dtype (float16, bfloat16, float32 or float64); got {t.dtype}.", name);
    }

    internal static void Rank(Tensor t, int rank, string name, string meaning)
    {
        if (t.dim() != rank)
            throw new ArgumentException(
                $"{name} must be a {rank}-D tensor {meaning}; got shape {Shape(t)}.", name);
    }

    /// <summary>A scalar or a 1-D per-sample estimate (SPO's and KTO's KL): usable, floating, not empty.</summary>
    internal static void ScalarOrVector(Tensor? t, string name)
    {
        Usable(t, name);
        if (t!.dim() > 1) throw new ArgumentException($"{name} must be a scalar or a 1-D per-sample tensor; got shape {Shape(t)}.", name);
        Floating(t, name);
        NotEmpty(t, name);
    }

    internal static void NotEmpty(Tensor t, string name)
    {
        if (t.numel() == 0)
            throw new ArgumentException($"{name} is empty (shape {Shape(t)}); a loss needs at least one example.", name);
    }

    internal static void SameLength(Tensor a, string aName, Tensor b, string bName)
    {
        if (a.shape[0] != b.shape[0])
            throw new ArgumentException(
                $"{bName} has {b.shape[0]} rows but {aName} has {a.shape[0]}; they must match.", bName);
    }

    internal static void SameDevice(Tensor reference, string referenceName, Tensor t, string name)
    {
        if (reference.device.type != t.device.type || reference.device.index != t.device.index)
            throw new ArgumentException(
                $"{name} is on {t.device} but {referenceName} is on {reference.device}; move them to the same device.", name);
    }

    /// <summary>
    /// A tensor the library can read: not null, not disposed (its handle released by Dispose or by the dispose scope it
    /// was created in), and holding data (the meta device has shapes but no values).
    /// </summary>
    internal static void Usable(Tensor? t, string name)
    {
        if (t is null) throw new ArgumentNullException(name);
        if (t.IsInvalid)
            throw new ObjectDisposedException(name,
                $"{name} has been disposed (by Dispose() or by the dispose scope it was created in) before the library read it; " +
                "keep the tensors alive until the loss has been computed.");
        if (t.device_type == DeviceType.META)
            throw new ArgumentException(
                $"{name} is on the meta device, which has shapes but no values; losses need real data (cpu or cuda).", name);
    }

    /// <summary>An enum option must be one of its declared values.</summary>
    internal static T Defined<T>(T value, string name) where T : struct, Enum =>
        Enum.IsDefined(value)
            ? value
            : throw new ArgumentOutOfRangeException(name, value, $"{name} must be one of {string.Join(", ", Enum.GetNames<T>())}; got {value}.");

    /// <summary>
    /// A positive scale hyperparameter (beta, alpha, a temperature): finite and in [1e-12, 1e12]. Outside that range the
    /// loss cannot be represented in float32 for any realistic input (1 / (2 beta) squared, eta = 1 / beta, KL weight times
    /// KL, a temperature's 1 / tau all overflow or vanish), so such a value is rejected here rather than reported later as
    /// a non-finite loss.
    /// </summary>
    internal static double Scale(double value, string name)
    {
        if (!(value >= MinScale && value <= MaxScale))
            throw new ArgumentOutOfRangeException(name, value,
                $"{name} must be a number in [1e-12, 1e12]; got {value:G}. Beyond that range the loss over- or underflows float32.");
        return value;
    }

    /// <summary>A non-negative weight hyperparameter: 0 (the term is off) or a finite number up to 1e12.</summary>
    internal static double Weight(double value, string name)
    {
        if (!(value >= 0 && value <= MaxScale))
            throw new ArgumentOutOfRangeException(name, value,
                $"{name} must be a number in [0, 1e12]; got {value:G}. Beyond that range the weighted term overflows float32.");
        return value;
    }

    internal static double InRange(double value, double minInclusive, double maxExclusive, string name)
    {
        if (!(value >= minInclusive && value < maxExclusive))
            throw new ArgumentOutOfRangeException(name, value, $"{name} must lie in [{minInclusive}, {maxExclusive}); got {value:G}.");
        return value;
    }

    internal static double InClosedRange(double value, double min, double max, string name)
    {
        if (!(value >= min && value <= max))
            throw new ArgumentOutOfRangeException(name, value, $"{name} must lie in [{min}, {max}]; got {value:G}.");
        return value;
    }

    /// <summary>
    /// Checks that every tensor holds only finite values with one host-device synchronisation for the whole set,
    /// and names the first offending argument.
    /// </summary>
    internal static void AllFinite(params (Tensor? Tensor, string Name)[] tensors)
    {
        var present = tensors.Where(t => t.Tensor is not null && !t.Tensor.IsInvalid && t.Tensor.numel() > 0).ToArray();
        if (present.Length == 0) return;
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var flags = stack(present.Select(t => t.Tensor!.is_floating_point() ? isfinite(t.Tensor).all() : ones(1, dtype: ScalarType.Bool, device: t.Tensor.device).squeeze()).ToArray()).cpu();
        var ok = flags.data<bool>().ToArray();
        for (int i = 0; i < ok.Length; i++)
        {
            if (ok[i]) continue;
            var t = present[i].Tensor!;
            var bad = (~isfinite(t)).nonzero().flatten().cpu();
            var rows = bad.data<long>().Take(8).ToArray();
            var (nan, inf) = (isnan(t).any().cpu().item<bool>(), isinf(t).any().cpu().item<bool>());
            string what = nan && inf ? "NaN and Inf" : nan ? "NaN" : "Inf";
            throw new ArgumentException(
                $"{present[i].Name} contains {what} values (first flat indices: {string.Join(", ", rows)}); every value must be finite.",
                present[i].Name);
        }
    }

    /// <summary>The largest absolute value among the (finite) tensors, for diagnostics.</summary>
    internal static double MaxAbs(IEnumerable<Tensor?> tensors)
    {
        double max = 0;
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        foreach (var t in tensors)
            if (t is not null && !t.IsInvalid && t.numel() > 0 && t.is_floating_point())
                max = Math.Max(max, t.abs().max().to_type(ScalarType.Float64).cpu().item<double>());
        return max;
    }
}

/// <summary>Token counts for the length-normalised losses.</summary>
internal static class TokenCounts
{
    /// <summary>
    /// Returns the chosen and rejected token counts in <paramref name="dtype"/>, or throws naming what is missing; their
    /// values (finite and &gt; 0) are checked through <paramref name="checks"/>, with the call's other checks.
    /// </summary>
    internal static (Tensor Chosen, Tensor Rejected) Require(PreferenceLogps policy, ScalarType dtype, string lossName, bool needRejected, ValueChecks checks)
    {
        if (policy.ChosenTokenCounts is null || (needRejected && policy.RejectedTokenCounts is null))
            throw new ArgumentException(
                $"The {lossName} loss needs completion-token counts: build the log-probs with new PreferenceLogps(chosen, rejected, chosenTokenCounts, rejectedTokenCounts) or WithTokenCounts(...).",
                "policy");
        var chosen = Numerics.As(policy.ChosenTokenCounts, dtype);
        var rejected = policy.RejectedTokenCounts is null ? chosen : Numerics.As(policy.RejectedTokenCounts, dtype);
        using (no_grad())
        {
            // > 0 and < Inf (NaN fails both)
            var counts = needRejected && !ReferenceEquals(chosen, rejected) ? cat(new[] { chosen, rejected }, 0) : chosen;
            checks.Add(((counts > 0) & (counts < double.PositiveInfinity)).all(), () => new ArgumentException(
                "Token counts must be finite and > 0 for every response (a response with no tokens has no per-token mean).", "policy"));
        }
        return (chosen, rejected);
    }
}
