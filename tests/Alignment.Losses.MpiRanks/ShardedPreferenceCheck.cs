using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.MpiRanks;

/// <summary>
/// The batch-coupled sequence-pair losses split across the ranks of <paramref name="collectives"/>: each case builds one
/// global batch (float64, seeded, the same on every rank), computes it whole, then gives row i (chosen, rejected, KL
/// sample and mismatched pair alike) to rank i % world, cut into two micro-batches of unequal sizes, computes them through
/// <see cref="GlobalBatch.Compute(ICollectives, IPreferenceLoss, IReadOnlyList{PreferenceBatch}, bool)"/>, averages the
/// replicated inputs' gradients over the ranks and compares: the rank's summed loss, every micro-batch's metrics, the
/// per-example rows and the averaged gradients, with the whole batch to 1e-12. The interleaving means the global batch is a
/// permutation of the whole one, which every loss here is invariant to (RPO's contrast, AOT's sort, ORPO's token-weighted
/// NLL, KTO's reference point, BCO's baseline).
/// </summary>
public static class ShardedPreferenceCheck
{
    /// <summary>The rows a batch is built from: chosen and rejected indices, KL sample / mismatched indices, and the global rejected order.</summary>
    public sealed record Rows(Tensor Chosen, Tensor Rejected, Tensor Free, Tensor RejectedOrder);

    /// <summary>One case: its loss (a fresh one per call, for stateful losses), its sizes and its batch factory.</summary>
    public sealed record Case(string Name, Func<IPreferenceLoss> Loss, bool Paired, int Chosen, int Rejected, int Free,
        Func<Inputs, Rows, PreferenceBatch> Batch, bool PerExampleRows = true, Func<IPreferenceLoss, double>? State = null);

    /// <summary>The replicated "parameters" (policy log-probs and ORPO's prompt log-probs, with grad) and the fixed side inputs.</summary>
    public sealed class Inputs
    {
        public required Tensor PolicyChosen, PolicyRejected, PromptSum, RefChosen, RefRejected, ChosenEmbeddings, RejectedEmbeddings, Weights,
            ChosenCounts, RejectedCounts, PromptCounts, ScoresChosen, ScoresRejected, WinChosen, WinRejected, ExampleWeights, Kl, MisPolicy, MisReference;

        public IEnumerable<Tensor> Parameters => new[] { PolicyChosen, PolicyRejected, PromptSum };

        public static Inputs Make(int m, int n, int free, long seed)
        {
            var g = new Generator((ulong)seed);
            Tensor U(long len, double lo, double hi) => lo + (hi - lo) * rand(new[] { len }, generator: g, dtype: ScalarType.Float64);
            var countsC = randint(2, 9, new long[] { m }, generator: g).to_type(ScalarType.Float64);
            var countsR = randint(2, 9, new long[] { n }, generator: g).to_type(ScalarType.Float64);
            return new Inputs
            {
                PolicyChosen = (-countsC * U(m, 0.3, 1.2)).requires_grad_(true),
                PolicyRejected = (-countsR * U(n, 0.3, 1.2)).requires_grad_(true),
                PromptSum = (-U(m, 1, 6)).requires_grad_(true),
                RefChosen = -countsC * U(m, 0.3, 1.2),
                RefRejected = -countsR * U(n, 0.3, 1.2),
                ChosenEmbeddings = randn(new long[] { m, 5 }, generator: g, dtype: ScalarType.Float64),
                RejectedEmbeddings = randn(new long[] { n, 5 }, generator: g, dtype: ScalarType.Float64),
                Weights = rand(new long[] { m, n }, generator: g, dtype: ScalarType.Float64),
                ChosenCounts = countsC, RejectedCounts = countsR,
                PromptCounts = randint(3, 7, new long[] { m }, generator: g).to_type(ScalarType.Float64),
                ScoresChosen = U(m, 1.1, 2), ScoresRejected = U(m, -1, 1),
                WinChosen = U(m, 0.5, 0.9), WinRejected = U(m, 0.1, 0.5),
                ExampleWeights = U(m + n, 0.2, 1.5),
                Kl = U(free, 0, 0.3),
                MisPolicy = -U(free, 2, 9), MisReference = -U(free, 2, 9),
            };
        }
    }

    static Tensor Pick(Tensor t, Tensor rows) => t.index_select(0, rows);

    static PreferenceLogps Logps(bool paired, Tensor c, Tensor r, Tensor? cc = null, Tensor? rc = null) =>
        paired ? new PreferenceLogps(c, r, cc, rc) : PreferenceLogps.Unpaired(c, r, cc, rc);

