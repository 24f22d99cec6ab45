using Alignment.Losses.Internal;

namespace Alignment.Losses;

/// <summary>The divergence between the student's and the teacher's next-token distributions.</summary>
public enum DivergenceKind
{
    /// <summary>
    /// Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024, arXiv 2306.13649):
    /// JSD_beta = beta KL(T || M) + (1 - beta) KL(S || M) with M = beta T + (1 - beta) S. As in TRL and Liger, beta = 0 is
    /// <b>defined</b> as forward KL(T || S) and beta = 1 as reverse KL(S || T); the interior formula itself tends to 0 at
    /// both ends, so the objective jumps there (see <see cref="TokenDivergence"/>).
    /// </summary>
    GeneralizedJsd,

    /// <summary>Forward KL(T || S) = sum_v T_v (log T_v - log S_v): mass-covering (TRL's beta = 0; torch's kl_div(log S, log T)).</summary>
    ForwardKl,

    /// <summary>Reverse KL(S || T) = sum_v S_v (log S_v - log T_v): mode-seeking (TRL's beta = 1; MiniLLM).</summary>
    ReverseKl,

    /// <summary>Total variation distance 0.5 sum_v |S_v - T_v| (Liger's TVD loss), in [0, 1].</summary>
    TotalVariation,
}

/// <summary>
/// Which divergence a distillation loss takes per token, between S = softmax(z_student / tau) and
/// T = softmax(z_teacher / tau), over the full vocabulary or the teacher's top-k tokens. Immutable; validated on construction.
/// </summary>
/// <remarks>
/// <para><b>Directions.</b> Forward KL(T || S) weighs by the teacher, reverse KL(S || T) by the student. torch's
/// <c>kl_div(input, target)</c> is KL(target || input), so TRL's <c>kl_div(student_log_probs, teacher_log_probs)</c> is
/// the forward KL; the tests pin each direction on the spec's 3-class example.</para>
/// <para><b>The JSD endpoints.</b> For 0 &lt; beta &lt; 1 the interior formula is used; it tends to 0 as beta tends to 0 or 1
/// (M tends to S or T). TRL (<c>generalized_jsd_loss</c>) and Liger special-case beta = 0 as forward KL and beta = 1 as
/// reverse KL, and so does this library: S = softmax([1, 0, -1]), T = softmax([0, 1, 0.5]) gives 0.5082868 at beta 0,
/// 0.0452787 at 0.1, 0.1260875 at 0.5, 0.0486519 at 0.9 and 0.5581303 at 1. Defaults: TRL's GKD trainer beta 0.5, TRL's
/// distillation trainer beta 1.0 (reverse KL).</para>
/// <para><b>Top-k</b> (<see cref="TopK"/>; NeMo-RL's distillation). The teacher's distribution is renormalised over its
/// k most likely tokens. Without <see cref="StudentTail"/> the student's is renormalised over the same k tokens and the
/// divergence is taken on that k-simplex (NeMo's default). With it (NeMo's <c>zero_outside_topk</c>) the student keeps its
/// full distribution and the teacher has zero mass outside the top-k: the student's mass outside then counts, and where a
/// divergence needs the teacher's log-probability there (reverse KL) it is <see cref="TailLogProb"/> (NeMo: -100).</para>
/// <para><b>Temperature.</b> Both models' logits are divided by tau before their softmaxes (TRL, Liger). TRL's GKD trainer
/// computes its loss at tau = 1 (its <c>temperature</c> is the sampling one); TRL's distillation trainer uses its
/// <c>temperature</c> in the loss too. No tau^2 factor is applied (neither TRL nor Liger does; multiply the weight by tau^2
/// for Hinton's convention).</para>
/// </remarks>
public sealed record TokenDivergence
{
    /// <summary>A divergence.</summary>
    /// <param name="kind">Which divergence.</param>
    /// <param name="beta">The JSD's beta in [0, 1] (default 0.5, TRL's GKD); refused for the other kinds unless left at 0.5.</param>
    /// <param name="temperature">tau &gt; 0 (default 1).</param>
    /// <param name="topK">Restrict to the teacher's k most likely tokens (k &gt;= 1); null (default): the full vocabulary.</param>
    /// <param name="studentTail">With <paramref name="topK"/>: keep the student's mass outside the top-k (NeMo's zero_outside_topk).</param>
    /// <param name="tailLogProb">The teacher's log-probability outside the top-k where a divergence needs one (default -100, NeMo's).</param>
    /// <exception cref="ArgumentException">A value is out of range or an option is given where it has no meaning.</exception>
    public TokenDivergence(DivergenceKind kind, double beta = 0.5, double temperature = 1.0, int? topK = null, bool studentTail = false,
        double tailLogProb = -100)
    {
        Kind = Guard.Defined(kind, nameof(kind));
        if (kind == DivergenceKind.GeneralizedJsd)
            Beta = Guard.InClosedRange(beta, 0, 1, nameof(beta));
        else if (beta != 0.5)
            throw new ArgumentException($"beta is the generalised JSD's coefficient; {kind} has none (got {beta:G}).", nameof(beta));
        else Beta = beta;
        Temperature = Guard.Scale(temperature, nameof(temperature));
        if (topK is { } k && k < 1)
            throw new ArgumentOutOfRangeException(nameof(topK), topK, "topK must be >= 1 (or null for the full vocabulary).");
        if (studentTail && topK is null)
            throw new ArgumentException("studentTail accounts for the student's mass outside the teacher's top-k; set topK too.", nameof(studentTail));
        if (!(tailLogProb <= 0 && double.IsFinite(tailLogProb)))
            throw new ArgumentOutOfRangeException(nameof(tailLogProb), tailLogProb, "tailLogProb is a log-probability: finite and <= 0.");
        TopK = topK;
        StudentTail = studentTail;
        TailLogProb = tailLogProb;
    }

