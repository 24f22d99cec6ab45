using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// A token-level objective: per-token losses over sampled completions, reduced by a <see cref="TokenReduction"/> with
/// the window's global counts. The second contract beside <see cref="IPreferenceLoss"/>, on the same engine.
/// </summary>
public interface ITokenLoss
{
    /// <summary>A short name (e.g. "grpo", "dapo", "cispo").</summary>
    string Name { get; }

    /// <summary>The reduction applied to the per-token losses.</summary>
    TokenReduction Reduction { get; }

    /// <summary>Computes the loss of one micro-batch.</summary>
    /// <param name="batch">Per-token log-probs, mask, old/reference/behaviour log-probs, advantages, window counts.</param>
    /// <returns>The loss (with grad), the per-token and per-sequence losses and metrics; the caller disposes it.</returns>
    TokenLossResult Compute(TokenBatch batch);
}

/// <summary>Options shared by every token-level loss.</summary>
public abstract record TokenLossOptions
{
    /// <summary>
    /// When true (the default), a NaN/Inf at a valid token of any input, or a positive log-prob, raises a clear
    /// <see cref="ArgumentException"/> naming the input; the check is one isfinite over [loss, metrics] read back with the
    /// call's other value checks in a single synchronisation.
    /// </summary>
    public bool CheckFinite { get; init; } = true;
}

/// <summary>What a token loss's formula produces: per-token losses (with grad) and its own metrics.</summary>
/// <param name="PerToken">[N, T] per-token losses in the batch's layout (values where no token counts are ignored).</param>
/// <param name="Metrics">The loss's own metrics as one-element tensors, under TRL's names.</param>
public readonly record struct TokenLossOutput(Tensor PerToken, IReadOnlyList<(string Name, Tensor Value)> Metrics)
{
    /// <summary>Per-token losses without metrics of the loss's own.</summary>
    public TokenLossOutput(Tensor perToken) : this(perToken, Array.Empty<(string, Tensor)>()) { }

    /// <summary>
    /// True when <see cref="PerToken"/> holds one value per sequence broadcast over its tokens (a sequence-level ratio with
    /// per-sequence advantages): such a loss reduces only by the sequence mean of token means (see <see cref="TokenReduction"/>).
    /// </summary>
    public bool SequenceLevel { get; init; }

    /// <summary>
    /// A per-token term always reduced as a token mean over the window (N_win), whatever the loss's reduction, and added to
    /// the loss: the entropy bonus -c H. Null (default): none.
    /// </summary>
    public Tensor? TokenMeanTerm { get; init; }
}

/// <summary>
/// Base of the library's token-level losses, and the extension point for yours: it validates the batch (shapes, layout,
/// devices, window), upcasts to the compute dtype, masks every per-token input, scopes native memory, reduces, checks the
/// result for NaN/Inf and reads every verdict back in one synchronisation, leaving only the per-token formula to the
/// derived loss.
/// </summary>
/// <typeparam name="TOptions">The loss's immutable options record.</typeparam>
/// <remarks>
/// <para>A loss of your own overrides <see cref="Name"/>, <see cref="Reduction"/> and <see cref="Evaluate"/> (and
/// <see cref="Validate"/> when it needs inputs): for example plain REINFORCE is
/// <c>protected override TokenLossOutput Evaluate(TokenTerms t) =&gt; new(-t.Advantages! * t.LogProbs);</c>.
/// Policy-gradient losses derive from <see cref="PolicyGradientLoss{TOptions}"/>, which adds the KL term, the entropy
/// bonus, the rollout correction and TRL's metrics.</para>
/// <para>Only the returned <see cref="TokenLossResult"/> survives a call: every temporary is disposed before
/// <see cref="Compute"/> returns, with or without a dispose scope of the caller's. Allocation failures become
/// <see cref="InsufficientMemoryException"/> naming the loss and the batch's shape.</para>
/// </remarks>
public abstract class TokenLoss<TOptions> : ITokenLoss where TOptions : TokenLossOptions
{
    /// <summary>The largest value a log-prob input may have (rounding in other engines), above which it is refused.</summary>
    private const double LogProbTolerance = 1e-3;

    /// <summary>Creates the loss with its options.</summary>
    /// <exception cref="ArgumentNullException"><paramref name="options"/> is null.</exception>
    protected TokenLoss(TOptions options)
    {
        Options = options ?? throw new ArgumentNullException(nameof(options));
    }

    /// <summary>The options this loss was created with.</summary>
    public TOptions Options { get; }

