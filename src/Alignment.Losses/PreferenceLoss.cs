using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Base of the library's losses, and the extension point for yours: it validates the batch, upcasts to the compute
/// dtype, scopes native memory, computes the standard metrics, checks the result for NaN/Inf and reads every verdict
/// back in one synchronisation, leaving only the formula to the derived loss.
/// </summary>
/// <typeparam name="TOptions">The loss's immutable options record (derived from <see cref="PreferenceLossOptions"/>).</typeparam>
/// <remarks>
/// <para>A loss of your own overrides <see cref="Name"/>, <see cref="RewardScale"/> and <see cref="Evaluate"/>, and, when it
/// reads side inputs, <see cref="Validate"/>. Every library loss is written this way; for example, DPO is:</para>
/// <code>
/// public sealed record MyDpoOptions : PreferenceLossOptions { public double Beta { get; init; } = 0.1; }
/// public sealed class MyDpo(MyDpoOptions? options = null) : PreferenceLoss&lt;MyDpoOptions&gt;(options ?? new())
/// {
///     public override string Name => "my_dpo";
///     protected override double RewardScale => Options.Beta;
///     protected override LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch) =>
///         new(PreferenceMath.NegLogSigmoid(terms.Margin * Options.Beta));
/// }
/// </code>
/// <para>Only the returned <see cref="PreferenceLossResult"/> survives a call: every temporary is disposed before
/// <see cref="Compute(PreferenceBatch)"/> returns, whether or not the caller has a dispose scope of its own. Allocation
/// failures become <see cref="InsufficientMemoryException"/> naming the loss and the batch's sizes.</para>
/// </remarks>
public abstract class PreferenceLoss<TOptions> : IPreferenceLoss, IDeferredStateLoss where TOptions : PreferenceLossOptions
{
    /// <summary>Creates the loss with its (already validated) options.</summary>
    /// <exception cref="ArgumentNullException"><paramref name="options"/> is null.</exception>
    protected PreferenceLoss(TOptions options)
    {
        Options = options ?? throw new ArgumentNullException(nameof(options));
    }

    /// <summary>The options this loss was created with.</summary>
    public TOptions Options { get; }

    /// <inheritdoc />
    public abstract string Name { get; }

    /// <summary>The scale of the reward metrics: rewards/chosen = mean(RewardScale * u_w) (beta for most losses).</summary>
    protected abstract double RewardScale { get; }

    /// <summary>Whether the loss accepts unpaired log-probs (M chosen, N rejected). Default false.</summary>
    protected virtual bool SupportsUnpaired => false;

    /// <summary>Whether an unpaired batch may have an empty side (KTO, BCO: yes; RPO: no). Default false.</summary>
    protected virtual bool SupportsEmptySide => false;

    /// <summary>
    /// Whether the standard metrics (rewards/*, logps/*) are reported. Default true; a loss whose inputs are not log-probs
    /// (the Bradley-Terry reward-model loss) reports its own instead.
    /// </summary>
    protected virtual bool ReportsStandardMetrics => true;

    /// <summary>Whether the loss needs, accepts or refuses reference log-probs. Default accepts (null = reference-free).</summary>
    protected virtual ReferenceUse ReferenceUse => ReferenceUse.Optional;

    /// <summary>
    /// Whether the batch's policy and reference tensors are log-probabilities (default true), so that a positive value (above
    /// 1e-3, for rounding in other engines) is a mistake, such as logits or rewards passed by accident, and raises a clear
    /// <see cref="ArgumentException"/> (with <see cref="PreferenceLossOptions.CheckFinite"/>). A loss whose inputs are scores
    /// (the Bradley-Terry reward-model loss) returns false.
    /// </summary>
    protected virtual bool InputsAreLogProbs => true;

    /// <summary>The largest value a log-prob input may have (rounding in other engines), above which it is refused.</summary>
    private const double LogProbTolerance = 1e-3;

