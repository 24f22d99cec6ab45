using System.Globalization;
using Alignment.Losses;
using FsCheck;
using FsCheck.Fluent;

namespace Alignment.Losses.Tests;

/// <summary>One random preference batch, in doubles, with every side input any loss needs.</summary>
public sealed record Inputs(
    double[] Pc, double[] Pr, double[] Rc, double[] Rr,
    double[] Nw, double[] Nl, double[] Sw, double[] Sl, double[] Pw, double[] Pl, double[] Mu,
    double[][] Emb, double Beta, double Eps, double Tau, double Alpha, double Kl)
{
    public int B => Pc.Length;

    /// <summary>ORPO's prompt tokens, derived so that shrinking keeps them in step: 1 to 7 tokens per prompt.</summary>
    public double[] Np => Nl.Select(n => 1 + Math.Floor(n) % 7).ToArray();

    /// <summary>ORPO's summed prompt log-probs: -1.5 per prompt token (exact in every dtype, so rounding leaves them alone).</summary>
    public double[] Pp => Np.Select(m => -1.5 * m).ToArray();

    static string F(double[] xs) => "[" + string.Join(", ", xs.Select(x => x.ToString("G6", CultureInfo.InvariantCulture))) + "]";

    public override string ToString() =>
        $"B={B} beta={Beta:G4} eps={Eps:G4} tau={Tau:G4} alpha={Alpha:G4} kl={Kl:G4}\n  policy chosen={F(Pc)}\n  policy rejected={F(Pr)}\n  ref chosen={F(Rc)}\n  ref rejected={F(Rr)}\n" +
        $"  token counts w={F(Nw)} l={F(Nl)}\n" +
        $"  scores w={F(Sw)} l={F(Sl)}\n  winrates w={F(Pw)} l={F(Pl)}\n  emb dim={Emb[0].Length}";

    /// <summary>Values rounded the way a tensor of <paramref name="dtype"/> stores them (so the oracle sees what the library sees).</summary>
    public Inputs RoundedTo(ScalarType dtype)
    {
        double[] R(double[] x) => TensorUtil.Values(TensorUtil.Const(x, dtype));
        return this with
        {
            Pc = R(Pc), Pr = R(Pr), Rc = R(Rc), Rr = R(Rr), Sw = R(Sw), Sl = R(Sl), Pw = R(Pw), Pl = R(Pl), Mu = R(Mu),
            Nw = R(Nw), Nl = R(Nl), Kl = R(new[] { Kl })[0],
            Emb = Emb.Select(R).ToArray(),
        };
    }
}

public static class Generators
{
    static Gen<double> Uniform(double lo, double hi) => Gen.Choose(0, 1_000_000).Select(i => lo + (hi - lo) * i / 1_000_000.0);

    static Gen<double[]> Array(Gen<double> g, int n) => g.ArrayOf(n);

    public static Gen<Inputs> InputsGen(int minB = 1, int maxB = 24) =>
        from b in Gen.Choose(minB, maxB)
        from pc in Array(Uniform(-200, -1), b)
        from pr in Array(Uniform(-200, -1), b)
        from dc in Array(Uniform(-8, 8), b)
        from dr in Array(Uniform(-8, 8), b)
        from nw in Array(Gen.Choose(1, 300).Select(i => (double)i), b)
        from nl in Array(Gen.Choose(1, 300).Select(i => (double)i), b)
        from sl in Array(Uniform(0.05, 1.5), b)
        from gap in Array(Uniform(0.01, 2), b)
        from pw in Array(Uniform(0, 1), b)
        from pl in Array(Uniform(0, 1), b)
        from mu in Array(Uniform(0, 2), b)
        from d in Gen.Choose(2, 12)
        from emb in Array(Uniform(-1, 1), d).ArrayOf(b)
        from beta in Uniform(0.02, 1.5)
        from eps in Uniform(0.01, 0.45)
        from tau in Uniform(0.1, 2)
        from alpha in Uniform(0.2, 2)
        from kl in Uniform(0, 3)
        // reference log-probs near the policy's, and like every log-prob at most 0 (the losses refuse positive ones)
        select new Inputs(pc, pr, pc.Select((v, i) => Math.Min(v + dc[i], -0.25)).ToArray(), pr.Select((v, i) => Math.Min(v + dr[i], -0.25)).ToArray(),
            nw, nl, sl.Select((v, i) => v + gap[i]).ToArray(), sl, pw, pl, mu,
            emb.Select(e => e.All(v => v == 0) ? e.Select(_ => 1.0).ToArray() : e).ToArray(), beta, eps, tau, alpha, kl);