    /// <summary>Which divergence (the JSD's endpoints resolved: see <see cref="Effective"/>).</summary>
    public DivergenceKind Kind { get; }

    /// <summary>The generalised JSD's beta (0.5 for the other kinds, unused).</summary>
    public double Beta { get; }

    /// <summary>The temperature tau applied to both models' logits.</summary>
    public double Temperature { get; }

    /// <summary>The teacher's top-k support; null for the full vocabulary.</summary>
    public int? TopK { get; }

    /// <summary>Whether the student's mass outside the top-k counts (NeMo's zero_outside_topk).</summary>
    public bool StudentTail { get; }

    /// <summary>The teacher's log-probability outside the top-k where one is needed (reverse KL with <see cref="StudentTail"/>).</summary>
    public double TailLogProb { get; }

    /// <summary>The divergence actually computed: the JSD at beta 0 is forward KL, at beta 1 reverse KL (TRL's endpoints).</summary>
    public DivergenceKind Effective => Kind switch
    {
        DivergenceKind.GeneralizedJsd when Beta == 0 => DivergenceKind.ForwardKl,
        DivergenceKind.GeneralizedJsd when Beta == 1 => DivergenceKind.ReverseKl,
        _ => Kind,
    };

    /// <summary>Generalised JSD at <paramref name="beta"/> (TRL's GKD default 0.5).</summary>
    public static TokenDivergence Jsd(double beta = 0.5, double temperature = 1.0) => new(DivergenceKind.GeneralizedJsd, beta, temperature);

    /// <summary>Forward KL(T || S).</summary>
    public static TokenDivergence ForwardKl(double temperature = 1.0) => new(DivergenceKind.ForwardKl, temperature: temperature);

    /// <summary>Reverse KL(S || T).</summary>
    public static TokenDivergence ReverseKl(double temperature = 1.0) => new(DivergenceKind.ReverseKl, temperature: temperature);

    /// <summary>Total variation distance.</summary>
    public static TokenDivergence TotalVariation(double temperature = 1.0) => new(DivergenceKind.TotalVariation, temperature: temperature);

    /// <summary>The same divergence over the teacher's top-<paramref name="k"/> tokens (with the student's tail when <paramref name="studentTail"/>).</summary>
    public TokenDivergence WithTopK(int k, bool studentTail = false) => new(Kind, Beta, Temperature, k, studentTail, TailLogProb);

    /// <inheritdoc />
    public override string ToString() =>
        (Kind == DivergenceKind.GeneralizedJsd ? $"GeneralizedJsd(beta {Beta:G})" : Kind.ToString()) +
        (Temperature != 1 ? $", tau {Temperature:G}" : "") +
        (TopK is { } k ? $", top-{k}{(StudentTail ? $" with the student's tail (log eps {TailLogProb:G})" : "")}" : "");
}
