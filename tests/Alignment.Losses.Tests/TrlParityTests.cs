using Alignment.Losses;
using Alignment.Losses.Data;

namespace Alignment.Losses.Tests;

/// <summary>
/// Where TRL's trainers and the library once disagreed (issue #23): ORPO's NLL over prompt and completion, CPO-SimPO and
/// the AlphaPO shape under TRL's names, KTO's mismatched pairs, and the two silent mistakes (positive "log-probs", a policy
/// without gradient). The expected numbers are computed by hand or by the float64 oracle, never read from the library.
/// </summary>
public class TrlParityTests
{
    static readonly ScalarType F64 = ScalarType.Float64;
    static Tensor T(params double[] v) => TensorUtil.Const(v, F64);

    [Fact]
    public void Orpo_averages_its_nll_over_prompt_and_completion_as_trl_does_and_over_the_completion_when_asked()
    {
        // B = 1, beta 0.1: a 2-token prompt whose second token has log-prob -3 (the first is never scored), chosen 2 tokens of
        // -1, rejected 1 token of -2. TRL: nll = (3 + 2) / 3 = 5/3; completion only: nll = 2 / 2 = 1.
        using var scope = NewDisposeScope();
        var policy = new PreferenceLogps(T(-2), T(-2), T(2), T(1));
        double aw = -1, al = -2;
        double logOdds = (aw - Math.Log(1 - Math.Exp(aw))) - (al - Math.Log(1 - Math.Exp(al)));
        double ratioTerm = 0.1 * Oracle.Softplus(-logOdds);           // -beta logsigmoid(log odds)
        using var trl = OrpoLoss.Compute(policy, new PromptLogps(T(-3), T(1)));
        Assert.Equal(5.0 / 3 + ratioTerm, trl.Loss.ToDouble(), 12);
        Assert.Equal(1.6904850, trl.Loss.ToDouble(), 6);               // the figure TRL's ORPOTrainer gives (issue #23)
        Assert.Equal(5.0 / 3, trl[MetricNames.NllLoss], 12);
        using var completion = new OrpoLoss(new OrpoOptions { NllTokens = OrpoNllTokens.Completion }).Compute(new PreferenceBatch(policy));
        Assert.Equal(1 + ratioTerm, completion.Loss.ToDouble(), 12);
        Assert.Equal(1.0238183, completion.Loss.ToDouble(), 6);
        // the default needs the prompt and says how to get it
        var e = Assert.Throws<ArgumentException>(() => new OrpoLoss().Compute(new PreferenceBatch(policy)));
        Assert.Equal("batch.Prompt", e.ParamName);
        Assert.Contains("SequenceLabels", e.Message);
        Assert.Contains("OrpoNllTokens.Completion", e.Message);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Orpo_on_collated_prompts_equals_the_oracle_over_the_tokens_trl_scores(bool packed)
    {
        // the whole pipeline: collate, score every attended token once, split into completion and prompt with Within
        using var scope = NewDisposeScope();
        var examples = new[]
        {
            new PreferenceExample(new[] { 1, 2, 3 }, new[] { 4, 5 }, new[] { 6 }),
            new PreferenceExample(new[] { 7 }, new[] { 8, 9, 1 }, new[] { 2, 3 }),
        };
        var collator = new PreferenceCollator(new PreferenceCollatorOptions { PadTokenId = 0 });
        using var batch = packed ? collator.CollatePacked(examples) : collator.Collate(examples);
        manual_seed(5);
        var logits = randn(batch.InputIds.shape[0], batch.InputIds.shape[1], 10, dtype: F64).requires_grad_(true);
        SequenceLogProbsResult Score(Tensor labels) => batch.Boundaries is { } bounds
            ? SequenceLogProbs.Compute(logits, labels, null, bounds, LabelAlignment.ShiftByOne)
            : SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.ShiftByOne);
        using var all = Score(batch.SequenceLabels);
        using var completion = all.Within(batch.CompletionMask);
        using var prompt = all.Within(batch.PromptMask);
        using var direct = Score(batch.Labels);
        TensorUtil.AssertClose(direct.Sum, completion.Sum, 1e-12, "Within(CompletionMask) = the completion labels' log-probs");

        // by hand: log_softmax at each position t - 1 for token t, summed per part (the first token of a sequence is never scored)
        var logp = TensorUtil.Values(nn.functional.log_softmax(logits.detach(), -1).flatten());
        long rows = logits.shape[0], width = logits.shape[1];
        double Lp(long row, long t, long token) => logp[(row * width + t) * 10 + token];
        var sequences = examples.Select(x => (x.Prompt, Completion: x.Chosen)).Concat(examples.Select(x => (x.Prompt, Completion: x.Rejected))).ToArray();
        var promptSum = new double[2]; var promptCount = new double[2];
        var completionSum = new double[4]; var completionCount = new double[4];
        long offset = 0;
        for (int s = 0; s < 4; s++)
        {
            var tokens = sequences[s].Prompt.Concat(sequences[s].Completion).ToArray();
            long row = packed ? 0 : s, start = packed ? offset : 0;
            for (int t = 1; t < tokens.Length; t++)
            {
                double v = Lp(row, start + t - 1, tokens[t]);
                if (t < sequences[s].Prompt.Count) { if (s < 2) { promptSum[s] += v; promptCount[s]++; } }
                else { completionSum[s] += v; completionCount[s]++; }
            }
            offset += tokens.Length;
        }
        Assert.Equal(rows, packed ? 1 : 4);
        var promptLogps = prompt.ToPromptLogps();
        TensorUtil.AssertClose(T(promptSum), promptLogps.Sum, 1e-12, "prompt sums");
        TensorUtil.AssertClose(T(promptCount), promptLogps.TokenCounts, 0, "prompt token counts");
        TensorUtil.AssertClose(T(completionSum), completion.Sum, 1e-12, "completion sums");

        using var r = OrpoLoss.Compute(completion.ToPreferenceLogps(), promptLogps, new OrpoOptions { Beta = 0.3 });
        var expected = Oracle.Orpo(completionSum[..2], completionSum[2..], completionCount[..2], completionCount[2..], 0.3, promptSum, promptCount);
        Assert.Equal(expected.Loss, r.Loss.ToDouble(), 10);
        r.Backward();
        Assert.True(double.IsFinite(logits.grad!.abs().sum().ToDouble()));
    }