    /// <summary>Shrinks by dropping rows and rounding values, keeping every array in step.</summary>
    public static IEnumerable<Inputs> Shrink(Inputs x, int minB = 1)
    {
        if (x.B > minB)
        {
            for (int drop = x.B - 1; drop >= 0; drop--)
            {
                double[] D(double[] a) => a.Where((_, i) => i != drop).ToArray();
                yield return x with
                {
                    Pc = D(x.Pc), Pr = D(x.Pr), Rc = D(x.Rc), Rr = D(x.Rr), Nw = D(x.Nw), Nl = D(x.Nl), Sw = D(x.Sw), Sl = D(x.Sl),
                    Pw = D(x.Pw), Pl = D(x.Pl), Mu = D(x.Mu), Emb = x.Emb.Where((_, i) => i != drop).ToArray(),
                };
            }
        }
        double[] Round(double[] a) => a.Select(v => Math.Round(v, 1)).ToArray();
        var rounded = x with { Pc = Round(x.Pc), Pr = Round(x.Pr), Rc = Round(x.Rc), Rr = Round(x.Rr) };
        if (!rounded.Pc.SequenceEqual(x.Pc) || !rounded.Rc.SequenceEqual(x.Rc)) yield return rounded;
    }

    /// <summary>One deterministic sample (fixed seed), for tests that need a representative batch rather than a property.</summary>
    public static Inputs One(int minB, int maxB, ulong seed = 7) => InputsGen(minB, maxB).Sample(10, new Rnd(seed), 1).First();

    public static Arbitrary<Inputs> Arb(int minB = 1, int maxB = 24) => FsCheck.Fluent.Arb.From(InputsGen(minB, maxB), x => Shrink(x, minB));
}

/// <summary>Tensor helpers for tests.</summary>
public static class TensorUtil
{
    public static Tensor Const(double[] x, ScalarType dtype) => tensor(x, dtype: ScalarType.Float64).to_type(dtype);

    public static Tensor Leaf(double[] x, ScalarType dtype) => Const(x, dtype).detach().requires_grad_(true);

    public static double[] Values(Tensor t) => t.detach().to_type(ScalarType.Float64).cpu().data<double>().ToArray();

    /// <summary>Same shape and every element within <paramref name="tol"/> (absolute), with a message naming what differs.</summary>
    public static void AssertClose(Tensor expected, Tensor actual, double tol, string what)
    {
        Assert.Equal(expected.shape, actual.shape);
        double[] e = Values(expected), a = Values(actual);
        for (int i = 0; i < e.Length; i++)
            Assert.True(Math.Abs(e[i] - a[i]) <= tol, $"{what}[{i}]: {a[i]:R}, expected {e[i]:R}");
    }

    public static Tensor Matrix(double[][] rows, ScalarType dtype)
    {
        var flat = rows.SelectMany(r => r).ToArray();
        return Const(flat, dtype).reshape(rows.Length, rows[0].Length);
    }
}

/// <summary>The tensors of one batch: policy leaves (with grad) plus constants.</summary>
public sealed class BatchTensors
{
    public BatchTensors(Inputs x, ScalarType dtype, Device? device = null)
    {
        device ??= CPU;
        Tensor C(double[] v) => TensorUtil.Const(v, dtype).to(device);
        PolicyChosen = TensorUtil.Const(x.Pc, dtype).to(device).detach().requires_grad_(true);
        PolicyRejected = TensorUtil.Const(x.Pr, dtype).to(device).detach().requires_grad_(true);
        RefChosen = C(x.Rc); RefRejected = C(x.Rr);
        Nw = C(x.Nw); Nl = C(x.Nl); Sw = C(x.Sw); Sl = C(x.Sl); Pw = C(x.Pw); Pl = C(x.Pl); Mu = C(x.Mu);
        Kl = TensorUtil.Const(new[] { x.Kl }, dtype).to(device).squeeze();
        Emb = TensorUtil.Matrix(x.Emb, dtype).to(device);
        Prompt = new PromptLogps(C(x.Pp), C(x.Np));
    }