    /// <summary>
    /// The loss as a function of the pair's two scores (<see cref="PairLink"/>) or of their margin (<see cref="MarginLink"/>),
    /// when it is one for these options (null, the default: not one). A loss that returns one is computed on the CPU in one
    /// fused managed pass (<see cref="PreferenceLossOptions.FusedCpu"/>); its <see cref="Evaluate"/> remains the definition,
    /// run everywhere else, and the two must agree. A loss with a <see cref="ScoreMap"/> option returns its link
    /// <see cref="PairLink.OnScores"/> that map. An override may declare the narrower return type <c>MarginLink?</c>.
    /// </summary>
    protected virtual PairLink? Link => null;

    /// <inheritdoc />
    public PreferenceLossResult Compute(PreferenceBatch batch)
    {
        ArgumentNullException.ThrowIfNull(batch);
        ArgumentNullException.ThrowIfNull(batch.Policy, "batch.Policy");
        ValidateCommon(batch);
        if (Options.FusedCpu && FusedMarginPass.Applies(batch) && Link is { } link)
        {
            var dtype = Numerics.DTypeFor(batch.Policy.Chosen, batch.Policy.Rejected, batch.Reference?.Chosen, batch.Reference?.Rejected);
            var fused = Native.Run($"{GetType().Name}.Compute ({Name})", () => Describe(batch),
                () => FusedMarginPass.TryCompute(batch, link, RewardScale, Options.CheckFinite, InputsAreLogProbs, Name, dtype));
            if (fused is not null) return fused;
        }
        return Native.Run($"{GetType().Name}.Compute ({Name})", () => Describe(batch), () => ComputeCore(batch, deferred: null));
    }

    /// <inheritdoc />
    PreferenceLossResult IDeferredStateLoss.Compute(PreferenceBatch batch, List<Action> deferred)
    {
        ArgumentNullException.ThrowIfNull(batch);
        ArgumentNullException.ThrowIfNull(batch.Policy, "batch.Policy");
        ValidateCommon(batch);
        return Native.Run($"{GetType().Name}.Compute ({Name})", () => Describe(batch), () => ComputeCore(batch, deferred));
    }

    private PreferenceLossResult ComputeCore(PreferenceBatch batch, List<Action>? deferred)
    {
        using var scope = NewDisposeScope();
        var checks = new ValueChecks();
        var extraTensors = (Validate(batch, checks) ?? Array.Empty<(Tensor?, string)>()).ToList();
        if (batch.ExampleWeights is { } exampleWeights)
        {
            if (batch.Policy.IsPaired)
                CheckPerExample(exampleWeights, batch, "batch.ExampleWeights", "per-example weights");
            else
            {
                Guard.Usable(exampleWeights, "batch.ExampleWeights");
                Guard.Rank(exampleWeights, 1, "batch.ExampleWeights", "[examples] (per-example weights)");
                Guard.Floating(exampleWeights, "batch.ExampleWeights");
                batch.Policy.CheckSameDevice(exampleWeights, "batch.ExampleWeights");
            }
            using (no_grad())
                checks.Add((exampleWeights >= 0).all(), () => new ArgumentException(
                    "batch.ExampleWeights must be non-negative and finite (a negative weight reverses a pair's preference).", "batch.ExampleWeights"));
            extraTensors.Add((exampleWeights, "batch.ExampleWeights"));
        }
        if (Options.CheckFinite && InputsAreLogProbs)
            CheckLogProbsNotPositive(batch, checks);
        var dtype = Numerics.DTypeFor(batch.Policy.Chosen, batch.Policy.Rejected, batch.Reference?.Chosen, batch.Reference?.Rejected);
        var terms = new PreferenceTerms(batch, dtype, checks);
        var output = Evaluate(terms, batch);
        CheckOutput(output);
        var perExample = Numerics.As(output.PerExample, dtype);
        if (batch.ExampleWeights is { } w)
        {
            if (w.shape[0] != perExample.shape[0])
                throw new ArgumentException(
                    $"batch.ExampleWeights has {w.shape[0]} weights but the {Name} loss has {perExample.shape[0]} per-example losses" +
                    (batch.Policy.IsPaired ? "." : " (unpaired: the chosen examples, then the rejected ones)."), "batch.ExampleWeights");
            perExample = ApplyExampleWeights(perExample, terms.Upcast(w));
            if (perExample.dim() != 1 || perExample.shape[0] != w.shape[0])
                throw new InvalidOperationException($"{GetType().Name}.ApplyExampleWeights must return [{w.shape[0]}] weighted per-example losses; got {Guard.Shape(perExample)}.");
        }
        var loss = perExample.mean();

        // [loss, standard metrics, loss-specific metrics] in one device tensor: a handful of kernels and no synchronisation
        Tensor head;
        string[] headNames;
        using (no_grad())
        {
            if (ReportsStandardMetrics)
            {
                head = terms.LossAndStandardMetrics(perExample, RewardScale, output.Rewards, output.Logps);
                headNames = PreferenceTerms.StandardMetricNames;
            }
            else
            {
                head = Numerics.As(perExample.detach(), dtype).mean().reshape(1);
                headNames = Array.Empty<string>();
            }
        }
        var (packed, names) = LossEngine.Pack(head, headNames, output.Metrics, dtype);
        LossEngine.Verify(checks, packed, Options.CheckFinite, () => NotFinite(batch, extraTensors, dtype));
        var metricValues = packed.narrow(0, 1, names.Length);
        if (output.Commit is { } commit)                             // state changes only once nothing can fail
        {
            if (deferred is null) commit();
            else deferred.Add(commit);                               // a combination runs it after its own checks
        }
        scope.MoveToOuter(loss, perExample, metricValues);
        return new PreferenceLossResult(loss, perExample, metricValues, names, Name)
        {
            UnpairedCounts = batch.Policy.IsPaired ? null : (batch.Policy.ChosenCount, batch.Policy.RejectedCount),
        };
    }