    /// <inheritdoc />
    public abstract string Name { get; }

    /// <inheritdoc />
    public abstract TokenReduction Reduction { get; }

    /// <inheritdoc />
    public TokenLossResult Compute(TokenBatch batch)
    {
        ArgumentNullException.ThrowIfNull(batch);
        var segments = ValidateCommon(batch);
        return Native.Run($"{GetType().Name}.Compute ({Name})", () => $"log-probs {Native.Describe(batch.LogProbs)}",
            () => ComputeFused(batch) ?? ComputeCore(batch, segments));
    }

    /// <summary>
    /// The loss through a fused path when one applies (the policy-gradient losses' CPU pass), after the common checks; null
    /// (the default) runs the op-by-op path, which is also the fallback of every failed check.
    /// </summary>
    private protected virtual TokenLossResult? ComputeFused(TokenBatch batch) => null;

    private TokenLossResult ComputeCore(TokenBatch batch, Segments segments)
    {
        using var scope = NewDisposeScope();
        var checks = new ValueChecks();
        var dtype = Numerics.DTypeFor(batch.LogProbs, batch.OldLogProbs, batch.ReferenceLogProbs, batch.BehaviourLogProbs);
        var terms = new TokenTerms(batch, segments, dtype, checks);
        Validate(batch, terms);
        if (batch.Mask.is_floating_point())
        {
            using (no_grad())
                checks.Add(isfinite(batch.Mask).all(), () => new ArgumentException(
                    "batch.Mask holds NaN or Inf; a mask marks each token with 0 (skip) or a nonzero value (count).", "batch.Mask"));
        }
        var inputs = Inputs(batch, terms);
        if (Options.CheckFinite) CheckLogProbsNotPositive(inputs.Where(i => i.IsLogProb).ToArray(), terms, checks);
        var output = Evaluate(terms);
        if (output.PerToken is null || output.PerToken.IsInvalid || !output.PerToken.is_floating_point()
            || !output.PerToken.shape.SequenceEqual(terms.Valid.shape))
            throw new InvalidOperationException(
                $"{GetType().Name}.Evaluate must return per-token losses shaped like the log-probs {Guard.Shape(terms.Valid)} (floating); got " +
                (output.PerToken is null || output.PerToken.IsInvalid ? "none" : $"{output.PerToken.dtype} {Guard.Shape(output.PerToken)}") + ".");
        LossEngine.CheckMetrics(output.Metrics, $"{GetType().Name}.Evaluate");
        if (output.SequenceLevel && Reduction.SumsTokens)
            throw new ArgumentException(
                $"The {Name} loss is one value per sequence (a sequence-level ratio with per-sequence advantages), so it reduces only as the sequence mean " +
                $"of token means; {Reduction} would weigh each sequence's loss by its length (TRL issue 3823). Use TokenReduction.SequenceMeanTokenMean, " +
                "or token-level advantages.", "reduction");
        var perToken = terms.MaskOut(Numerics.As(output.PerToken, dtype));
        var perSequence = terms.SequenceMean(perToken);
        var loss = Reduction.Reduce(perToken, perSequence, terms, batch.Window);
        if (output.TokenMeanTerm is { } extra)
        {
            if (!extra.shape.SequenceEqual(terms.Valid.shape))
                throw new InvalidOperationException($"{GetType().Name}.Evaluate returned a TokenMeanTerm shaped {Guard.Shape(extra)}, not like the log-probs {Guard.Shape(terms.Valid)}.");
            loss = loss + TokenReduction.TokenMean.Reduce(terms.MaskOut(Numerics.As(extra, dtype)), null, terms, batch.Window);
        }
        var (packed, names) = LossEngine.Pack(loss.reshape(1), Array.Empty<string>(), output.Metrics, dtype);
        LossEngine.Verify(checks, packed, Options.CheckFinite, () => NotFinite(inputs, terms, dtype));
        var metricValues = packed.narrow(0, 1, names.Length);
        var result = new TokenLossResult(loss, perToken, perSequence, metricValues, names, Name, terms.ValidTokens);
        result.MoveToOuter(scope);
        return result;
    }

