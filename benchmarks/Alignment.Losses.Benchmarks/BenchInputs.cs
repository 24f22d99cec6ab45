using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Benchmarks;

/// <summary>Random batches with every side input, on a device and in a dtype; the same recipe as benchmarks/pytorch/reference_losses.py.</summary>
internal sealed class BenchInputs : IDisposable
{
    private readonly DisposeScope _scope;

    public BenchInputs(int b, ScalarType dtype, Device device, int embeddingDim = 768)
    {
        _scope = NewDisposeScope();
        manual_seed(0);
        Tensor Logps() => (rand(b) * -200 - 1).to(dtype).to(device);
        var (pc, pr, rc, rr) = (Logps(), Logps(), Logps(), Logps());
        var counts = randint(1, 300, new long[] { b }).to(ScalarType.Float32).to(device);
        var embeddings = randn(b, embeddingDim).to(dtype).to(device);
        var scoreRejected = (rand(b) + 0.05).to(device);
        var scoreChosen = (scoreRejected + rand(b) + 0.01).to(device);
        var (winChosen, winRejected) = (rand(b).to(device), rand(b).to(device));
        var promptLogps = (rand(b) * -50 - 1).to(dtype).to(device);
        var promptCounts = randint(1, 100, new long[] { b }).to(ScalarType.Float32).to(device);
        (Batch, ReferenceFreeBatch, UnpairedBatch) = Build(pc, pr, rc, rr, counts, embeddings, scoreChosen, scoreRejected, winChosen, winRejected, promptLogps, promptCounts);
    }

    /// <summary>Given inputs (float64, CPU), e.g. the peer's from <c>reference_losses.py --dump</c>.</summary>
    public BenchInputs(IReadOnlyDictionary<string, double[]> v, int embeddingDim)
    {
        _scope = NewDisposeScope();
        Tensor T(string key) => tensor(v[key], dtype: ScalarType.Float64);
        (Batch, ReferenceFreeBatch, UnpairedBatch) = Build(T("pc"), T("pr"), T("rc"), T("rr"), T("counts"), T("emb").reshape(-1, embeddingDim), T("sw"), T("sl"), T("pw"), T("pl"),
            T("pp"), T("pn"));
    }

    private (PreferenceBatch Paired, PreferenceBatch ReferenceFree, PreferenceBatch Unpaired) Build(
        Tensor pc, Tensor pr, Tensor rc, Tensor rr, Tensor counts, Tensor embeddings, Tensor scoreChosen, Tensor scoreRejected, Tensor winChosen, Tensor winRejected,
        Tensor promptLogps, Tensor promptCounts)
    {
        (PolicyChosen, PolicyRejected, RefChosen, RefRejected) = (pc.requires_grad_(true), pr.requires_grad_(true), rc, rr);
        (Counts, Embeddings, ScoreChosen, ScoreRejected, WinChosen, WinRejected) = (counts, embeddings, scoreChosen, scoreRejected, winChosen, winRejected);
        (PromptLogps, PromptCounts) = (promptLogps, promptCounts);
        // KTO's mismatched pairs: each prompt with the previous example's chosen response (roll by one, as TRL's KL completions)
        (MismatchedPolicy, MismatchedReference) = (pc.detach().roll(1), rc.roll(1));
        _scope.Detach(Owned);
        return (
            new PreferenceBatch(new PreferenceLogps(pc, pr, counts, counts), new PreferenceLogps(rc, rr))
            {
                PromptEmbeddings = PromptEmbeddings.Paired(embeddings),
                Scores = new ResponseScores(scoreChosen, scoreRejected),
                WinRates = SppoWinRates.Individual(winChosen, winRejected),
            },
            // reference-free losses (CPO, SimPO, AlphaPO, ORPO, with ORPO's prompt tokens) and the reward model (the log-prob slots read as rewards)
            new PreferenceBatch(new PreferenceLogps(pc, pr, counts, counts)) { Prompt = new PromptLogps(promptLogps, promptCounts) },
            // unpaired losses: the B chosen responses are the desirable examples, the B rejected ones the undesirable
            new PreferenceBatch(PreferenceLogps.Unpaired(pc, pr, counts, counts), PreferenceLogps.Unpaired(rc, rr))
            {
                Mismatched = new MismatchedLogps(MismatchedPolicy, MismatchedReference),
            });
    }