    /// <summary>
    /// A log-prob is at most 0; a positive one means logits, rewards or probabilities' logits were passed. NaN passes this
    /// check (NaN &gt; tolerance is false) so that the finite check names it as NaN.
    /// </summary>
    private void CheckLogProbsNotPositive(PreferenceBatch batch, ValueChecks checks)
    {
        var inputs = new (Tensor Tensor, string Name)[]
        {
            (batch.Policy.Chosen, "policy.Chosen"), (batch.Policy.Rejected, "policy.Rejected"),
            (batch.Reference?.Chosen!, "reference.Chosen"), (batch.Reference?.Rejected!, "reference.Rejected"),
        }.Where(i => i.Tensor is not null).ToArray();
        Exception Error()
        {
            using var noGrad = no_grad();
            var (tensor, name) = inputs.First(i => (i.Tensor.detach() > LogProbTolerance).any().item<bool>());
            double largest = tensor.detach().max().to_type(ScalarType.Float64).item<double>();
            return new ArgumentException(
                $"{name} holds positive values (the largest is {largest:G4}), but a sequence log-prob is a sum of log-probabilities, " +
                $"so it is at most 0. Were logits, rewards or scores passed instead of log-probs? (The {Name} loss reads log-probs.)", name);
        }
        if (TensorMemory.HostVectors(inputs.Select(i => i.Tensor).ToArray()))
        {
            // on the CPU the memory is read directly: no tensor ops, the verdict in order with the others
            checks.AddVerdict(!inputs.Any(i => TensorMemory.AnyAbove(i.Tensor, LogProbTolerance)), Error);
            return;
        }
        using (no_grad())
        {
            Tensor? any = null;
            foreach (var (t, _) in inputs)
            {
                var positive = (t.detach() > LogProbTolerance).any();
                any = any is null ? positive : any | positive;
            }
            checks.Add(any!.logical_not(), Error);
        }
    }

    /// <summary>A derived loss's output must be usable: named errors for the mistakes a custom loss can make.</summary>
    private void CheckOutput(LossOutput output)
    {
        if (output.PerExample is null || output.PerExample.IsInvalid)
            throw new InvalidOperationException($"{GetType().Name}.Evaluate returned no per-example losses (or a disposed tensor).");
        if (output.PerExample.dim() != 1 || !output.PerExample.is_floating_point())
            throw new InvalidOperationException(
                $"{GetType().Name}.Evaluate must return per-example losses as a 1-D floating tensor; got {output.PerExample.dtype} {Guard.Shape(output.PerExample)}.");
        LossEngine.CheckMetrics(output.Metrics, $"{GetType().Name}.Evaluate");
    }