    /// <summary>The inputs as the caller named them, masked to the valid tokens, for the value checks and error messages.</summary>
    private static List<(Tensor Tensor, string Name, bool IsLogProb)> Inputs(TokenBatch batch, TokenTerms terms)
    {
        var list = new List<(Tensor, string, bool)> { (terms.LogProbs, "batch.LogProbs", true) };
        if (batch.OldLogProbs is not null) list.Add((terms.OldLogProbs, "batch.OldLogProbs", true));
        if (terms.ReferenceLogProbs is { } r) list.Add((r, "batch.ReferenceLogProbs", true));
        if (terms.BehaviourLogProbs is { } b) list.Add((b, "batch.BehaviourLogProbs", true));
        if (terms.Advantages is { } a) list.Add((a, "batch.Advantages", false));
        if (terms.Entropy is { } h) list.Add((h, "batch.Entropy", false));
        return list;
    }

    private void CheckLogProbsNotPositive((Tensor Tensor, string Name, bool IsLogProb)[] inputs, TokenTerms terms, ValueChecks checks)
    {
        using var noGrad = no_grad();
        Tensor? any = null;
        foreach (var (t, _, _) in inputs)
        {
            var positive = (t.detach() > LogProbTolerance).any();
            any = any is null ? positive : any | positive;
        }
        if (any is null) return;
        checks.Add(any.logical_not(), () =>
        {
            using var inner = no_grad();
            var (tensor, name, _) = inputs.First(i => (i.Tensor.detach() > LogProbTolerance).any().item<bool>());
            double largest = tensor.detach().max().to_type(ScalarType.Float64).item<double>();
            return new ArgumentException(
                $"{name} holds positive values at valid tokens (the largest is {largest:G4}), but a token log-prob is at most 0. " +
                $"Were logits, probabilities' logits or rewards passed instead of log-probs? (The {Name} loss reads per-token log-probs.)", name);
        });
    }

    /// <summary>Names the non-finite input (at a valid token), or reports an overflow of finite inputs.</summary>
    private Exception NotFinite(List<(Tensor Tensor, string Name, bool IsLogProb)> inputs, TokenTerms terms, ScalarType dtype)
    {
        Guard.AllFinite(inputs.Select(i => ((Tensor?)i.Tensor, i.Name)).ToArray());
        var (largest, where) = inputs.Select(i => (Max: Guard.MaxAbs(new[] { i.Tensor }), i.Name)).MaxBy(i => i.Max);
        return new ArithmeticException(
            $"The {Name} loss overflowed {dtype} although every input is finite at the valid tokens: the largest input magnitude is {largest:G4} " +
            $"(in {where}) and the options are {Options}. Check the scale of the advantages and the log-ratio clamp (a log-ratio beyond ~88 overflows exp in float32).");
    }

    /// <summary>
    /// Checks the loss-specific inputs (structural problems throw at once; value checks go to <see cref="TokenTerms.Checks"/>).
    /// The default requires nothing.
    /// </summary>
    /// <param name="batch">The batch, after the common checks (shapes, layout, devices, window).</param>
    /// <param name="terms">The batch in the compute dtype.</param>
    protected virtual void Validate(TokenBatch batch, TokenTerms terms) { }

    /// <summary>The formula: per-token losses and metrics from the upcast, masked terms.</summary>
    protected abstract TokenLossOutput Evaluate(TokenTerms terms);

    /// <summary>Requires an input of the batch, naming it and the loss when it is missing.</summary>
    protected void Require(Tensor? input, string name, string why)
    {
        if (input is null)
            throw new ArgumentException($"The {Name} loss needs {name}: {why}.", name);
    }