    static PreferenceBatch Basic(Inputs x, Rows rows, bool paired = true, bool reference = true, bool counts = false) =>
        new(Logps(paired, Pick(x.PolicyChosen, rows.Chosen), Pick(x.PolicyRejected, rows.Rejected),
                counts ? Pick(x.ChosenCounts, rows.Chosen) : null, counts ? Pick(x.RejectedCounts, rows.Rejected) : null),
            reference ? Logps(paired, Pick(x.RefChosen, rows.Chosen), Pick(x.RefRejected, rows.Rejected)) : null);

    /// <summary>The cases: every batch-coupled preference loss, and DPO with WPO weights as the elementwise control.</summary>
    public static IReadOnlyList<Case> Cases { get; } = new Case[]
    {
        new("dpo+weights", () => new DpoLoss(), true, 10, 10, 0,
            (x, r) => Basic(x, r) with { ExampleWeights = Pick(x.ExampleWeights, r.Chosen) }),
        new("rpo paired", () => new RpoLoss(), true, 11, 11, 0,
            (x, r) => Basic(x, r) with { PromptEmbeddings = PromptEmbeddings.Paired(Pick(x.ChosenEmbeddings, r.Chosen)) }),
        new("rpo unpaired, weight outside", () => new RpoLoss(new RpoOptions { WeightPlacement = RpoWeightPlacement.OutsideSigmoid }), false, 9, 13, 0,
            (x, r) => Basic(x, r, paired: false) with
            {
                PromptEmbeddings = PromptEmbeddings.Unpaired(Pick(x.ChosenEmbeddings, r.Chosen), Pick(x.RejectedEmbeddings, r.Rejected)),
            }),
        new("rpo weight matrix", () => new RpoLoss(), true, 8, 8, 0,
            (x, r) => Basic(x, r) with { RpoWeights = Pick(x.Weights, r.Chosen).index_select(1, r.RejectedOrder) }),
        new("rpo_diagonal", () => new RpoLoss(new RpoOptions { Variant = RpoVariant.Diagonal }), true, 9, 9, 0, (x, r) => Basic(x, r)),
        new("aot", () => new AotLoss(), true, 10, 10, 0, (x, r) => Basic(x, r), PerExampleRows: false),
        new("aot_unpaired", () => new AotLoss(new AotOptions { Form = AotForm.Unpaired, LabelSmoothing = 0.1 }), true, 10, 10, 0,
            (x, r) => Basic(x, r), PerExampleRows: false),
        new("orpo (token-weighted NLL)", () => new OrpoLoss(), true, 9, 9, 0,
            (x, r) => Basic(x, r, reference: false, counts: true) with { Prompt = new PromptLogps(Pick(x.PromptSum, r.Chosen), Pick(x.PromptCounts, r.Chosen)) }),
        new("kto (mismatched pairs)", () => new KtoLoss(), false, 7, 12, 9,
            (x, r) => Basic(x, r, paired: false) with { Mismatched = new MismatchedLogps(Pick(x.MisPolicy, r.Free), Pick(x.MisReference, r.Free)) }),
        new("bco (running baseline)", () => new BcoLoss(new BcoRewardBaseline()), false, 12, 7, 0,
            (x, r) => Basic(x, r, paired: false) with
            {
                ExampleWeights = cat(new[] { Pick(x.ExampleWeights, r.Chosen), Pick(x.ExampleWeights.narrow(0, 12, 7), r.Rejected) }),
            }, State: l => ((BcoLoss)l).Baseline.Mean),
        new("sppo", () => new SppoLoss(), true, 10, 10, 0,
            (x, r) => Basic(x, r) with { WinRates = SppoWinRates.Individual(Pick(x.WinChosen, r.Chosen), Pick(x.WinRejected, r.Chosen)) }),
        new("spo (KL samples)", () => new SpoLoss(), true, 10, 10, 11,
            (x, r) => Basic(x, r, reference: false) with { KlDivergence = Pick(x.Kl, r.Free) }),
        new("odpo (scores)", () => new OdpoLoss(), true, 10, 10, 0,
            (x, r) => Basic(x, r) with { Scores = new ResponseScores(Pick(x.ScoresChosen, r.Chosen), Pick(x.ScoresRejected, r.Chosen)) }),
    };

    static Tensor Index(IEnumerable<int> rows) => tensor(rows.Select(i => (long)i).ToArray());

    /// <summary>Runs every case; one line per case, and whether all agree to 1e-12.</summary>
    public static (bool Ok, string Line) Run(ICollectives collectives)
    {
        var lines = new List<string>();
        bool ok = true;
        foreach (var c in Cases)
        {
            var (caseOk, line) = RunCase(collectives, c);
            ok &= caseOk;
            lines.Add(line);
        }
        return (ok, $"rank {collectives.Rank} of {collectives.WorldSize}: preference losses {(ok ? "PASS" : "FAIL")}\n  " + string.Join("\n  ", lines));
    }