    /// <summary>
    /// Never a silent NaN, at the cost of one small check: every non-finite input reaches the loss or a metric (an
    /// infinite log-prob that zeroes the loss still makes the reward metrics infinite), so one isfinite over
    /// [loss, metrics], read back with the other value checks in a single synchronisation, suffices. Only when it
    /// fails are the inputs examined one by one, so that the error names the offending argument; when they are all
    /// finite, the arithmetic overflowed, and the error says so with the magnitudes and options involved.
    /// </summary>
    private Exception NotFinite(PreferenceBatch batch, IEnumerable<(Tensor? Tensor, string Name)> extraTensors, ScalarType dtype)
    {
        var inputs = new List<(Tensor?, string)>
        {
            (batch.Policy.Chosen, "policy.Chosen"), (batch.Policy.Rejected, "policy.Rejected"),
            (batch.Policy.ChosenTokenCounts, "policy.ChosenTokenCounts"), (batch.Policy.RejectedTokenCounts, "policy.RejectedTokenCounts"),
            (batch.Reference?.Chosen, "reference.Chosen"), (batch.Reference?.Rejected, "reference.Rejected"),
        };
        inputs.AddRange(extraTensors);
        Guard.AllFinite(inputs.ToArray());
        var (largest, where) = inputs.Select(i => (Max: Guard.MaxAbs(new[] { i.Item1 }), Name: i.Item2)).MaxBy(i => i.Max);
        return new ArithmeticException(
            $"The {Name} loss overflowed {dtype} although every input is finite: the largest input magnitude is {largest:G4} (in {where}) and the options are {Options}. " +
            "The product of a hyperparameter and the inputs exceeds the range of the compute dtype; reduce the hyperparameter or check the scale of the inputs " +
            "(summed log-probs of real sequences are rarely beyond 1e5).");
    }

    /// <summary>
    /// Checks the loss-specific inputs and returns the extra tensors whose values must be finite (examined when the result
    /// is not finite). Structural problems (shape, dtype, device, missing inputs) throw at once; checks of values on the
    /// device are registered in <paramref name="checks"/>, read back after the formula in the call's single synchronisation.
    /// </summary>
    /// <param name="batch">The batch, after the common checks (policy and reference shapes, devices, pairing).</param>
    /// <param name="checks">Where device-side value checks are registered.</param>
    /// <returns>The side inputs to examine (with their names) when the loss or a metric is not finite.</returns>
    protected virtual IEnumerable<(Tensor? Tensor, string Name)> Validate(PreferenceBatch batch, ValueChecks checks) =>
        Array.Empty<(Tensor?, string)>();

    /// <summary>
    /// Applies <see cref="PreferenceBatch.ExampleWeights"/> (validated: one per example, non-negative, finite, detached, in the
    /// compute dtype) to the per-example losses. The default multiplies, so the loss is mean_i w_i L_i: WPO's pair weights
    /// (<see cref="SequenceLogProbsResult.WpoPairWeights"/>), density-ratio weights, or any weighting of your own. A loss
    /// whose weights mean something else overrides it (SPO weights its preference term only; AOT, whose per-example losses
    /// are per rank, refuses weights).
    /// </summary>
    /// <param name="perExample">The per-example losses from <see cref="Evaluate"/>.</param>
    /// <param name="weights">The weights, one per per-example loss.</param>
    protected virtual Tensor ApplyExampleWeights(Tensor perExample, Tensor weights)
    {
        ArgumentNullException.ThrowIfNull(perExample);
        return perExample * weights;
    }

    /// <summary>The formula: per-example losses and loss-specific metrics, computed from the upcast terms.</summary>
    /// <param name="terms">The batch in the compute dtype: log-probs, log-ratios, the margin, token counts, checks.</param>
    /// <param name="batch">The original batch, for side inputs (upcast them with <see cref="PreferenceTerms.Upcast"/>).</param>
    protected abstract LossOutput Evaluate(PreferenceTerms terms, PreferenceBatch batch);

