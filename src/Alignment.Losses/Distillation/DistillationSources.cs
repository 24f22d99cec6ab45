using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Where the student's next-token logits come from: materialised logits [N, T, V], or the last hidden states and the
/// LM head, in which case no [N, T, V] tensor is ever built (chunks of [rows, V] are formed, used and freed, forward and
/// backward). The gradient flows into the logits, or into the hidden states, the head weight and its bias.
/// </summary>
public sealed class DistillationStudent
{
    private DistillationStudent(Tensor? logits, Tensor? hidden, Tensor? weight, Tensor? bias)
    {
        Logits = logits;
        Hidden = hidden;
        Weight = weight;
        Bias = bias;
    }

    internal Tensor? Logits { get; }
    internal Tensor? Hidden { get; }
    internal Tensor? Weight { get; }
    internal Tensor? Bias { get; }
    internal bool IsHead => Hidden is not null;

    /// <summary>The student's logits [N, T, V] (padded) or [1, P, V] (packed), with grad.</summary>
    /// <exception cref="ArgumentNullException"><paramref name="logits"/> is null.</exception>
    public static DistillationStudent FromLogits(Tensor logits) =>
        new(logits ?? throw new ArgumentNullException(nameof(logits)), null, null, null);

    /// <summary>The student's last hidden states [N, T, H] and LM head (weight [V, H], optional bias [V]), all with grad as
    /// the model has them: the fused path (peak about one chunk of [rows, V] per model).</summary>
    /// <exception cref="ArgumentNullException"><paramref name="hidden"/> or <paramref name="weight"/> is null.</exception>
    public static DistillationStudent FromHead(Tensor hidden, Tensor weight, Tensor? bias = null) =>
        new(null, hidden ?? throw new ArgumentNullException(nameof(hidden)), weight ?? throw new ArgumentNullException(nameof(weight)), bias);
}

/// <summary>
/// Where the teacher's next-token distribution comes from: logits [N, T, V], its hidden states and frozen LM head (the
/// fused path: no [N, T, V] tensor), or precomputed top-k logits (or log-probs) with their token ids [N, T, k], e.g. from
/// a teacher server. No gradient ever flows into the teacher.
/// </summary>
public sealed class DistillationTeacher
{
    private DistillationTeacher(Tensor? logits, Tensor? hidden, Tensor? weight, Tensor? bias, Tensor? topKIds)
    {
        Logits = logits;
        Hidden = hidden;
        Weight = weight;
        Bias = bias;
        TopKIds = topKIds;
    }

    internal Tensor? Logits { get; }
    internal Tensor? Hidden { get; }
    internal Tensor? Weight { get; }
    internal Tensor? Bias { get; }
    internal Tensor? TopKIds { get; }
    internal bool IsHead => Hidden is not null;
    internal bool IsTopK => TopKIds is not null;

    /// <summary>The teacher's logits [N, T, V] (or [1, P, V] packed), in the student's layout; detached here.</summary>
    /// <exception cref="ArgumentNullException"><paramref name="logits"/> is null.</exception>
    public static DistillationTeacher FromLogits(Tensor logits) =>
        new(logits ?? throw new ArgumentNullException(nameof(logits)), null, null, null, null);

    /// <summary>The teacher's last hidden states [N, T, H_t] and LM head (weight [V, H_t], optional bias [V]); the hidden
    /// size may differ from the student's, the vocabulary may not. Detached here.</summary>
    /// <exception cref="ArgumentNullException"><paramref name="hidden"/> or <paramref name="weight"/> is null.</exception>
    public static DistillationTeacher FromHead(Tensor hidden, Tensor weight, Tensor? bias = null) =>
        new(null, hidden ?? throw new ArgumentNullException(nameof(hidden)), weight ?? throw new ArgumentNullException(nameof(weight)), bias, null);

    /// <summary>
    /// The teacher's k most likely tokens per position: their logits (or log-probs: only differences matter, the
    /// distribution is renormalised over the k) [N, T, k] and int64 token ids [N, T, k], distinct per position. The
    /// divergence is then taken over this support (see <see cref="TokenDivergence.TopK"/>, <see cref="TokenDivergence.StudentTail"/>).
    /// </summary>
    /// <exception cref="ArgumentNullException">An argument is null.</exception>
    public static DistillationTeacher FromTopK(Tensor logits, Tensor ids) =>
        new(logits ?? throw new ArgumentNullException(nameof(logits)), null, null, null, ids ?? throw new ArgumentNullException(nameof(ids)));
}
