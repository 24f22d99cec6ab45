using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Turns prompt embeddings into RPO's contrast weights W [M, N] (row i: chosen example i; column j: rejected example j).
/// </summary>
/// <remarks>
/// Implement this to use another similarity without touching the loss. Implementations return non-negative, finite
/// weights in the requested dtype with no gradient; rows need not sum to 1, but the default does.
/// </remarks>
public interface IRpoWeighting
{
    /// <summary>Computes W [M, N] from chosen-prompt embeddings [M, D] and rejected-prompt embeddings [N, D].</summary>
    /// <param name="chosen">[M, D] embeddings (any floating dtype).</param>
    /// <param name="rejected">[N, D] embeddings.</param>
    /// <param name="dtype">The dtype to compute and return in (float32, or float64 for float64 log-probs).</param>
    Tensor ComputeWeights(Tensor chosen, Tensor rejected, ScalarType dtype);
}

/// <summary>
/// The authors' weighting: cosine distance between L2-normalised prompt embeddings, D_ij = 1 - &lt;e_i, e_j&gt;, then a
/// softmax over the rejected axis with temperature tau: W_ij = exp(-D_ij / tau) / sum_k exp(-D_ik / tau). Rows sum to 1.
/// </summary>
/// <remarks>
/// <para>Normalisation is scale-robust: each row is first divided by its largest absolute value, then by its L2 norm, so
/// embeddings of any finite magnitude (1e-30 or 1e19 in float32) get their true direction, where squaring the raw values
/// would underflow to a zero norm or overflow to an infinite one.</para>
/// <para>A row is "zero" only when all its values are exactly 0: such a row has no direction, so its cosine distance is
/// undefined, and it is an error (<see cref="ArgumentException"/>), not silently treated as orthogonal.</para>
/// <para>The softmax is taken over (cos_ij - max_k cos_ik) / tau, which equals the formula above (a softmax is unchanged by
/// a shift) and stays defined for any tau: as tau → 0 each row tends to the one-hot of its most similar prompt.</para>
/// </remarks>
public sealed class CosineSoftmaxWeighting : IRpoWeighting
{
    /// <summary>Creates the weighting with temperature tau in [1e-12, 1e12] (the authors use 0.25, 0.5 or 0.75).</summary>
    public CosineSoftmaxWeighting(double temperature)
    {
        Temperature = Guard.Scale(temperature, nameof(temperature));
    }

    /// <summary>tau: small values concentrate each row on the most similar prompts; large values flatten it towards 1/N.</summary>
    public double Temperature { get; }

    /// <inheritdoc />
    /// <exception cref="ArgumentException">An embedding tensor is not a floating [rows, D] matrix, the two differ in D or
    /// device, a row is all zeros or holds NaN/Inf, or <paramref name="dtype"/> is not float32 or float64.</exception>
    /// <exception cref="InsufficientMemoryException">The [M, N] matrix cannot be allocated.</exception>
    public Tensor ComputeWeights(Tensor chosen, Tensor rejected, ScalarType dtype)
    {
        Check(chosen, nameof(chosen));
        Check(rejected, nameof(rejected));
        if (chosen.shape[1] != rejected.shape[1])
            throw new ArgumentException($"rejected has dimension D = {rejected.shape[1]} but chosen has D = {chosen.shape[1]}.", nameof(rejected));
        Guard.SameDevice(chosen, nameof(chosen), rejected, nameof(rejected));
        if (dtype is not (ScalarType.Float32 or ScalarType.Float64))
            throw new ArgumentException($"dtype must be Float32 or Float64 (the compute dtypes); got {dtype}.", nameof(dtype));
        long m = chosen.shape[0], n = rejected.shape[0];
        Native.EnsureCpuMemory(2 * m * n * (dtype == ScalarType.Float64 ? 8 : 4), chosen.device, "CosineSoftmaxWeighting.ComputeWeights",
            () => $"two [{m}, {n}] matrices");
        return Native.Run("CosineSoftmaxWeighting.ComputeWeights", () => $"chosen {Native.Describe(chosen)}, rejected {Native.Describe(rejected)}", () =>
        {
            using var scope = NewDisposeScope();
            Guard.AllFinite((chosen, nameof(chosen)), (rejected, nameof(rejected)));
            var checks = new ValueChecks();
            var weights = ComputeWeights(chosen, rejected, dtype, checks);
            checks.Verify();
            return weights.MoveToOuterDisposeScope();
        });
    }

    private static void Check(Tensor t, string name)
    {
        Guard.Usable(t, name);
        Guard.Rank(t, 2, name, "of embeddings [rows, D]");
        Guard.Floating(t, name);
        Guard.NotEmpty(t, name);
    }

    /// <summary>
    /// The weights, with the zero-norm check registered in <paramref name="checks"/> instead of read back at once (RPO
    /// reads it with the loss's other checks: one synchronisation per call). The check tensor lives in the caller's scope.
    /// </summary>
    internal Tensor ComputeWeights(Tensor chosen, Tensor rejected, ScalarType dtype, ValueChecks checks)
    {
        using var noGrad = no_grad();
        var ec = UnitRows(chosen, dtype, "chosen embeddings", checks);
        var er = ReferenceEquals(chosen, rejected) ? ec : UnitRows(rejected, dtype, "rejected embeddings", checks);
        // mm, not matmul: an allocation failure inside THSTensor_matmul aborts the process instead of throwing
        using var logits = ec.mm(er.t());                                  // cos [M, N]
        var rowMax = logits.amax(new long[] { 1 }, keepdim: true);
        logits.sub_(rowMax).div_(Temperature);                             // (cos - max_k cos) / tau <= 0, max exactly 0
        return nn.functional.softmax(logits, dim: 1);                      // the [M, N] logits are freed at once, not with the scope
    }

    /// <summary>Rows scaled to unit L2 norm without squaring raw values: x / max|x|, then / ||.||.</summary>
    private static Tensor UnitRows(Tensor e, ScalarType dtype, string name, ValueChecks checks)
    {
        var x = Numerics.As(e.detach(), dtype);
        var scale = x.abs().amax(new long[] { 1 }, keepdim: true);        // [rows, 1]; 0 only for an all-zero row
        checks.Add((scale != 0).all(), () =>
        {
            using var zero = (scale == 0).flatten().nonzero().flatten().cpu();   // only on failure: name the rows
            return new ArgumentException(
                $"{name} rows {string.Join(", ", zero.data<long>().Take(8))} have zero norm (every value is exactly 0): a zero vector has no direction, so its cosine similarity is undefined. Remove those rows or give them a real embedding.",
                name);
        });
        var scaled = x / scale.where(scale != 0, ones_like(scale));      // entries in [-1, 1], at least one of magnitude 1
        return scaled / scaled.norm(1, keepdim: true, p: 2);              // the norm lies in [1, sqrt(D)]
    }
}