    public Tensor PolicyChosen, PolicyRejected, RefChosen, RefRejected, Nw, Nl, Sw, Sl, Pw, Pl, Mu, Kl, Emb;

    /// <summary>ORPO's prompt log-probs and token counts (constants).</summary>
    public PromptLogps Prompt;

    /// <summary>A batch with every side input set; each loss reads what it needs.</summary>
    public PreferenceBatch Full(bool withReference = true) =>
        new(new PreferenceLogps(PolicyChosen, PolicyRejected, Nw, Nl), withReference ? new PreferenceLogps(RefChosen, RefRejected) : null)
        {
            Scores = new ResponseScores(Sw, Sl),
            WinRates = SppoWinRates.Individual(Pw, Pl),
            KlDivergence = Kl,
        };

    /// <summary>The policy log-probs with token counts and no reference (reference-free losses, the reward model).</summary>
    public PreferenceBatch ReferenceFree() => new(new PreferenceLogps(PolicyChosen, PolicyRejected, Nw, Nl)) { Prompt = Prompt };

    /// <summary>
    /// Unpaired feedback: the chosen rows are the desirable examples, the first <paramref name="undesirable"/> rejected rows
    /// (all by default) the undesirable ones; KTO's reference point comes from <see cref="Kl"/>.
    /// </summary>
    public PreferenceBatch Unpaired(long? undesirable = null)
    {
        long u = undesirable ?? PolicyRejected.shape[0];
        return new(PreferenceLogps.Unpaired(PolicyChosen, PolicyRejected.narrow(0, 0, u)), PreferenceLogps.Unpaired(RefChosen, RefRejected.narrow(0, 0, u)))
        {
            KlDivergence = Kl,
        };
    }
}

/// <summary>A loss under test with its oracle.</summary>
public sealed record LossCase(
    string Name,
    Func<Inputs, IPreferenceLoss> Make,
    Func<BatchTensors, PreferenceBatch> Batch,
    Func<Inputs, Oracle.Result> Expected)
{
    /// <summary>
    /// The rewards the standard metrics should report, already scaled, where they are not beta times the log-ratios
    /// (e.g. beta times per-token means for SimPO and ORPO). Null: beta * (l_pol - l_ref).
    /// </summary>
    public Func<Inputs, (double[] Chosen, double[] Rejected)>? Rewards { get; init; }

    /// <summary>
    /// The log-probs logps/chosen and logps/rejected should report where they are not the summed log-probs (per-token means
    /// for the losses that average, as TRL logs them). Null: the summed log-probs.
    /// </summary>
    public Func<Inputs, (double[] Chosen, double[] Rejected)>? Logps { get; init; }

    /// <summary>False for a loss that reports its own metrics instead of the standard ones (the Bradley-Terry reward model).</summary>
    public bool StandardMetrics { get; init; } = true;

    public override string ToString() => Name;
}

public static class LossCatalog
{
    static PreferenceBatch Full(BatchTensors t) => t.Full();