    [Fact]
    public void Trl_simpo_is_cpo_simpo_with_the_nll_and_cpo_alpha_zero_is_the_papers_simpo()
    {
        using var scope = NewDisposeScope();
        double[] pc = { -12, -30, -8 }, pr = { -15, -28, -20 }, nw = { 4, 10, 2 }, nl = { 5, 7, 6 };
        var policy = new PreferenceLogps(T(pc), T(pr), T(nw), T(nl));
        using var cpoSimpo = TrlLosses.CreateForTrainer("simpo").Compute(new PreferenceBatch(policy));
        var simpo = Oracle.SimPo(pc, pr, nw, nl, 0.1, 0.5, 0, 0).Loss;
        double nll = -pc.Sum() / nw.Sum();
        Assert.Equal(simpo + nll, cpoSimpo.Loss.ToDouble(), 12);
        Assert.Equal(nll, cpoSimpo[MetricNames.NllLoss], 12);
        using var paper = TrlLosses.CreateForTrainer("simpo", new TrlTrainerConfig { CpoAlpha = 0 }).Compute(new PreferenceBatch(policy));
        Assert.Equal(simpo, paper.Loss.ToDouble(), 12);
        Assert.Equal(0.0, paper[MetricNames.NllLoss]);                // TRL reports nll_loss 0 at cpo_alpha 0
        using var plain = SimPoLoss.Compute(policy, new SimPoOptions { Beta = 0.1, Gamma = 0.5 });
        Assert.Equal(plain.Loss.ToDouble(), paper.Loss.ToDouble(), 12);
    }

