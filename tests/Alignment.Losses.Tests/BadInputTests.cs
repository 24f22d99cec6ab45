using Alignment.Losses;
using FsCheck.Fluent;

namespace Alignment.Losses.Tests;

/// <summary>
/// Table-driven: every invalid input raises the documented exception type, with a message that names the argument
/// (ArgumentException.ParamName and the text). Nothing returns NaN silently.
/// </summary>
public class BadInputTests
{
    public sealed record Case(string Name, Action Act, Type Exception, string Names)
    {
        public override string ToString() => Name;
    }

    static Tensor F(params float[] v) => tensor(v);
    static PreferenceLogps Ok(int n = 3) => new(randn(n) - 10, randn(n) - 10);
    static readonly Type AE = typeof(ArgumentException), AOOR = typeof(ArgumentOutOfRangeException);

    /// <summary>The generic cases, run for every loss in the catalogue.</summary>
    static IEnumerable<Case> Generic(LossCase c)
    {
        var x = Generators.One(4, 4) with { Kl = 0.5 };
        IPreferenceLoss L() => c.Make(x);
        PreferenceBatch B() => c.Batch(new BatchTensors(x, ScalarType.Float32));
        PreferenceBatch WithPolicy(PreferenceBatch b, Func<Tensor, Tensor> f) =>
            b with { Policy = b.Policy.IsPaired ? new PreferenceLogps(f(b.Policy.Chosen), b.Policy.Rejected, b.Policy.ChosenTokenCounts, b.Policy.RejectedTokenCounts) : PreferenceLogps.Unpaired(f(b.Policy.Chosen), b.Policy.Rejected) };
        yield return new($"{c.Name}: NaN in policy chosen", () => L().Compute(WithPolicy(B(), t => t.detach().clone().index_fill_(0, tensor(new long[] { 1 }), double.NaN))), AE, "policy.Chosen");
        yield return new($"{c.Name}: Inf in policy chosen", () => L().Compute(WithPolicy(B(), t => t.detach().clone().index_fill_(0, tensor(new long[] { 0 }), double.NegativeInfinity))), AE, "policy.Chosen");
        // +Inf chosen drives DPO-like losses to exactly 0: the check must still catch it (through the reward metrics)
        yield return new($"{c.Name}: +Inf in policy chosen (loss would be 0)", () => L().Compute(WithPolicy(B(), t => t.detach().clone().index_fill_(0, tensor(new long[] { 1 }), double.PositiveInfinity))), AE, "policy.Chosen");
        yield return new($"{c.Name}: -Inf in policy rejected (loss would be 0)", () =>
        {
            var b = B();
            var bad = b.Policy.Rejected.detach().clone().index_fill_(0, tensor(new long[] { 0 }), double.NegativeInfinity);
            L().Compute(b with { Policy = b.Policy.IsPaired ? new PreferenceLogps(b.Policy.Chosen, bad, b.Policy.ChosenTokenCounts, b.Policy.RejectedTokenCounts) : PreferenceLogps.Unpaired(b.Policy.Chosen, bad) });
        }, AE, "policy.Rejected");
        var probe = B();
        bool unpairedFeedback = !probe.Policy.IsPaired;               // KTO, BCO, ... (and unpaired RPO) take unpaired batches
        // SPO does not use the reference; the reference-free cases (and the reward model) have none
        if (c.Name != "spo" && probe.Reference is not null)
        {
            yield return new($"{c.Name}: NaN in reference", () =>
            {
                var b = B();
                var r = b.Reference!;
                var bad = r.Rejected.clone().index_fill_(0, tensor(new long[] { 0 }), double.NaN);
                L().Compute(b with { Reference = r.IsPaired ? new PreferenceLogps(r.Chosen, bad) : PreferenceLogps.Unpaired(r.Chosen, bad) });
            }, AE, "reference.Rejected");
            yield return new($"{c.Name}: reference length differs", () =>
            {
                var b = B();
                var r = b.Reference!;
                L().Compute(b with { Reference = r.IsPaired ? new PreferenceLogps(r.Chosen.narrow(0, 0, 3), r.Rejected.narrow(0, 0, 3)) : PreferenceLogps.Unpaired(r.Chosen.narrow(0, 0, 3), r.Rejected) });
            }, AE, "reference.Chosen");
        }
        if (!unpairedFeedback)
            yield return new($"{c.Name}: unpaired log-probs", () =>
            {
                if (c.Name.StartsWith("rpo", StringComparison.Ordinal) && c.Name != "rpo_diagonal")
                {
                    // RPO accepts unpaired data, but not with paired embeddings / a paired reference
                    var b = B();
                    L().Compute(b with { Policy = PreferenceLogps.Unpaired(b.Policy.Chosen, b.Policy.Rejected) });
                }
                else L().Compute(B() with { Policy = PreferenceLogps.Unpaired(F(-1, -2, -3), F(-1, -2)), Reference = null });
            }, AE, "policy reference batch.PromptEmbeddings");
    }