    public static readonly LossCase[] All =
    {
        new("dpo", x => new DpoLoss(new() { Beta = x.Beta }), Full, x => Oracle.Dpo(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta)),
        new("dpo_reference_free", x => new DpoLoss(new() { Beta = x.Beta }), t => t.Full(withReference: false), x => Oracle.Dpo(x.Pc, x.Pr, null, null, x.Beta)),
        new("cdpo", x => new ConservativeDpoLoss(new() { Beta = x.Beta, LabelSmoothing = x.Eps }), Full, x => Oracle.Cdpo(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, x.Eps)),
        new("robust_dpo", x => new RobustDpoLoss(new() { Beta = x.Beta, LabelSmoothing = x.Eps }), Full, x => Oracle.Robust(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, x.Eps)),
        new("hinge", x => new HingeLoss(new() { Beta = x.Beta }), Full, x => Oracle.Hinge(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta)),
        new("ipo", x => new IpoLoss(new() { Beta = x.Beta }), Full, x => Oracle.Ipo(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta)),
        new("ipo_per_token", x => new IpoLoss(new() { Beta = x.Beta, LogRatio = IpoLogRatio.PerTokenMean }), Full, x => Oracle.IpoPerToken(x.Pc, x.Pr, x.Rc, x.Rr, x.Nw, x.Nl, x.Beta)),
        new("dpo_nll", x => new DpoNllLoss(new() { Beta = x.Beta, NllWeight = x.Alpha }), Full, x => Oracle.DpoNll(x.Pc, x.Pr, x.Rc, x.Rr, x.Nw, x.Beta, x.Alpha)),
        new("odpo", x => new OdpoLoss(new() { Beta = x.Beta, Alpha = x.Alpha }), Full, x => Oracle.Odpo(x.Pc, x.Pr, x.Rc, x.Rr, x.Sw, x.Sl, x.Beta, x.Alpha, ratio: false)),
        new("odpo_ratio", x => new OdpoLoss(new() { Beta = x.Beta, Alpha = x.Alpha, OffsetForm = OdpoOffsetForm.Ratio }), Full, x => Oracle.Odpo(x.Pc, x.Pr, x.Rc, x.Rr, x.Sw, x.Sl, x.Beta, x.Alpha, ratio: true)),
        new("spo", x => new SpoLoss(new() { Alpha = x.Alpha, KlWeight = x.Beta }), t => t.Full() with { ExampleWeights = t.Mu }, x => Oracle.Spo(x.Pc, x.Pr, x.Mu, x.Alpha, x.Beta, x.Kl)),
        new("sppo", x => new SppoLoss(new() { Beta = x.Beta }), Full, x => Oracle.Sppo(x.Pc, x.Pr, x.Rc, x.Rr, x.Pw, x.Pl, x.Beta)),
        new("sppo_single", x => new SppoLoss(new() { Beta = x.Beta, Form = SppoForm.Single }),
            t => t.Full() with { WinRates = SppoWinRates.FromPairwise(t.Pw) },
            x => Oracle.SppoTargets(x.Pc, x.Pr, x.Rc, x.Rr, x.Pw.Select(p => (p - 0.5) / x.Beta).ToArray(), x.Pw.Select(p => -(p - 0.5) / x.Beta).ToArray(), 0.5)),
        new("sppo_hard", x => new SppoLoss(new() { Beta = x.Beta, Form = SppoForm.Hard }), Full,
            x => Oracle.SppoTargets(x.Pc, x.Pr, x.Rc, x.Rr, x.Pc.Select(_ => 1 / (2 * x.Beta)).ToArray(), x.Pc.Select(_ => -1 / (2 * x.Beta)).ToArray(), 1.0)),
        new("rpo", x => new RpoLoss(new() { Beta = x.Beta, Temperature = x.Tau }),
            t => t.Full() with { PromptEmbeddings = PromptEmbeddings.Paired(t.Emb) },
            x => Oracle.Rpo(x.Pc, x.Pr, x.Rc, x.Rr, Oracle.RpoWeights(x.Emb, x.Emb, x.Tau), x.Beta, inside: true)),
        new("rpo_weight_outside", x => new RpoLoss(new() { Beta = x.Beta, Temperature = x.Tau, WeightPlacement = RpoWeightPlacement.OutsideSigmoid }),
            t => t.Full() with { PromptEmbeddings = PromptEmbeddings.Paired(t.Emb) },
            x => Oracle.Rpo(x.Pc, x.Pr, x.Rc, x.Rr, Oracle.RpoWeights(x.Emb, x.Emb, x.Tau), x.Beta, inside: false)),
        new("rpo_all_pairs", x => new RpoLoss(new() { Beta = x.Beta, Variant = RpoVariant.AllPairs }), Full,
            x => Oracle.Rpo(x.Pc, x.Pr, x.Rc, x.Rr, Oracle.Ones(x.B, x.B), x.Beta, inside: true)),
        new("rpo_diagonal", x => new RpoLoss(new() { Beta = x.Beta, Variant = RpoVariant.Diagonal, DiagonalWeight = 1 - x.Eps }), Full,
            x => Oracle.Rpo(x.Pc, x.Pr, x.Rc, x.Rr, Oracle.Diagonal(x.B, 1 - x.Eps), x.Beta, inside: false)),
        new("rpo_unpaired", x => new RpoLoss(new() { Beta = x.Beta, Temperature = x.Tau }),
            // chosen: all B rows; rejected: the first ceil(B/2) rows, with their own prompts (rows reversed)
            t =>
            {
                long n = (t.PolicyRejected.shape[0] + 1) / 2;
                var rejEmb = t.Emb.flip(0).narrow(0, 0, n);
                return new PreferenceBatch(PreferenceLogps.Unpaired(t.PolicyChosen, t.PolicyRejected.narrow(0, 0, n)),
                    PreferenceLogps.Unpaired(t.RefChosen, t.RefRejected.narrow(0, 0, n)))
                { PromptEmbeddings = PromptEmbeddings.Unpaired(t.Emb, rejEmb) };
            },
            x =>
            {
                int n = (x.B + 1) / 2;
                var rejEmb = x.Emb.Reverse().Take(n).ToArray();
                return Oracle.Rpo(x.Pc, x.Pr.Take(n).ToArray(), x.Rc, x.Rr.Take(n).ToArray(), Oracle.RpoWeights(x.Emb, rejEmb, x.Tau), x.Beta, inside: true);
            }),
        // the field's pairwise objectives (TRL loss types) and the f-divergence score maps
        new("dpo_forward_kl", x => new DpoLoss(new() { Beta = x.Beta, ScoreMap = ScoreMap.ForwardKl }), Full, x => Oracle.DpoMapped(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, Oracle.ForwardKl)),
        new("dpo_js", x => new DpoLoss(new() { Beta = x.Beta, ScoreMap = ScoreMap.JensenShannon }), Full, x => Oracle.DpoMapped(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, Oracle.JensenShannon)),
        new("dpo_alpha", x => new DpoLoss(new() { Beta = x.Beta, ScoreMap = ScoreMap.AlphaDivergence(x.Alpha - 0.7) }), Full,
            x => Oracle.DpoMapped(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, Oracle.AlphaDivergence(x.Alpha - 0.7))),
        new("robust_dpo_js", x => new RobustDpoLoss(new() { Beta = x.Beta, LabelSmoothing = x.Eps, ScoreMap = ScoreMap.JensenShannon }), Full,
            x => Oracle.RobustMapped(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, x.Eps, Oracle.JensenShannon)),
        new("exo_pair", x => new ExoPairLoss(new() { Beta = x.Beta, LabelSmoothing = x.Eps }), Full, x => Oracle.ExoPair(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, x.Eps, Oracle.ReverseKl)),
        new("exo_pair_alpha", x => new ExoPairLoss(new() { Beta = x.Beta, LabelSmoothing = x.Eps, ScoreMap = ScoreMap.AlphaDivergence(0.5) }), Full,
            x => Oracle.ExoPair(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, x.Eps, Oracle.AlphaDivergence(0.5))),
        new("discopop", x => new DiscoPopLoss(new() { Beta = x.Beta, Tau = x.Tau }), Full, x => Oracle.DiscoPop(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, x.Tau, Oracle.ReverseKl)),
        new("sigmoid_norm", x => new SigmoidNormLoss(new() { Beta = x.Beta }), Full, x => Oracle.SigmoidNorm(x.Pc, x.Pr, x.Rc, x.Rr, x.Nw, x.Nl, x.Beta, Oracle.ReverseKl)),
        new("sigmoid_norm_forward_kl", x => new SigmoidNormLoss(new() { Beta = x.Beta, ScoreMap = ScoreMap.ForwardKl }), Full,
            x => Oracle.SigmoidNorm(x.Pc, x.Pr, x.Rc, x.Rr, x.Nw, x.Nl, x.Beta, Oracle.ForwardKl)),
        new("nca_pair", x => new NcaPairLoss(new() { Beta = x.Beta }), Full, x => Oracle.NcaPair(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, Oracle.ReverseKl)),
        new("nca_pair_js", x => new NcaPairLoss(new() { Beta = x.Beta, ScoreMap = ScoreMap.JensenShannon }), Full, x => Oracle.NcaPair(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, Oracle.JensenShannon)),
        new("bco_pair", x => new BcoPairLoss(new() { Beta = x.Beta }), Full, x => Oracle.BcoPair(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, Oracle.ReverseKl)),
        new("apo_zero", x => new ApoLoss(new() { Beta = x.Beta }), Full, x => Oracle.ApoZero(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta)),
        new("apo_down", x => new ApoLoss(new() { Beta = x.Beta, Anchor = ApoAnchor.Down }), Full, x => Oracle.ApoDown(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, Oracle.ReverseKl)),
        new("apo_down_forward_kl", x => new ApoLoss(new() { Beta = x.Beta, Anchor = ApoAnchor.Down, ScoreMap = ScoreMap.ForwardKl }), Full,
            x => Oracle.ApoDown(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, Oracle.ForwardKl)),
        new("aot", x => new AotLoss(new() { Beta = x.Beta, LabelSmoothing = x.Eps }), Full,
            x => Oracle.Aot(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, x.Eps, unpaired: false)),
        new("aot_unpaired", x => new AotLoss(new() { Beta = x.Beta, Form = AotForm.Unpaired }), Full,
            x => Oracle.Aot(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, 0, unpaired: true)),
        new("sft", x => new SftLoss(new() { Beta = x.Beta }), Full, x => Oracle.Sft(x.Pc, x.Pr, x.Nw)),
        new("mpo", x => new WeightedLoss((new DpoLoss(new() { Beta = x.Beta }), 0.8), (new BcoPairLoss(new() { Beta = x.Beta }), 0.2), (new SftLoss(), 1.0)), Full,
            x => Oracle.Weighted((Oracle.Dpo(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta), 0.8), (Oracle.BcoPair(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta, Oracle.ReverseKl), 0.2), (Oracle.Sft(x.Pc, x.Pr, x.Nw), 1.0))),
        new("dpo_weighted", x => new DpoLoss(new() { Beta = x.Beta, ScoreMap = ScoreMap.AlphaDivergence(x.Alpha) }), t => t.Full() with { ExampleWeights = t.Mu },
            x => Oracle.PerPairWeighted(x.Pc, x.Pr, x.Rc, x.Rr, x.Mu, (a, b, c, d) => Oracle.DpoMapped(a, b, c, d, x.Beta, Oracle.AlphaDivergence(x.Alpha)))),
        // reference-free objectives (spec §9): no reference, per-token means from the token counts
        new("cpo", x => new CpoLoss(new() { Beta = x.Beta, CpoAlpha = x.Alpha }), t => t.ReferenceFree(),
            x => Oracle.Cpo(x.Pc, x.Pr, x.Nw, x.Nl, "sigmoid", x.Beta, 0, x.Alpha)),
        new("cpo_smoothed", x => new CpoLoss(new() { Beta = x.Beta, LabelSmoothing = x.Eps, CpoAlpha = x.Tau }), t => t.ReferenceFree(),
            x => Oracle.Cpo(x.Pc, x.Pr, x.Nw, x.Nl, "sigmoid", x.Beta, x.Eps, x.Tau)),
        // summed log-probs reach -200, so the AlphaPO shape on them stays small for e^(-alpha l) to fit float16
        new("cpo_alpha_shape", x => new CpoLoss(new() { Beta = x.Beta, CpoAlpha = x.Tau, Alpha = 0.01 * x.Alpha }), t => t.ReferenceFree(),
            x => Oracle.Cpo(x.Pc, x.Pr, x.Nw, x.Nl, "sigmoid", x.Beta, 0, x.Tau, shape: 0.01 * x.Alpha))
            { Rewards = x => (x.Pc.Select(l => x.Beta * -Oracle.Expm1(-0.01 * x.Alpha * l) / (0.01 * x.Alpha)).ToArray(), x.Pr.Select(l => x.Beta * -Oracle.Expm1(-0.01 * x.Alpha * l) / (0.01 * x.Alpha)).ToArray()) },
        new("cpo_hinge", x => new CpoLoss(new() { Beta = x.Beta / 50, LossType = CpoLossType.Hinge, CpoAlpha = x.Alpha }), t => t.ReferenceFree(),
            x => Oracle.Cpo(x.Pc, x.Pr, x.Nw, x.Nl, "hinge", x.Beta / 50, 0, x.Alpha)) { Rewards = x => (x.Pc.Select(l => x.Beta / 50 * l).ToArray(), x.Pr.Select(l => x.Beta / 50 * l).ToArray()) },
        new("cpo_ipo", x => new CpoLoss(new() { Beta = x.Beta, LossType = CpoLossType.Ipo, CpoAlpha = x.Alpha }), t => t.ReferenceFree(),
            x => Oracle.Cpo(x.Pc, x.Pr, x.Nw, x.Nl, "ipo", x.Beta, 0, x.Alpha)) { Rewards = x => PerTokenRewards(x, a => a), Logps = PerTokenLogps },
        new("cpo_simpo", x => new CpoLoss(new() { Beta = x.Beta, LossType = CpoLossType.Simpo, LabelSmoothing = x.Eps, SimpoGamma = x.Tau, CpoAlpha = x.Alpha }), t => t.ReferenceFree(),
            x => Oracle.Cpo(x.Pc, x.Pr, x.Nw, x.Nl, "simpo", x.Beta, x.Eps, x.Alpha, gamma: x.Tau)) { Rewards = x => PerTokenRewards(x, a => a), Logps = PerTokenLogps },
        new("cpo_simpo_alpha_shape", x => new CpoLoss(new() { Beta = x.Beta, LossType = CpoLossType.Simpo, SimpoGamma = x.Tau, CpoAlpha = 0, Alpha = -x.Alpha }), t => t.ReferenceFree(),
            x => Oracle.Cpo(x.Pc, x.Pr, x.Nw, x.Nl, "simpo", x.Beta, 0, 0, shape: -x.Alpha, gamma: x.Tau))
            { Rewards = x => PerTokenRewards(x, a => -Oracle.Expm1(x.Alpha * a) / -x.Alpha), Logps = PerTokenLogps },
        new("simpo", x => new SimPoLoss(new() { Beta = x.Beta, Gamma = x.Tau }), t => t.ReferenceFree(),
            x => Oracle.SimPo(x.Pc, x.Pr, x.Nw, x.Nl, x.Beta, x.Tau, 0, 0)) { Rewards = x => PerTokenRewards(x, a => a), Logps = PerTokenLogps },
        new("simpo_smoothed", x => new SimPoLoss(new() { Beta = x.Beta, Gamma = x.Tau, LabelSmoothing = x.Eps }), t => t.ReferenceFree(),
            x => Oracle.SimPo(x.Pc, x.Pr, x.Nw, x.Nl, x.Beta, x.Tau, x.Eps, 0)) { Rewards = x => PerTokenRewards(x, a => a), Logps = PerTokenLogps },
        // per-token means reach -200 here, so alpha stays small enough for e^(-alpha a) and the gradient to fit float16
        new("alphapo", x => new AlphaPoLoss(new() { Beta = x.Beta, Gamma = x.Tau, Alpha = 0.02 * x.Alpha }), t => t.ReferenceFree(),
            x => Oracle.SimPo(x.Pc, x.Pr, x.Nw, x.Nl, x.Beta, x.Tau, 0, 0.02 * x.Alpha))
            { Rewards = x => PerTokenRewards(x, a => -Oracle.Expm1(-0.02 * x.Alpha * a) / (0.02 * x.Alpha)), Logps = PerTokenLogps },
        new("alphapo_negative", x => new AlphaPoLoss(new() { Beta = x.Beta, Gamma = x.Tau, Alpha = -x.Alpha }), t => t.ReferenceFree(),
            x => Oracle.SimPo(x.Pc, x.Pr, x.Nw, x.Nl, x.Beta, x.Tau, 0, -x.Alpha)) { Rewards = x => PerTokenRewards(x, a => -Oracle.Expm1(x.Alpha * a) / -x.Alpha), Logps = PerTokenLogps },
        new("orpo", x => new OrpoLoss(new() { Beta = x.Beta }), t => t.ReferenceFree(),
            x => Oracle.Orpo(x.Pc, x.Pr, x.Nw, x.Nl, x.Beta, x.Pp, x.Np)) { Rewards = x => PerTokenRewards(x, a => a), Logps = PerTokenLogps },
        new("orpo_completion_nll", x => new OrpoLoss(new() { Beta = x.Beta, NllTokens = OrpoNllTokens.Completion }), t => t.ReferenceFree() with { Prompt = null },
            x => Oracle.Orpo(x.Pc, x.Pr, x.Nw, x.Nl, x.Beta)) { Rewards = x => PerTokenRewards(x, a => a), Logps = PerTokenLogps },
        // unpaired feedback (spec §10): chosen rows desirable, rejected rows undesirable
        new("kto", x => new KtoLoss(new() { Beta = x.Beta, UndesirableWeight = x.Alpha }), t => t.Unpaired(),
            x => Oracle.Kto(x.Pc, x.Pr, x.Rc, x.Rr, x.Kl, x.Beta, 1, x.Alpha, apo: false)),
        new("kto_unbalanced", x => new KtoLoss(new() { Beta = x.Beta, DesirableWeight = x.Tau }), t => t.Unpaired((t.PolicyRejected.shape[0] + 1) / 2),
            x => Oracle.Kto(x.Pc, x.Pr.Take((x.B + 1) / 2).ToArray(), x.Rc, x.Rr.Take((x.B + 1) / 2).ToArray(), x.Kl, x.Beta, x.Tau, 1, apo: false)),
        new("apo_zero_unpaired", x => new ApoZeroUnpairedLoss(new() { Beta = x.Beta, DesirableWeight = x.Alpha }), t => t.Unpaired(),
            x => Oracle.Kto(x.Pc, x.Pr, x.Rc, x.Rr, 0, x.Beta, x.Alpha, 1, apo: true)),
        new("bco", x => new BcoLoss(new BcoRewardBaseline(), new() { Beta = x.Beta }), t => t.Unpaired(),
            x => Oracle.BcoFresh(x.Pc, x.Pr, x.Rc, x.Rr, x.Beta)),
        // reward model (spec §11): the log-prob slots hold the rewards
        new("bradley_terry", x => new BradleyTerryLoss(new() { CenteringCoefficient = 0.01 * x.Eps }), t => t.ReferenceFree(),
            x => Oracle.BradleyTerry(x.Pc, x.Pr, 0.01 * x.Eps)) { StandardMetrics = false },
    };

    /// <summary>beta * R(l / n) for each side: the rewards the per-token reference-free losses report.</summary>
    static (double[] Chosen, double[] Rejected) PerTokenRewards(Inputs x, Func<double, double> r) =>
        (x.Pc.Select((l, i) => x.Beta * r(l / x.Nw[i])).ToArray(), x.Pr.Select((l, i) => x.Beta * r(l / x.Nl[i])).ToArray());

    /// <summary>The per-token mean log-probs (l_w / n_w, l_l / n_l).</summary>
    static (double[] Chosen, double[] Rejected) PerTokenLogps(Inputs x) =>
        (x.Pc.Select((l, i) => l / x.Nw[i]).ToArray(), x.Pr.Select((l, i) => l / x.Nl[i]).ToArray());

    public static IEnumerable<object[]> Names => All.Select(c => new object[] { c.Name });

    public static LossCase Get(string name) => All.Single(c => c.Name == name);
}