    private void ValidateCommon(PreferenceBatch batch)
    {
        var policy = batch.Policy;
        policy.CheckUsable("policy");
        if (!policy.IsPaired && !SupportsUnpaired)
            throw new ArgumentException(
                $"The {Name} loss needs paired log-probs (row i of chosen and rejected answer the same prompt); got unpaired ones.",
                "policy");
        if (!policy.IsPaired && !SupportsEmptySide && (policy.ChosenCount == 0 || policy.RejectedCount == 0))
            throw new ArgumentException($"The {Name} loss needs at least one chosen and one rejected example; got {policy.ChosenCount} and {policy.RejectedCount}.", "policy");
        if (ReferenceUse == ReferenceUse.Refused && batch.Reference is not null)
            throw new ArgumentException(
                $"The {Name} loss is reference-free: it never reads reference log-probs, so passing them is a mistake (they would be ignored). Pass none.", "reference");
        if (ReferenceUse == ReferenceUse.Required && batch.Reference is null)
            throw new ArgumentException($"The {Name} loss needs reference log-probs (batch.Reference); got none.", "reference");
        if (batch.Reference is not { } reference) return;
        reference.CheckUsable("reference");
        if (reference.IsPaired != policy.IsPaired)
            throw new ArgumentException(
                $"reference is {(reference.IsPaired ? "paired" : "unpaired")} but policy is {(policy.IsPaired ? "paired" : "unpaired")}; build both the same way.",
                "reference");
        Guard.SameLength(policy.Chosen, "policy.Chosen", reference.Chosen, "reference.Chosen");
        Guard.SameLength(policy.Rejected, "policy.Rejected", reference.Rejected, "reference.Rejected");
        policy.CheckSameDevice(reference.Chosen, "reference.Chosen");
    }

    /// <summary>The batch's shapes, for out-of-memory messages.</summary>
    private static string Describe(PreferenceBatch batch)
    {
        var parts = new List<string>
        {
            $"policy chosen {Native.Describe(batch.Policy.Chosen)}, rejected {Guard.Shape(batch.Policy.Rejected)}",
        };
        if (batch.PromptEmbeddings is { } e)
            parts.Add(e.IsPaired ? $"prompt embeddings {Guard.Shape(e.Chosen)}" : $"prompt embeddings {Guard.Shape(e.Chosen)} and {Guard.Shape(e.Rejected)}");
        if (batch.RpoWeights is { } w) parts.Add($"weights {Guard.Shape(w)}");
        return string.Join("; ", parts);
    }

    /// <summary>Validates a per-example side input: 1-D, floating, one row per pair, on the policy's device.</summary>
    /// <param name="t">The side input (null is an error naming <paramref name="name"/>).</param>
    /// <param name="batch">The batch it belongs to.</param>
    /// <param name="name">Its name in error messages, e.g. "scores.Chosen".</param>
    /// <param name="meaning">What it holds, e.g. "the chosen responses' scores".</param>
    protected static void CheckPerExample(Tensor? t, PreferenceBatch batch, string name, string meaning)
    {
        ArgumentNullException.ThrowIfNull(batch);
        if (t is null)
            throw new ArgumentException($"{name} is required: {meaning}.", name);
        Guard.Usable(t, name);
        Guard.Rank(t, 1, name, $"[batch] ({meaning})");
        Guard.Floating(t, name);
        Guard.SameLength(batch.Policy.Chosen, "policy.Chosen", t, name);
        batch.Policy.CheckSameDevice(t, name);
    }
}

/// <summary>How a loss uses reference log-probs.</summary>
public enum ReferenceUse
{
    /// <summary>Optional: with none, l_ref = 0 (the DPO family's reference-free variants).</summary>
    Optional,

    /// <summary>Required (KTO, BCO).</summary>
    Required,

    /// <summary>Refused: the loss is reference-free by definition (CPO, SimPO, AlphaPO, ORPO, the reward-model loss).</summary>
    Refused,
}

/// <summary>
/// A loss whose caller-owned state changes (<see cref="LossOutput.Commit"/>) can be handed to the caller instead of run,
/// so that a combination (<see cref="WeightedLoss"/>) runs them only once its own checks have passed too.
/// </summary>
internal interface IDeferredStateLoss
{
    /// <summary>Computes like <see cref="IPreferenceLoss.Compute"/>, adding its state change to <paramref name="deferred"/> instead of running it.</summary>
    PreferenceLossResult Compute(PreferenceBatch batch, List<Action> deferred);
}