    static IEnumerable<Case> Specific()
    {
        // PreferenceLogps construction
        yield return new("chosen not 1-D", () => new PreferenceLogps(randn(2, 3), randn(2)), AE, "chosen");
        yield return new("rejected integer dtype", () => new PreferenceLogps(randn(3), tensor(new long[] { 1, 2, 3 })), AE, "rejected");
        yield return new("paired lengths differ", () => new PreferenceLogps(randn(3), randn(4)), AE, "rejected");
        yield return new("empty batch", () => new PreferenceLogps(zeros(0), zeros(0)), AE, "chosen");
        yield return new("different devices", () => new PreferenceLogps(randn(3), empty(3, device: META)), AE, "rejected");
        yield return new("token counts wrong length", () => new PreferenceLogps(randn(3), randn(3), ones(2), ones(3)), AE, "chosenTokenCounts");
        yield return new("disposed tensor", () => { var t = randn(3); t.Dispose(); _ = new PreferenceLogps(t, randn(3)); }, typeof(ObjectDisposedException), "chosen");
        // hyperparameters
        yield return new("beta = 0", () => _ = new DpoOptions { Beta = 0 }, AOOR, "Beta");
        yield return new("beta negative", () => _ = new IpoOptions { Beta = -1 }, AOOR, "Beta");
        yield return new("beta NaN", () => _ = new HingeOptions { Beta = double.NaN }, AOOR, "Beta");
        yield return new("beta infinite", () => _ = new RpoOptions { Beta = double.PositiveInfinity }, AOOR, "Beta");
        yield return new("cdpo eps = 0.5", () => _ = new ConservativeDpoOptions { LabelSmoothing = 0.5 }, AOOR, "LabelSmoothing");
        yield return new("robust eps = 0.5", () => _ = new RobustDpoOptions { LabelSmoothing = 0.5 }, AOOR, "LabelSmoothing");
        yield return new("robust eps negative", () => _ = new RobustDpoOptions { LabelSmoothing = -0.1 }, AOOR, "LabelSmoothing");
        yield return new("rpo temperature = 0", () => _ = new RpoOptions { Temperature = 0 }, AOOR, "Temperature");
        yield return new("rpo lambda > 1", () => _ = new RpoOptions { DiagonalWeight = 1.5 }, AOOR, "DiagonalWeight");
        yield return new("spo alpha = 0", () => _ = new SpoOptions { Alpha = 0 }, AOOR, "Alpha");
        yield return new("spo kl weight negative", () => _ = new SpoOptions { KlWeight = -1 }, AOOR, "KlWeight");
        yield return new("odpo alpha negative", () => _ = new OdpoOptions { Alpha = -1 }, AOOR, "Alpha");
        yield return new("odpo min gap zero", () => _ = new OdpoOptions { MinimumScoreGap = 0 }, AOOR, "MinimumScoreGap");
        yield return new("sppo beta = 0", () => _ = new SppoOptions { Beta = 0 }, AOOR, "Beta");
        yield return new("cosine weighting tau = 0", () => _ = new CosineSoftmaxWeighting(0), AOOR, "temperature");
        // the field's objectives, score maps, combinations, the TRL adapter
        yield return new("exo eps = 0", () => _ = new ExoPairOptions { LabelSmoothing = 0 }, AOOR, "LabelSmoothing");
        yield return new("exo eps = 1", () => _ = new ExoPairOptions { LabelSmoothing = 1 }, AOOR, "LabelSmoothing");
        yield return new("discopop tau = 0", () => _ = new DiscoPopOptions { Tau = 0 }, AOOR, "Tau");
        yield return new("aot eps above 1", () => _ = new AotOptions { LabelSmoothing = 1.5 }, AOOR, "LabelSmoothing");
        yield return new("apo anchor out of range", () => _ = new ApoOptions { Anchor = (ApoAnchor)5 }, AOOR, "Anchor");
        yield return new("alpha-divergence NaN", () => ScoreMap.AlphaDivergence(double.NaN), AOOR, "alpha");
        yield return new("score map null", () => _ = new DpoOptions { ScoreMap = null! }, typeof(ArgumentNullException), "ScoreMap");
        yield return new("sigmoid_norm without counts", () => SigmoidNormLoss.Compute(Ok(), Ok()), AE, "policy");
        yield return new("sft without counts", () => SftLoss.Compute(Ok()), AE, "policy");
        yield return new("aot with example weights", () => new AotLoss().Compute(new PreferenceBatch(Ok()) { ExampleWeights = F(1, 1, 1) }), AE, "batch.ExampleWeights");
        yield return new("example weights wrong length", () => new DpoLoss().Compute(new PreferenceBatch(Ok()) { ExampleWeights = F(1, 1) }), AE, "batch.ExampleWeights");
        yield return new("example weights negative", () => new NcaPairLoss().Compute(new PreferenceBatch(Ok()) { ExampleWeights = F(1, -1, 1) }), AE, "batch.ExampleWeights");
        yield return new("example weights NaN", () => new BcoPairLoss().Compute(new PreferenceBatch(Ok()) { ExampleWeights = F(1, float.NaN, 1) }), AE, "batch.ExampleWeights");
        yield return new("weighted loss negative weight", () => _ = new WeightedLoss((new DpoLoss(), -0.5)), AOOR, "parts[0].Weight");
        yield return new("trl unknown loss type", () => TrlLosses.Create("kto_pair"), AE, "loss_type");
        yield return new("trl exo without label smoothing", () => TrlLosses.Create("exo_pair"), AOOR, "label_smoothing");
        yield return new("trl robust label smoothing 0.5", () => TrlLosses.Create("robust", new TrlDpoConfig { LabelSmoothing = 0.5 }), AOOR, "label_smoothing");
        yield return new("trl beta negative", () => TrlLosses.Create("sigmoid", new TrlDpoConfig { Beta = -0.1 }), AOOR, "beta");
        // length-normalised losses
        yield return new("ipo per-token without counts", () => IpoLoss.Compute(Ok(), Ok(), new IpoOptions { LogRatio = IpoLogRatio.PerTokenMean }), AE, "policy");
        yield return new("dpo_nll without counts", () => DpoNllLoss.Compute(Ok(), Ok()), AE, "policy");
        yield return new("dpo_nll infinite token count", () => DpoNllLoss.Compute(Ok().WithTokenCounts(F(3, float.PositiveInfinity, 2), F(1, 1, 1)), null), AE, "policy");
        yield return new("rpo infinite caller weight", () => new RpoLoss().Compute(new PreferenceBatch(new PreferenceLogps(F(-1, -2, -3), F(-5, -6, -7))) { RpoWeights = full(3, 3, double.PositiveInfinity) }), AE, "batch.RpoWeights");
        yield return new("dpo_nll zero token count", () => DpoNllLoss.Compute(Ok().WithTokenCounts(F(3, 0, 2), F(1, 1, 1)), null), AE, "policy");
        // RPO
        yield return new("rpo zero-norm embedding row", () => RpoLoss.Compute(Ok(), null, F(1, 0, 0, 0, 0, 1).reshape(3, 2)), AE, "chosen embeddings");
        yield return new("rpo embedding rows != pairs", () => RpoLoss.Compute(Ok(), null, randn(4, 5)), AE, "promptEmbeddings");
        yield return new("rpo embeddings not 2-D", () => RpoLoss.Compute(Ok(), null, randn(3)), AE, "promptEmbeddings");
        yield return new("rpo embeddings integer", () => RpoLoss.Compute(Ok(), null, ones(3, 2, dtype: ScalarType.Int32)), AE, "promptEmbeddings");
        yield return new("rpo embeddings NaN", () => RpoLoss.Compute(Ok(), null, full(3, 2, double.NaN)), AE, "promptEmbeddings");
        yield return new("rpo embeddings on another device", () => RpoLoss.Compute(Ok(), null, empty(3, 2, device: META)), AE, "promptEmbeddings embeddings");
        yield return new("rpo unpaired D mismatch", () => PromptEmbeddings.Unpaired(randn(3, 4), randn(2, 5)), AE, "rejected");
        yield return new("rpo unpaired rows != rejected", () => RpoLoss.Compute(PreferenceLogps.Unpaired(randn(3), randn(2)), null, PromptEmbeddings.Unpaired(randn(3, 4), randn(5, 4))), AE, "promptEmbeddings.Rejected");
        yield return new("rpo unpaired with zero rejected", () => RpoLoss.Compute(PreferenceLogps.Unpaired(randn(3), zeros(0)), null), AE, "rejected");
        yield return new("rpo paired logps, unpaired embeddings", () => RpoLoss.Compute(Ok(), null, PromptEmbeddings.Unpaired(randn(3, 4), randn(3, 4))), AE, "batch.PromptEmbeddings");
        yield return new("rpo weights wrong shape", () => new RpoLoss().Compute(new PreferenceBatch(Ok()) { RpoWeights = ones(3, 2) }), AE, "batch.RpoWeights");
        yield return new("rpo negative weights", () => new RpoLoss().Compute(new PreferenceBatch(Ok()) { RpoWeights = -ones(3, 3) }), AE, "batch.RpoWeights");
        yield return new("rpo weights and embeddings", () => new RpoLoss().Compute(new PreferenceBatch(Ok()) { RpoWeights = ones(3, 3), PromptEmbeddings = PromptEmbeddings.Paired(randn(3, 2)) }), AE, "batch.RpoWeights");
        yield return new("rpo diagonal with one pair", () => RpoLoss.Compute(Ok(1), null, new RpoOptions { Variant = RpoVariant.Diagonal }), AE, "policy");
        // ODPO
        yield return new("odpo without scores", () => new OdpoLoss().Compute(new PreferenceBatch(Ok(), Ok())), AE, "batch.Scores");
        yield return new("odpo equal scores", () => OdpoLoss.Compute(Ok(), Ok(), new ResponseScores(F(1, 2, 3), F(0.5f, 2, 1))), AE, "scores");
        yield return new("odpo inverted scores", () => OdpoLoss.Compute(Ok(), Ok(), new ResponseScores(F(1, 2, 3), F(0.5f, 1, 4))), AE, "scores");
        yield return new("odpo ratio non-positive", () => OdpoLoss.Compute(Ok(), Ok(), new ResponseScores(F(1, 2, 3), F(0.5f, 0, 1)), new OdpoOptions { OffsetForm = OdpoOffsetForm.Ratio }), AE, "scores");
        yield return new("odpo NaN score", () => OdpoLoss.Compute(Ok(), Ok(), new ResponseScores(F(1, float.NaN, 3), F(0.5f, 1, 1))), AE, "scores.Chosen");
        yield return new("odpo score length", () => OdpoLoss.Compute(Ok(), Ok(), new ResponseScores(F(1, 2), F(0.5f, 1))), AE, "scores.Chosen");
        // SPPO
        yield return new("sppo without win-rates", () => SppoLoss.Compute(Ok(), Ok(), null), AE, "batch.WinRates");
        yield return new("sppo win-rate > 1", () => SppoLoss.Compute(Ok(), Ok(), SppoWinRates.Individual(F(0.5f, 1.2f, 0.3f), F(0.1f, 0.2f, 0.3f))), AE, "winRates.Chosen");
        yield return new("sppo win-rate < 0", () => SppoLoss.Compute(Ok(), Ok(), SppoWinRates.Individual(F(0.5f, 0.2f, 0.3f), F(0.1f, -0.2f, 0.3f))), AE, "winRates.Rejected");
        yield return new("sppo win-rate NaN", () => SppoLoss.Compute(Ok(), Ok(), SppoWinRates.Individual(F(0.5f, float.NaN, 0.3f), F(0.1f, 0.2f, 0.3f))), AE, "winRates.Chosen");
        yield return new("sppo_single with individual rates", () => SppoLoss.Compute(Ok(), Ok(), SppoWinRates.Individual(F(0.5f, 0.5f, 0.3f), F(0.1f, 0.2f, 0.3f)), new SppoOptions { Form = SppoForm.Single }), AE, "batch.WinRates");
        // SPO
        yield return new("spo negative weights", () => new SpoLoss(new() { KlWeight = 0 }).Compute(new PreferenceBatch(Ok()) { ExampleWeights = F(1, -1, 1) }), AE, "batch.ExampleWeights");
        yield return new("spo kl matrix", () => SpoLoss.Compute(Ok(), ones(2, 2)), AE, "batch.KlDivergence");
        yield return new("spo kl Inf", () => SpoLoss.Compute(Ok(), F(float.PositiveInfinity)), AE, "batch.KlDivergence");
        yield return new("token kl shape mismatch", () => TokenKl.Compute(randn(2, 3, 5), randn(2, 3, 4), ones(2, 3)), AE, "referenceLogits");
        yield return new("token kl mask shape", () => TokenKl.Compute(randn(2, 3, 5), randn(2, 3, 5), ones(3, 2)), AE, "mask");
        yield return new("token kl NaN logits", () => TokenKl.Compute(full(2, 3, 5, double.NaN), randn(2, 3, 5), ones(2, 3)), AE, "policyLogits");
        yield return new("listwise index out of range", () => SpoLoss.ListwisePreference(randn(2, 3), tensor(new long[] { 0, 3 })), AE, "bestIndex");
        // batch
        yield return new("null batch", () => ((IPreferenceLoss)new DpoLoss()).Compute(null!), typeof(ArgumentNullException), "batch");
    }

    public static IEnumerable<object[]> Cases =>
        LossCatalog.All.SelectMany(Generic).Concat(Specific()).Select(c => new object[] { c });

    [Theory, MemberData(nameof(Cases))]
    public void Invalid_input_raises_a_clear_error_naming_the_argument(Case c)
    {
        using var scope = NewDisposeScope();
        var e = Assert.ThrowsAny<Exception>(c.Act);
        Assert.True(c.Exception.IsInstanceOfType(e), $"{c.Name}: expected {c.Exception.Name}, got {e.GetType().Name}: {e.Message}");
        var names = c.Names.Split(' ');
        var param = (e as ArgumentException)?.ParamName ?? (e as ObjectDisposedException)?.ObjectName ?? "";
        Assert.True(names.Any(n => param == n || e.Message.Contains(n, StringComparison.Ordinal)),
            $"{c.Name}: the error should name one of [{c.Names}]; got ParamName '{param}', message: {e.Message}");
        Assert.True(e.Message.Length > 25, $"{c.Name}: message too terse: {e.Message}");
    }
}