    [Theory]
    [InlineData("sigmoid")]
    [InlineData("hinge")]
    [InlineData("ipo")]
    public void Cpo_applies_the_alphapo_shape_to_every_loss_type_as_trl_does(string type)
    {
        using var scope = NewDisposeScope();
        double[] pc = { -12, -30, -8 }, pr = { -15, -28, -20 }, nw = { 4, 10, 2 }, nl = { 5, 7, 6 };
        var policy = new PreferenceLogps(T(pc), T(pr), T(nw), T(nl));
        using var shaped = TrlLosses.CreateForTrainer("cpo", new TrlTrainerConfig { CpoLossType = type, Alpha = 0.05, Beta = 0.2 }).Compute(new PreferenceBatch(policy));
        using var unshaped = TrlLosses.CreateForTrainer("cpo", new TrlTrainerConfig { CpoLossType = type, Beta = 0.2 }).Compute(new PreferenceBatch(policy));
        Assert.Equal(Oracle.Cpo(pc, pr, nw, nl, type, 0.2, 0, 1, shape: 0.05).Loss, shaped.Loss.ToDouble(), 12);
        Assert.Equal(Oracle.Cpo(pc, pr, nw, nl, type, 0.2, 0, 1).Loss, unshaped.Loss.ToDouble(), 12);
        Assert.NotEqual(shaped.Loss.ToDouble(), unshaped.Loss.ToDouble());
    }

    [Fact]
    public void Kto_mismatched_examples_rotate_the_completions_by_one_over_the_two_b_sequences()
    {
        var examples = new[]
        {
            new PreferenceExample(new[] { 1 }, new[] { 11 }, new[] { 21 }),
            new PreferenceExample(new[] { 2 }, new[] { 12 }, new[] { 22 }),
        };
        var m = PreferenceCollator.MismatchedExamples(examples);
        // the 2B sequences c1, c2, r1, r2 each take the previous one's completion: (p1, r2), (p2, c1), (p1, c2), (p2, r1)
        string S(PreferenceExample e) => $"{string.Join(",", e.Prompt)} | {string.Join(",", e.Chosen)} | {string.Join(",", e.Rejected)}";
        Assert.Equal("1 | 22 | 12", S(m[0]));
        Assert.Equal("2 | 11 | 21", S(m[1]));
        using var collated = new PreferenceCollator().CollateMismatched(examples);
        Assert.Equal(4, collated.InputIds.shape[0]);
        Assert.Equal("examples", Assert.Throws<ArgumentException>(() => PreferenceCollator.MismatchedExamples(Array.Empty<PreferenceExample>())).ParamName);
    }

    [Fact]
    public void Positive_log_probs_are_refused_by_name_except_where_a_loss_takes_scores()
    {
        using var scope = NewDisposeScope();
        var logits = new PreferenceLogps(T(2.5, -1), T(-3, -4));
        var e = Assert.Throws<ArgumentException>(() => DpoLoss.Compute(logits));
        Assert.Equal("policy.Chosen", e.ParamName);
        Assert.Contains("2.5", e.Message);
        Assert.Contains("logits", e.Message);
        var reference = new PreferenceLogps(T(-1, -1), T(-1, 0.7));
        Assert.Equal("reference.Rejected", Assert.Throws<ArgumentException>(() => DpoLoss.Compute(new PreferenceLogps(T(-1, -2), T(-3, -4)), reference)).ParamName);
        // rounding in another engine (a log-prob of +1e-4) passes; so does 0 exactly
        using var rounded = DpoLoss.Compute(new PreferenceLogps(T(1e-4, 0), T(-3, -4)));
        Assert.True(double.IsFinite(rounded.Loss.ToDouble()));
        // the reward model's inputs are scores: any sign
        using var rewards = BradleyTerryLoss.Compute(T(2.5, 3), T(-1, 4));
        Assert.True(double.IsFinite(rewards.Loss.ToDouble()));
    }

