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
    public static PromptEmbeddings Paired(Tensor embeddings)
    {
        Check(embeddings, nameof(embeddings));
        return new PromptEmbeddings(embeddings, embeddings, isPaired: true);
    }

    /// <summary>Unpaired data: [M, D] embeddings of the chosen examples' prompts and [N, D] of the rejected examples' prompts.</summary>
    public static PromptEmbeddings Unpaired(Tensor chosen, Tensor rejected)
    {
        Check(chosen, nameof(chosen));
        Check(rejected, nameof(rejected));
        if (chosen.shape[1] != rejected.shape[1])
            throw new ArgumentException(
                $"rejected embeddings have dimension D = {rejected.shape[1]} but chosen embeddings have D = {chosen.shape[1]}; they must come from the same encoder.",
                nameof(rejected));
        Guard.SameDevice(chosen, nameof(chosen), rejected, nameof(rejected));
        return new PromptEmbeddings(chosen, rejected, isPaired: false);
    }

    /// <summary>Embeddings of the chosen examples' prompts, [M, D] (the paired tensor when paired).</summary>
    public Tensor Chosen { get; }

    /// <summary>Embeddings of the rejected examples' prompts, [N, D] (the paired tensor when paired).</summary>
    public Tensor Rejected { get; }

    /// <summary>True for <see cref="Paired"/>.</summary>
    public bool IsPaired { get; }

    private static void Check(Tensor t, string name)
    {
        Guard.Usable(t, name);
        Guard.Rank(t, 2, name, "of prompt embeddings [rows, D]");
        Guard.Floating(t, name);
        Guard.NotEmpty(t, name);
    }
}