    public Tensor PolicyChosen = null!, PolicyRejected = null!, RefChosen = null!, RefRejected = null!, Counts = null!, Embeddings = null!,
        ScoreChosen = null!, ScoreRejected = null!, WinChosen = null!, WinRejected = null!, MismatchedPolicy = null!, MismatchedReference = null!,
        PromptLogps = null!, PromptCounts = null!;

    private Tensor[] Owned => new[] { PolicyChosen, PolicyRejected, RefChosen, RefRejected, Counts, Embeddings, ScoreChosen, ScoreRejected, WinChosen, WinRejected,
        MismatchedPolicy, MismatchedReference, PromptLogps, PromptCounts };

    /// <summary>Paired policy and reference log-probs with every pairwise side input (embeddings, scores, win-rates).</summary>
    public PreferenceBatch Batch { get; }

    /// <summary>The policy log-probs with token counts and no reference.</summary>
    public PreferenceBatch ReferenceFreeBatch { get; }

    /// <summary>The same log-probs as B desirable and B undesirable examples, with KTO's mismatched pairs.</summary>
    public PreferenceBatch UnpairedBatch { get; }

    /// <summary>Every loss of the suites, by name (the peer, benchmarks/pytorch/reference_losses.py, has the same names).</summary>
    public static readonly string[] LossNames =
    {
        "dpo", "cdpo", "robust_dpo", "ipo", "hinge", "dpo_nll", "rpo", "spo", "odpo", "sppo",
        "exo_pair", "nca_pair", "bco_pair", "apo_zero", "apo_down", "aot", "discopop", "sigmoid_norm", "sft", "mpo", "dpo_js",
        "cpo", "simpo", "alphapo", "orpo", "kto", "apo_zero_unpaired", "bco", "bradley_terry",
    };

    /// <summary>The batch that the named loss takes: paired with a reference, reference-free, or unpaired.</summary>
    public PreferenceBatch BatchFor(string name) => name switch
    {
        "cpo" or "simpo" or "alphapo" or "orpo" or "bradley_terry" => ReferenceFreeBatch,
        "kto" or "apo_zero_unpaired" or "bco" => UnpairedBatch,
        _ => Batch,
    };

    /// <summary>
    /// One forward + backward pass, synchronised by reading a gradient element. The gradients are then dropped
    /// (<c>grad = null</c>, as the PyTorch peer does with <c>x.grad = None</c>), so every call allocates fresh ones.
    /// </summary>
    public double ForwardBackward(IPreferenceLoss loss) => ForwardBackward(loss, Batch);

    /// <inheritdoc cref="ForwardBackward(IPreferenceLoss)"/>
    public double ForwardBackward(IPreferenceLoss loss, PreferenceBatch batch)
    {
        using var scope = NewDisposeScope();
        using var r = loss.Compute(batch);
        r.Loss.backward();
        double v = PolicyChosen.grad![0].ToDouble();
        PolicyChosen.grad = null;
        PolicyRejected.grad = null;
        return v;
    }