    public static (bool Ok, string Line) RunCase(ICollectives collectives, Case c)
    {
        using var scope = NewDisposeScope();
        int rank = collectives.Rank, world = collectives.WorldSize;
        var x = Inputs.Make(c.Chosen, c.Rejected, c.Free, seed: 7 + c.Name.Length);

        // the whole batch, alone
        var wholeLoss = c.Loss();
        var all = new Rows(arange(c.Chosen), arange(c.Rejected), arange(c.Free), arange(c.Rejected));
        double whole;
        Tensor wholePerExample;
        IReadOnlyDictionary<string, double> wholeMetrics;
        using (var r = wholeLoss.Compute(c.Batch(x, all)))
        {
            r.Backward();
            whole = r.Loss.ToDouble();
            wholePerExample = r.PerExample.detach().clone();
            wholeMetrics = r.Metrics;
        }
        var wholeGrads = x.Parameters.Select(p => p.grad is { } g ? g.clone() : zeros_like(p)).ToArray();
        foreach (var p in x.Parameters) p.grad = null;

        // this rank's rows (i % world == rank on each side), in two micro-batches of unequal sizes
        int[] Mine(int count) => Enumerable.Range(0, count).Where(i => i % world == rank).ToArray();
        int[] Order(int count) => Enumerable.Range(0, world).SelectMany(r => Enumerable.Range(0, count).Where(i => i % world == r)).ToArray();
        var (chosen, rejected, free) = (Mine(c.Chosen), Mine(c.Rejected), Mine(c.Free));
        var rejectedOrder = Index(Order(c.Rejected));
        static (int, int)[] Cut(int n) => n == 0 ? new[] { (0, 0), (0, 0) } : new[] { (0, Math.Max(1, n / 3)), (Math.Max(1, n / 3), n - Math.Max(1, n / 3)) };
        var (cc, rc, fc) = (Cut(chosen.Length), Cut(rejected.Length), Cut(free.Length));
        var loss = c.Loss();
        var parts = Enumerable.Range(0, 2)
            .Select(k => new Rows(Index(chosen.Skip(cc[k].Item1).Take(cc[k].Item2)), Index((c.Paired ? chosen : rejected).Skip((c.Paired ? cc : rc)[k].Item1).Take((c.Paired ? cc : rc)[k].Item2)),
                Index(free.Skip(fc[k].Item1).Take(fc[k].Item2)), rejectedOrder))
            .Where(p => p.Chosen.shape[0] + p.Rejected.shape[0] > 0)
            .ToList();
        var results = GlobalBatch.Compute(collectives, loss, parts.Select(p => c.Batch(x, p)).ToList());
        double sum = 0, metricError = 0, rowError = 0;
        for (int k = 0; k < results.Length; k++)
        {
            using var r = results[k];
            r.Backward();
            sum += r.Loss.ToDouble();
            foreach (var (name, value) in wholeMetrics)
                metricError = Math.Max(metricError, Math.Abs(r.Metrics[name] - value) / Math.Max(1, Math.Abs(value)));
            if (c.PerExampleRows)
            {
                var expected = c.Paired || wholePerExample.shape[0] == c.Chosen
                    ? wholePerExample.index_select(0, parts[k].Chosen)
                    : cat(new[] { wholePerExample.index_select(0, parts[k].Chosen), wholePerExample.index_select(0, parts[k].Rejected + c.Chosen) });
                if (expected.numel() > 0) rowError = Math.Max(rowError, (r.PerExample - expected).abs().max().ToDouble());
            }
        }
        collectives.AverageGradients(x.Parameters);
        double gradError = x.Parameters.Zip(wholeGrads, (p, g) => ((p.grad ?? zeros_like(p)) - g).abs().max().ToDouble()).Max();
        double lossError = Math.Abs(sum - whole) / Math.Max(1, Math.Abs(whole));
        double stateError = c.State is { } state ? Math.Abs(state(loss) - state(wholeLoss)) : 0;
        double worst = new[] { lossError, metricError, rowError, gradError, stateError }.Max();
        bool ok = worst <= 1e-12 && double.IsFinite(worst);
        return (ok, $"{c.Name}: loss {whole:F6}, |loss| {lossError:E1}, metrics {metricError:E1}, rows {rowError:E1}, grad {gradError:E1}" +
                    (c.State is null ? "" : $", state {stateError:E1}") + (ok ? "" : "  <-- DIFFERS"));
    }
}
