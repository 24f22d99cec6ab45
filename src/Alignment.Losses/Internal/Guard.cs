using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>Argument checks shared by every loss. Messages name the argument, what was expected and what came.</summary>
internal static class Guard
{
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

    internal static void NotDisposed(Tensor? t, string name)
    {
        if (t is null) throw new ArgumentNullException(name);
        if (t.IsInvalid) throw new ObjectDisposedException(name, $"{name} has been disposed.");
    }

    internal static double Positive(double value, string name)
    {
        if (!(value > 0) || double.IsInfinity(value))
            throw new ArgumentOutOfRangeException(name, value, $"{name} must be a finite number > 0.");
        return value;
    }

    internal static double NonNegative(double value, string name)
    {
        if (!(value >= 0) || double.IsInfinity(value))
            throw new ArgumentOutOfRangeException(name, value, $"{name} must be a finite number >= 0.");
        return value;
    }

    internal static double InRange(double value, double minInclusive, double maxExclusive, string name)
    {
        if (!(value >= minInclusive && value < maxExclusive))
            throw new ArgumentOutOfRangeException(name, value, $"{name} must lie in [{minInclusive}, {maxExclusive}).");
        return value;
    }

    internal static double InClosedRange(double value, double min, double max, string name)
    {
        if (!(value >= min && value <= max))
            throw new ArgumentOutOfRangeException(name, value, $"{name} must lie in [{min}, {max}].");
        return value;
    }

    /// <summary>
    /// Checks that every tensor holds only finite values with one host-device synchronisation for the whole set,
    /// and names the first offending argument.
    /// </summary>
    internal static void AllFinite(params (Tensor? Tensor, string Name)[] tensors)
    {
        var present = tensors.Where(t => t.Tensor is not null && t.Tensor.numel() > 0).ToArray();
        if (present.Length == 0) return;
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var flags = stack(present.Select(t => isfinite(t.Tensor!).all()).ToArray()).cpu();
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
}

/// <summary>Token counts for the length-normalised losses.</summary>
internal static class TokenCounts
{
    /// <summary>
    /// Returns the chosen and rejected token counts in <paramref name="dtype"/>, or throws naming what is missing; their
    /// values (finite and &gt; 0) are checked through <paramref name="checks"/>, with the call's other checks.
    /// </summary>
    internal static (Tensor Chosen, Tensor Rejected) Require(PreferenceLogps policy, ScalarType dtype, string lossName, bool needRejected, DeferredChecks checks)
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
