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
/// An embedding row with zero norm has no direction, so its cosine distance is undefined: it is an error
/// (<see cref="ArgumentException"/>), not silently treated as orthogonal.
/// </remarks>
public sealed class CosineSoftmaxWeighting : IRpoWeighting
{
    /// <summary>Creates the weighting with temperature tau &gt; 0 (the authors use 0.25, 0.5 or 0.75).</summary>
    public CosineSoftmaxWeighting(double temperature)
    {
        Temperature = Guard.Positive(temperature, nameof(temperature));
    }

    /// <summary>tau: small values concentrate each row on the most similar prompts; large values flatten it towards 1/N.</summary>
    public double Temperature { get; }

    /// <inheritdoc />
    /// <exception cref="ArgumentException">An embedding row has zero norm.</exception>
    public Tensor ComputeWeights(Tensor chosen, Tensor rejected, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var checks = new DeferredChecks();
        var weights = ComputeWeights(chosen, rejected, dtype, checks);
        checks.Verify();
        return weights.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The weights, with the zero-norm check registered in <paramref name="checks"/> instead of read back at once (RPO
    /// reads it with the loss's other checks: one synchronisation per call). The check tensor lives in the caller's scope.
    /// </summary>
    internal Tensor ComputeWeights(Tensor chosen, Tensor rejected, ScalarType dtype, DeferredChecks checks)
    {
        using var noGrad = no_grad();
        var ec = UnitRows(chosen, dtype, "chosen embeddings", checks);
        var er = ReferenceEquals(chosen, rejected) ? ec : UnitRows(rejected, dtype, "rejected embeddings", checks);
        // -D / tau = (cos - 1) / tau, formed in place on the [M, N] similarity matrix
        using var logits = ec.matmul(er.t()).sub_(1).div_(Temperature);
        return nn.functional.softmax(logits, dim: 1);                  // the [M, N] logits are freed at once, not with the scope
    }

    private static Tensor UnitRows(Tensor e, ScalarType dtype, string name, DeferredChecks checks)
    {
        var x = Numerics.As(e.detach(), dtype);
        var norms = x.norm(1, keepdim: true, p: 2);
        checks.Add((norms != 0).all(), () =>
        {
            using var zero = (norms == 0).flatten().nonzero().flatten().cpu();   // only on failure: name the rows
            return new ArgumentException(
                $"{name} rows {string.Join(", ", zero.data<long>().Take(8))} have zero norm: a zero vector has no direction, so its cosine similarity is undefined. Remove those rows or give them a real embedding.",
                name);
        });
        return x / norms;
    }
}