    [Fact]
    public void A_result_without_gradient_says_so_and_an_evaluation_call_still_works()
    {
        using var scope = NewDisposeScope();
        var policy = new PreferenceLogps(T(-5, -6), T(-7, -6.5));
        using var evaluation = DpoLoss.Compute(policy);
        Assert.False(evaluation.RequiresGrad);
        Assert.True(double.IsFinite(evaluation.Loss.ToDouble()));
        var e = Assert.Throws<InvalidOperationException>(() => evaluation.Backward());
        Assert.Contains("requires grad", e.Message);
        Assert.Contains("dpo", e.Message);
        var chosen = TensorUtil.Leaf(new[] { -5.0, -6 }, F64);
        using var training = DpoLoss.Compute(new PreferenceLogps(chosen, T(-7, -6.5)));
        Assert.True(training.RequiresGrad);
        training.Backward();
        Assert.True(chosen.grad!.lt(0).all().item<bool>());
    }

    [Fact]
    public void The_runtime_glibcxx_fix_writes_the_same_bytes_as_the_build_task()
    {
        var original = Path.Combine(Environment.GetEnvironmentVariable("NUGET_PACKAGES") is { Length: > 0 } p ? p
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages"),
            "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        var built = Directory.Exists(Path.Combine(ProcessRunner.RepoRoot, "src", "Alignment.Losses", "obj"))
            ? Directory.GetFiles(Path.Combine(ProcessRunner.RepoRoot, "src", "Alignment.Losses", "obj"), "libLibTorchSharp.so", SearchOption.AllDirectories)
                .FirstOrDefault(f => f.Contains("glibcxx-weak", StringComparison.Ordinal))
            : null;
        if (!File.Exists(original) || built is null)
        {
            Assert.Fail($"needs TorchSharp's package copy ({original}) and the build task's output under src/Alignment.Losses/obj (Linux builds write it)");
            return;
        }
        var bytes = File.ReadAllBytes(original);
        int changed = ElfVersionNeed.Weaken(bytes, TorchSharpLoader.GlibcxxVersion);
        Assert.True(changed > 0, "the package copy has a strong GLIBCXX_3.4.32 need");
        Assert.Equal(File.ReadAllBytes(built), bytes);
        Assert.Equal(0, ElfVersionNeed.Weaken(bytes, TorchSharpLoader.GlibcxxVersion));   // idempotent
        Assert.Throws<ArgumentException>(() => ElfVersionNeed.Weaken(new byte[64], TorchSharpLoader.GlibcxxVersion));
    }

    [Fact]
    public void Views_split_from_a_result_are_released_with_it_without_any_caller_scope()
    {
        long before = -1, during = -1, after = -1;
        Exception? error = null;
        var thread = new Thread(() =>
        {
            try
            {
                var stats = DisposeScopeManager.Statistics;
                stats.Reset();
                using var logits = randn(4, 5, 7);
                using var labels = randint(0, 7, new long[] { 4, 5 });
                using var mask = ones(4, 5, dtype: ScalarType.Bool);
                before = stats.ThreadTotalLiveCount;
                for (int i = 0; i < 50; i++)
                {
                    var r = SequenceLogProbs.Compute(logits, labels, mask, LabelAlignment.ShiftByOne);
                    _ = r.ToPreferenceLogps();
                    _ = r.ToUnpairedLogps(1);
                    _ = r.ToPromptLogps();
                    var part = r.Within(mask);
                    _ = part.ToPreferenceLogps();
                    if (i == 0) during = stats.ThreadTotalLiveCount;
                    part.Dispose();
                    r.Dispose();
                }
                after = stats.ThreadTotalLiveCount;
            }
            catch (Exception e) { error = e; }
        });
        thread.Start();
        thread.Join();
        Assert.Null(error);
        Assert.True(during > before);
        Assert.Equal(before, after);
    }
}