    public static IPreferenceLoss Create(string name, bool fusedCpu = true) => name switch
    {
        // the pair-link losses take the fused CPU pass unless fusedCpu is false (--op-by-op); the others ignore the flag
        "dpo" => new DpoLoss(new DpoOptions { FusedCpu = fusedCpu }),
        "cdpo" => new ConservativeDpoLoss(new ConservativeDpoOptions { FusedCpu = fusedCpu }),
        "robust_dpo" => new RobustDpoLoss(new RobustDpoOptions { FusedCpu = fusedCpu }),
        "ipo" => new IpoLoss(new IpoOptions { FusedCpu = fusedCpu }),
        "hinge" => new HingeLoss(new HingeOptions { FusedCpu = fusedCpu }),
        "dpo_nll" => new DpoNllLoss(new DpoNllOptions { FusedCpu = fusedCpu }),
        "rpo" => new RpoLoss(new RpoOptions { FusedCpu = fusedCpu }),
        "spo" => new SpoLoss(new SpoOptions { KlWeight = 0, FusedCpu = fusedCpu }),   // the peer times the preference term (no KL estimate in the batch)
        "odpo" => new OdpoLoss(new OdpoOptions { FusedCpu = fusedCpu }),
        "sppo" => new SppoLoss(new SppoOptions { FusedCpu = fusedCpu }),
        // the field's objectives, with the peer's settings (TRL's formulas, reverse KL unless named)
        "exo_pair" => new ExoPairLoss(new ExoPairOptions { FusedCpu = fusedCpu }),
        "nca_pair" => new NcaPairLoss(new NcaPairOptions { FusedCpu = fusedCpu }),
        "bco_pair" => new BcoPairLoss(new BcoPairOptions { FusedCpu = fusedCpu }),
        "apo_zero" => new ApoLoss(new ApoOptions { FusedCpu = fusedCpu }),
        "apo_down" => new ApoLoss(new ApoOptions { Anchor = ApoAnchor.Down, FusedCpu = fusedCpu }),
        "aot" => new AotLoss(new AotOptions { FusedCpu = fusedCpu }),
        "discopop" => new DiscoPopLoss(new DiscoPopOptions { FusedCpu = fusedCpu }),
        "sigmoid_norm" => new SigmoidNormLoss(new SigmoidNormOptions { FusedCpu = fusedCpu }),
        "sft" => new SftLoss(new SftOptions { FusedCpu = fusedCpu }),
        "mpo" => new WeightedLoss((new DpoLoss(new DpoOptions { FusedCpu = fusedCpu }), 0.8), (new BcoPairLoss(new BcoPairOptions { FusedCpu = fusedCpu }), 0.2), (new SftLoss(new SftOptions { FusedCpu = fusedCpu }), 1.0)),
        "dpo_js" => new DpoLoss(new DpoOptions { ScoreMap = ScoreMap.JensenShannon, FusedCpu = fusedCpu }),
        // reference-free, unpaired and reward-model objectives, with TRL's defaults (CPOConfig, KTOConfig, BCOConfig, RewardConfig)
        "cpo" => new CpoLoss(new CpoOptions { FusedCpu = fusedCpu }),
        "simpo" => new SimPoLoss(new SimPoOptions { FusedCpu = fusedCpu }),
        "alphapo" => new AlphaPoLoss(new AlphaPoOptions { FusedCpu = fusedCpu }),
        "orpo" => new OrpoLoss(new OrpoOptions { FusedCpu = fusedCpu }),
        "kto" => new KtoLoss(new KtoOptions { FusedCpu = fusedCpu }),
        "apo_zero_unpaired" => new ApoZeroUnpairedLoss(new KtoOptions { FusedCpu = fusedCpu }),
        "bco" => new BcoLoss(new BcoRewardBaseline()),    // the running mean is updated by every call, as in TRL's training step
        "bradley_terry" => new BradleyTerryLoss(new BradleyTerryOptions { FusedCpu = fusedCpu }),
        _ => throw new ArgumentException($"unknown loss {name}", nameof(name)),
    };

    /// <summary>cpu, plus cuda when a GPU is present; BENCH_DEVICES=cpu or =cuda keeps one (the GPU script runs them as separate stages).</summary>
    public static IEnumerable<string> Devices()
    {
        var only = Environment.GetEnvironmentVariable("BENCH_DEVICES");
        if (only is null or "" or "cpu") yield return "cpu";
        if (only is null or "" or "cuda" && cuda.is_available()) yield return "cuda";
    }

    public void Dispose()
    {
        foreach (var t in Owned) t.Dispose();
        _scope.Dispose();
    }
}
