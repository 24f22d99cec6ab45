using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// RPO's prompt embeddings: one per pair (<see cref="Paired"/>) or one per chosen and one per rejected example
/// (<see cref="Unpaired"/>). The two cases are distinct types of construction so they cannot be confused.
/// </summary>
/// <remarks>
/// Any floating dtype is accepted; the similarity is computed in float32 (float64 when the log-probs are float64) and
/// no gradient flows into the embeddings. The paper embeds the formatted prompt with a sentence encoder such as
/// all-MiniLM-L6-v2 (D = 384) or sentence-t5-large (D = 768). The instance does not own the tensors.
/// </remarks>
public sealed class PromptEmbeddings
{
    private PromptEmbeddings(Tensor chosen, Tensor rejected, bool isPaired)
    {
        Chosen = chosen;
        Rejected = rejected;
        IsPaired = isPaired;
    }

    /// <summary>Paired data: one prompt embedding per pair, [N, D]; pair i's chosen and rejected share prompt i.</summary>
    public static PromptEmbeddings Paired(Tensor embeddings) => PairedNamed(embeddings, nameof(embeddings));

    /// <summary><see cref="Paired(Tensor)"/>, naming the tensor as the caller's parameter in errors.</summary>
    internal static PromptEmbeddings PairedNamed(Tensor embeddings, string name)
    {
        Check(embeddings, name);
        return new PromptEmbeddings(embeddings, embeddings, isPaired: true);
    }

    /// <summary>
    /// Unpaired data: [M, D] embeddings of the chosen examples' prompts and [N, D] of the rejected examples' prompts. One
    /// side may be empty (a micro-batch of a data-parallel step, <see cref="GlobalBatch.Compute(ICollectives, IPreferenceLoss, IReadOnlyList{PreferenceBatch}, bool)"/>),
    /// as with <see cref="PreferenceLogps.Unpaired(Tensor, Tensor)"/>; RPO itself needs both sides of the batch it contrasts.
    /// </summary>
    public static PromptEmbeddings Unpaired(Tensor chosen, Tensor rejected)
    {
        Check(chosen, nameof(chosen), allowEmpty: true);
        Check(rejected, nameof(rejected), allowEmpty: true);
        if (chosen.shape[1] != rejected.shape[1])
            throw new ArgumentException(
                $"rejected embeddings have dimension D = {rejected.shape[1]} but chosen embeddings have D = {chosen.shape[1]}; they must come from the same encoder.",
                nameof(rejected));
        Guard.SameDevice(chosen, nameof(chosen), rejected, nameof(rejected));
        return new PromptEmbeddings(chosen, rejected, isPaired: false);
    }

    /// <summary>
    /// Prompt embeddings without a sentence encoder: the mean of a model's hidden states over each row's prompt tokens,
    /// detached and in float32 (float64 for float64 input). Take them from the policy or the reference model's last (or
    /// any) layer; for a collated batch pass its <c>PromptMask</c> and keep the first B rows (chosen and rejected rows
    /// share their prompt). A documented alternative to the paper's sentence encoder: cheaper, but the similarity then
    /// reflects the model's own representation of the prompt.
    /// </summary>
    /// <param name="hidden">[R, T, H] hidden states.</param>
    /// <param name="promptMask">[R, T] nonzero / true at prompt tokens; every row needs at least one.</param>
    /// <returns>[R, H] mean-pooled embeddings, no grad.</returns>
    /// <exception cref="ArgumentException">Shapes differ, a row has no prompt token, or the pooled values are not finite.</exception>
    public static Tensor MeanPooled(Tensor hidden, Tensor promptMask)
    {
        Guard.Usable(hidden, nameof(hidden));
        Guard.Usable(promptMask, nameof(promptMask));
        Guard.Rank(hidden, 3, nameof(hidden), "of hidden states [R, T, H]");
        Guard.Floating(hidden, nameof(hidden));
        if (promptMask.dim() != 2 || promptMask.shape[0] != hidden.shape[0] || promptMask.shape[1] != hidden.shape[1])
            throw new ArgumentException($"promptMask must be [{hidden.shape[0]}, {hidden.shape[1]}] to match hidden; got {Guard.Shape(promptMask)}.", nameof(promptMask));
        Guard.SameDevice(hidden, nameof(hidden), promptMask, nameof(promptMask));
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var dtype = hidden.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        if (promptMask.is_floating_point() && !isfinite(promptMask).all().item<bool>())
            throw new ArgumentException("promptMask holds NaN or Inf; it marks prompt tokens with nonzero (1 or true) and the others with 0.", nameof(promptMask));
        var m = (promptMask != 0);
        var counts = m.sum(1, type: ScalarType.Int64);
        if ((counts == 0).any().item<bool>())
        {
            var rows = (counts == 0).nonzero().flatten().cpu().data<long>().Take(8);
            throw new ArgumentException($"promptMask has no prompt token in row(s) {string.Join(", ", rows)}: there is nothing to pool.", nameof(promptMask));
        }
        // masked rows are selected out (not multiplied by 0), so NaN in padding cannot leak in
        var summed = hidden.detach().to_type(dtype).masked_fill(m.logical_not().unsqueeze(2), 0).sum(1);
        var pooled = summed / counts.to_type(dtype).unsqueeze(1);
        if (!isfinite(pooled).all().item<bool>())
        {
            // the inputs' fault only if they hold NaN/Inf at prompt tokens; otherwise the sum overflowed the compute dtype
            bool inputBad = !isfinite(hidden.detach().masked_fill(m.logical_not().unsqueeze(2), 0)).all().item<bool>();
            if (inputBad)
                throw new ArgumentException("hidden contains NaN or Inf at prompt tokens; the pooled embeddings would be non-finite.", nameof(hidden));
            throw new ArithmeticException(
                $"Mean-pooling overflowed {dtype}: hidden is finite but its sum over the prompt tokens is not (largest magnitude {hidden.detach().abs().max().to_type(ScalarType.Float64).item<double>():G4}). " +
                "Pass float64 hidden states, or normalise them first.");
        }
        return pooled.MoveToOuterDisposeScope();
    }

    /// <summary>Embeddings of the chosen examples' prompts, [M, D] (the paired tensor when paired).</summary>
    public Tensor Chosen { get; }

    /// <summary>Embeddings of the rejected examples' prompts, [N, D] (the paired tensor when paired).</summary>
    public Tensor Rejected { get; }

    /// <summary>True for <see cref="Paired"/>.</summary>
    public bool IsPaired { get; }

    private static void Check(Tensor t, string name, bool allowEmpty = false)
    {
        Guard.Usable(t, name);
        Guard.Rank(t, 2, name, "of prompt embeddings [rows, D]");
        Guard.Floating(t, name);
        if (!allowEmpty || t.shape[1] == 0) Guard.NotEmpty(t, name);
    }
}