    private static Segments ValidateCommon(TokenBatch batch)
    {
        var l = batch.LogProbs;
        Guard.Usable(l, "batch.LogProbs");
        if (l.dim() != 2)
            throw new ArgumentException($"batch.LogProbs must be [N, T] per-token log-probs (one completion per row, or [1, P] packed); got {Guard.Shape(l)}.", "batch.LogProbs");
        Guard.Floating(l, "batch.LogProbs");
        if (l.shape[0] == 0 || l.shape[1] == 0)
            throw new ArgumentException($"batch.LogProbs is empty ({Guard.Shape(l)}); a token loss needs at least one completion.", "batch.LogProbs");
        var m = batch.Mask;
        Guard.Usable(m, "batch.Mask");
        if (!m.shape.SequenceEqual(l.shape))
            throw new ArgumentException($"batch.Mask must have the log-probs' shape {Guard.Shape(l)}; got {Guard.Shape(m)}.", "batch.Mask");
        if (m.is_complex())
            throw new ArgumentException($"batch.Mask must be bool, integer or floating; got {m.dtype}.", "batch.Mask");
        Guard.SameDevice(l, "batch.LogProbs", m, "batch.Mask");
        foreach (var (t, name) in new[] { (batch.OldLogProbs, "batch.OldLogProbs"), (batch.ReferenceLogProbs, "batch.ReferenceLogProbs"),
                     (batch.BehaviourLogProbs, "batch.BehaviourLogProbs"), (batch.Entropy, "batch.Entropy") })
        {
            if (t is null) continue;
            Guard.Usable(t, name);
            if (!t.shape.SequenceEqual(l.shape))
                throw new ArgumentException($"{name} must have the log-probs' shape {Guard.Shape(l)} (same tokens, same layout); got {Guard.Shape(t)}.", name);
            Guard.Floating(t, name);
            Guard.SameDevice(l, "batch.LogProbs", t, name);
        }
        if (batch.Boundaries is { } b)
        {
            if (batch.ScoredSegments is not null)
                throw new ArgumentException("batch.Boundaries must not be set on a batch built from packed log-probs (FromLogProbs keeps their layout).", "batch.Boundaries");
            if (l.shape[0] != 1)
                throw new ArgumentException($"A packed batch (batch.Boundaries set) has one row [1, P]; got {Guard.Shape(l)}.", "batch.Boundaries");
            if (b.TotalTokens > l.shape[1])
                throw new ArgumentException($"batch.Boundaries cover {b.TotalTokens} positions but the packed row has {l.shape[1]}.", "batch.Boundaries");
        }
        var segments = batch.SegmentsFor(l);
        if (batch.Advantages is { } a)
        {
            Guard.Usable(a, "batch.Advantages");
            Guard.Floating(a, "batch.Advantages");
            Guard.SameDevice(l, "batch.LogProbs", a, "batch.Advantages");
            bool perSequence = a.dim() == 1 && a.shape[0] == segments.Count;
            bool perToken = a.shape.SequenceEqual(l.shape);
            if (!perSequence && !perToken)
                throw new ArgumentException(
                    $"batch.Advantages must be [{segments.Count}] (one per sequence) or {Guard.Shape(l)} (one per token, like the log-probs); got {Guard.Shape(a)}.",
                    "batch.Advantages");
        }
        batch.Window?.Validate();
        return segments;
    }
}

/// <summary>
/// What a token-level loss returns: the scalar loss (differentiable), the per-token losses [N, T] (0 where no token
/// counts), the per-sequence token means [N], and detached metrics under TRL's names (see <see cref="LossResult"/>).
/// </summary>
public sealed class TokenLossResult : LossResult
{
    private readonly Tensor _perToken, _perSequence, _tokenCount;

    internal TokenLossResult(Tensor loss, Tensor perToken, Tensor perSequence, Tensor metricValues, string[] metricNames, string lossName,
        Tensor? tokenCount = null)
        : base(loss, metricValues, metricNames, lossName)
    {
        _perToken = perToken;
        _perSequence = perSequence;
        _tokenCount = tokenCount ?? tensor((double)perSequence.shape[0]);
    }

    /// <summary>
    /// Builds a result for a token loss of your own that implements <see cref="ITokenLoss"/> directly (deriving from
    /// <see cref="TokenLoss{TOptions}"/> builds it for you). Takes ownership of the tensors.
    /// </summary>
    public TokenLossResult(Tensor loss, Tensor perToken, Tensor perSequence, IEnumerable<KeyValuePair<string, double>> metrics)
        : this(loss ?? throw new ArgumentNullException(nameof(loss)), perToken ?? throw new ArgumentNullException(nameof(perToken)),
            perSequence ?? throw new ArgumentNullException(nameof(perSequence)), HostMetrics(metrics, out var names), names, "custom")
    {
    }

    /// <summary>[N, T] the per-token losses before reduction (with grad), in the batch's layout; 0 where no token counts.</summary>
    public Tensor PerToken => Alive(_perToken);

    /// <summary>[N] each sequence's mean per-token loss (with grad; 0 for a sequence without a valid token).</summary>
    public Tensor PerSequence => Alive(_perSequence);

    /// <summary>The micro-batch's valid tokens (0-d): the weight of its token-mean metrics in <see cref="Metrics.MetricsAccumulator"/>
    /// (the number of sequences for a result built by a custom <see cref="ITokenLoss"/>).</summary>
    internal Tensor TokenCount => Alive(_tokenCount);

    private protected override IEnumerable<Tensor> OwnedTensors => new[] { _perToken, _perSequence, _tokenCount };
}
