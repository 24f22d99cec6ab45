using Alignment.Losses;
using Alignment.Losses.Internal;

namespace Alignment.Losses.Tests;

/// <summary>
/// The edges a hostile or new user reaches: silent NaN/Inf, scale-dependent weights, precision lost before a side input
/// is combined, hyperparameters no float32 loss can represent, misleading messages, disposed or meta tensors, enum values
/// outside their range, result lifetime, and variants that must be chosen explicitly. Each test failed on the code before
/// these fixes.
/// </summary>
public class HardeningTests
{
    static Tensor F(params float[] v) => tensor(v);
    static Tensor D(params double[] v) => tensor(v, dtype: ScalarType.Float64);
    static PreferenceLogps Ok(int n = 3) => new(randn(n) - 10, randn(n) - 12);

    // ---- silent NaN / Inf --------------------------------------------------------------------------------------

    [Fact]
    public void Fused_path_ignores_a_nan_hidden_state_at_a_masked_position_in_every_gradient()
    {
        using var scope = NewDisposeScope();
        manual_seed(3);
        var clean = randn(2, 4, 3, dtype: ScalarType.Float64);
        var mask = ones(2, 4, dtype: ScalarType.Bool);
        mask[1, 2] = tensor(false);
        var labels = randint(0, 5, new long[] { 2, 4 });
        var weight0 = randn(5, 3, dtype: ScalarType.Float64);
        double[] Grads(Tensor hiddenValues)
        {
            var hidden = hiddenValues.clone().requires_grad_(true);
            var weight = weight0.clone().requires_grad_(true);
            using var r = FusedLinearLogProbs.Compute(hidden, weight, null, labels, mask, LabelAlignment.Aligned, new SequenceLogProbsOptions { ChunkTokens = 3 });
            using (var total = r.Sum.sum()) total.backward();
            return TensorUtil.Values(weight.grad!.flatten()).Concat(TensorUtil.Values(hidden.grad!.flatten())).ToArray();
        }
        var withNan = clean.clone();
        withNan[1, 2] = full(3, double.NaN, dtype: ScalarType.Float64);
        var expected = Grads(clean);
        var actual = Grads(withNan);
        Assert.All(actual, v => Assert.True(double.IsFinite(v), "a gradient is not finite"));
        for (int i = 0; i < expected.Length; i++) Assert.Equal(expected[i], actual[i], 12);
    }

    [Theory]
    [InlineData(1e39)]
    [InlineData(1e-300)]
    [InlineData(double.NaN)]
    public void Listwise_spo_rejects_an_alpha_no_float32_loss_can_represent(double alpha)
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => SpoLoss.ListwisePreference(randn(2, 3) - 5, tensor(new long[] { 0, 1 }), alpha));
        Assert.Equal("alpha", e.ParamName);
    }

    [Theory]
    [InlineData(1e12)]
    [InlineData(1e-12)]
    public void Listwise_spo_is_finite_at_the_ends_of_the_alpha_range(double alpha)
    {
        using var scope = NewDisposeScope();
        var candidates = F(-3, -5, -4, -9, -2, -7).reshape(2, 3);
        var loss = SpoLoss.ListwisePreference(candidates, tensor(new long[] { 0, 2 }), alpha);
        Assert.True(double.IsFinite(loss.ToDouble()));
    }

    [Fact]
    public void Win_rates_from_float64_scores_beyond_float32_range_are_exact()
    {
        using var scope = NewDisposeScope();
        // differences of +-1e39 and +-2e39 saturate the sigmoid at exactly 0 or 1; in float32 each score was Inf and Inf - Inf NaN
        var s = SppoWinRateEstimator.FromScores(D(1e39, -1e39, 0).reshape(1, 3));
        var rates = TensorUtil.Values(s.AllWinRates);
        var expected = new[] { 2.5 / 3, 0.5 / 3, 1.5 / 3 };
        for (int k = 0; k < 3; k++) Assert.Equal(expected[k], rates[k], 12);
        Assert.Equal(ScalarType.Float64, s.AllWinRates.dtype);
        Assert.Equal(0L, s.ChosenIndex.item<long>());
        Assert.Equal(1L, s.RejectedIndex.item<long>());
    }

    [Fact]
    public void Token_kl_rejects_a_mask_holding_nan()
    {
        var mask = ones(2, 3);
        mask[0, 1] = tensor(float.NaN);
        var e = Assert.Throws<ArgumentException>(() => TokenKl.Compute(randn(2, 3, 4), randn(2, 3, 4), mask));
        Assert.Equal("mask", e.ParamName);
    }

    [Fact]
    public void Sequence_log_probs_reject_a_mask_holding_nan()
    {
        var mask = ones(2, 3);
        mask[1, 1] = tensor(float.NaN);
        var e = Assert.Throws<ArgumentException>(() => SequenceLogProbs.Compute(randn(2, 3, 4), randint(0, 4, new long[] { 2, 3 }), mask, LabelAlignment.Aligned));
        Assert.Equal("mask", e.ParamName);
    }

    // ---- RPO weights: scale-robust normalisation -----------------------------------------------------------------

    [Theory]
    [InlineData(1e19)]
    [InlineData(1e-30)]
    [InlineData(1e30)]
    public void Cosine_weights_do_not_depend_on_the_embeddings_scale(double scale)
    {
        using var scope = NewDisposeScope();
        manual_seed(5);
        var e = randn(3, 4, dtype: ScalarType.Float64);
        var weighting = new CosineSoftmaxWeighting(0.5);
        var unit = weighting.ComputeWeights(e.to_type(ScalarType.Float32), e.to_type(ScalarType.Float32), ScalarType.Float32);
        var scaled = weighting.ComputeWeights((e * scale).to_type(ScalarType.Float32), (e * scale).to_type(ScalarType.Float32), ScalarType.Float32);
        Assert.True(allclose(unit, scaled, 1e-5, 1e-6), $"scale {scale:G}: {string.Join(", ", TensorUtil.Values(scaled.flatten()))} vs {string.Join(", ", TensorUtil.Values(unit.flatten()))}");
        // the oracle: MathNet cosine distances of the same rows
        var rows = Enumerable.Range(0, 3).Select(i => TensorUtil.Values(e.to_type(ScalarType.Float32)[i])).ToArray();
        var oracle = Oracle.RpoWeights(rows, rows, 0.5);
        Assert.Equal(oracle[0, 0], TensorUtil.Values(scaled)[0], 5);
    }

    [Fact]
    public void An_all_zero_embedding_row_is_still_an_error_and_the_docs_define_zero()
    {
        var e = Assert.Throws<ArgumentException>(() =>
            new CosineSoftmaxWeighting(0.5).ComputeWeights(F(1, 0, 0, 0).reshape(2, 2), F(1, 0).reshape(1, 2), ScalarType.Float32));
        Assert.Contains("rows 1 have zero norm (every value is exactly 0)", e.Message);
    }

    [Fact]
    public void A_tiny_valid_temperature_puts_each_row_on_its_nearest_prompt()
    {
        using var scope = NewDisposeScope();
        var emb = F(1, 0, 0, 1, 0.6f, 0.8f).reshape(3, 2);
        var w = new CosineSoftmaxWeighting(1e-12).ComputeWeights(emb, emb, ScalarType.Float32);
        Assert.True(isfinite(w).all().item<bool>());
        Assert.Equal(new[] { 1.0, 1.0, 1.0 }, TensorUtil.Values(w.diagonal()));
        using var r = RpoLoss.Compute(Ok(), Ok(), emb, new RpoOptions { Temperature = 1e-12 });
        Assert.Equal(1.0, r[MetricNames.RpoDiagonalWeight], 12);
    }

    // ---- side inputs keep their precision; hyperparameters; messages ---------------------------------------------

    [Fact]
    public void Odpo_float64_scores_closer_than_float32_resolution_give_the_exact_offset()
    {
        using var scope = NewDisposeScope();
        var policy = new PreferenceLogps(F(-10, -20), F(-11, -19));
        var reference = new PreferenceLogps(F(-10.5f, -20), F(-10.5f, -19.5f));
        var scores = new ResponseScores(D(5.0000001, 3), D(5.0, 1));
        using var r = OdpoLoss.Compute(policy, reference, scores, new OdpoOptions { Beta = 0.5, Alpha = 0.5 });
        var x = new[] { -10.0, -20 }; var y = new[] { -11.0, -19 }; var rx = new[] { -10.5, -20 }; var ry = new[] { -10.5, -19.5 };
        var expected = Oracle.Odpo(x, y, rx, ry, new[] { 5.0000001, 3 }, new[] { 5.0, 1 }, 0.5, 0.5, ratio: false);
        Assert.Equal(expected.Loss, r.Loss.ToDouble(), 6);
        Assert.Equal(0.5 * (Math.Log(1e-7) + Math.Log(2)) / 2, r[MetricNames.OdpoOffset], 4);
    }

    public static IEnumerable<object[]> UnrepresentableHyperparameters()
    {
        yield return Case("SpoOptions.KlWeight 1e39", () => _ = new SpoOptions { KlWeight = 1e39 }, "KlWeight");
        yield return Case("SpoOptions.Alpha 1e-300", () => _ = new SpoOptions { Alpha = 1e-300 }, "Alpha");
        yield return Case("RpoOptions.Temperature 1e-46", () => _ = new RpoOptions { Temperature = 1e-46 }, "Temperature");
        yield return Case("CosineSoftmaxWeighting 1e-46", () => _ = new CosineSoftmaxWeighting(1e-46), "temperature");
        yield return Case("DpoOptions.Beta 1e39", () => _ = new DpoOptions { Beta = 1e39 }, "Beta");
        yield return Case("IpoOptions.Beta 1e-30", () => _ = new IpoOptions { Beta = 1e-30 }, "Beta");
        yield return Case("SppoOptions.Beta 1e-300", () => _ = new SppoOptions { Beta = 1e-300 }, "Beta");
        yield return Case("DpoNllOptions.NllWeight 1e40", () => _ = new DpoNllOptions { NllWeight = 1e40 }, "NllWeight");
        yield return Case("OdpoOptions.Alpha 1e40", () => _ = new OdpoOptions { Alpha = 1e40 }, "Alpha");
        yield return Case("OdpoOptions.MinimumScoreGap 1e-300", () => _ = new OdpoOptions { MinimumScoreGap = 1e-300 }, "MinimumScoreGap");
        static object[] Case(string name, Action act, string param) => new object[] { name, act, param };
    }

    [Theory, MemberData(nameof(UnrepresentableHyperparameters))]
    public void Hyperparameters_no_float32_loss_can_represent_are_rejected_on_construction(string name, Action create, string param)
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(create);
        Assert.True(e.ParamName == param, $"{name}: ParamName {e.ParamName}");
        Assert.Contains("1e12]", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void An_overflow_with_finite_inputs_names_the_options_and_the_magnitudes_not_the_log_probs()
    {
        var policy = new PreferenceLogps(F(-2, -3), F(-1e30f, -4));     // finite log-probs, a margin of 1e30
        var e = Assert.Throws<ArithmeticException>(() => DpoLoss.Compute(policy, null, new DpoOptions { Beta = 1e12 }));
        Assert.Contains("overflowed Float32", e.Message);
        Assert.Contains("Beta = 1000000000000", e.Message);
        Assert.Contains("1E+30", e.Message);
        Assert.DoesNotContain("log-probs are too large", e.Message);
    }

    [Theory]
    [InlineData(0.4999)]
    [InlineData(0.49999)]
    [InlineData(0.3)]
    public void Robust_dpo_keeps_float32_accuracy_as_eps_approaches_one_half(double eps)
    {
        using var scope = NewDisposeScope();
        double[] pc = { -10, -12, -30, -7 }, pr = { -12, -12, -29, -9 }, rc = { -10, -11, -30, -8 }, rr = { -12, -12, -28.5, -9 };
        var policy = new PreferenceLogps(TensorUtil.Const(pc, ScalarType.Float32), TensorUtil.Const(pr, ScalarType.Float32));
        var reference = new PreferenceLogps(TensorUtil.Const(rc, ScalarType.Float32), TensorUtil.Const(rr, ScalarType.Float32));
        using var r = RobustDpoLoss.Compute(policy, reference, new RobustDpoOptions { LabelSmoothing = eps });
        var perExample = TensorUtil.Values(r.PerExample);
        for (int i = 0; i < pc.Length; i++)
        {
            // each pair on its own (pair 0 has h = 0: the loss is ln 2, which the written form missed by 7.9e-5 at eps 0.4999)
            var expected = Oracle.Robust(new[] { pc[i] }, new[] { pr[i] }, new[] { rc[i] }, new[] { rr[i] }, 0.1, eps).Loss;
            Assert.True(Math.Abs(perExample[i] - expected) <= 1e-6 * Math.Max(1, Math.Abs(expected)),
                $"eps {eps}, pair {i}: float32 loss {perExample[i]:R} vs float64 oracle {expected:R}");
        }
    }

    // ---- disposed and meta tensors, enums, names of arguments ------------------------------------------------------

    [Fact]
    public void A_tensor_disposed_after_construction_is_named_when_the_loss_reads_it()
    {
        var chosen = randn(3);
        var policy = new PreferenceLogps(chosen, randn(3));
        chosen.Dispose();
        Assert.Equal("policy.Chosen", Assert.Throws<ObjectDisposedException>(() => DpoLoss.Compute(policy)).ObjectName);

        var rejected = randn(3);
        var reference = new PreferenceLogps(randn(3), rejected);
        rejected.Dispose();
        Assert.Equal("reference.Rejected", Assert.Throws<ObjectDisposedException>(() => DpoLoss.Compute(Ok(), reference)).ObjectName);

        var e = randn(3, 4);
        var embeddings = PromptEmbeddings.Paired(e);
        e.Dispose();
        Assert.Equal("promptEmbeddings", Assert.Throws<ObjectDisposedException>(() => RpoLoss.Compute(Ok(), null, embeddings)).ObjectName);

        var scores = randn(3);
        var odpoScores = new ResponseScores(scores + 2, scores);
        scores.Dispose();
        Assert.Equal("scores.Rejected", Assert.Throws<ObjectDisposedException>(() => OdpoLoss.Compute(Ok(), null, odpoScores)).ObjectName);
    }

    public static IEnumerable<object[]> MetaTensors()
    {
        Tensor Meta(params long[] shape) => empty(shape, device: META);
        yield return Case("PreferenceLogps", () => _ = new PreferenceLogps(Meta(3), Meta(3)), "chosen");
        yield return Case("PromptEmbeddings", () => _ = PromptEmbeddings.Paired(Meta(3, 2)), "embeddings");
        yield return Case("SequenceLogProbs", () => SequenceLogProbs.Compute(Meta(2, 3, 4), empty(2, 3, dtype: ScalarType.Int64, device: META), null, LabelAlignment.Aligned), "logits");
        yield return Case("FusedLinearLogProbs", () => FusedLinearLogProbs.Compute(Meta(2, 3, 4), Meta(5, 4), null, zeros(2, 3, dtype: ScalarType.Int64), null, LabelAlignment.Aligned), "hidden");
        yield return Case("TokenKl", () => TokenKl.Compute(Meta(2, 3, 4), Meta(2, 3, 4), Meta(2, 3)), "policyLogits");
        yield return Case("ListwisePreference", () => SpoLoss.ListwisePreference(Meta(2, 3), empty(2, dtype: ScalarType.Int64, device: META)), "candidateLogps");
        yield return Case("SppoWinRateEstimator", () => SppoWinRateEstimator.FromScores(Meta(2, 3)), "scores");
        yield return Case("CosineSoftmaxWeighting", () => new CosineSoftmaxWeighting(0.5).ComputeWeights(Meta(2, 3), Meta(2, 3), ScalarType.Float32), "chosen");
        yield return Case("RPO weight matrix", () => new RpoLoss().Compute(new PreferenceBatch(Ok()) { RpoWeights = Meta(3, 3) }), "batch.RpoWeights");
        static object[] Case(string name, Action act, string param) => new object[] { name, act, param };
    }

    [Theory, MemberData(nameof(MetaTensors))]
    public void Tensors_on_the_meta_device_are_a_clear_error_naming_the_argument(string name, Action act, string param)
    {
        var e = Assert.Throws<ArgumentException>(act);
        Assert.True(e.ParamName == param, $"{name}: ParamName {e.ParamName}: {e.Message}");
        Assert.Contains("meta device", e.Message);
    }

    public static IEnumerable<object[]> EnumsOutOfRange()
    {
        yield return Case(() => _ = new IpoOptions { LogRatio = (IpoLogRatio)7 }, "LogRatio");
        yield return Case(() => _ = new RpoOptions { WeightPlacement = (RpoWeightPlacement)7 }, "WeightPlacement");
        yield return Case(() => _ = new RpoOptions { Variant = (RpoVariant)7 }, "Variant");
        yield return Case(() => _ = new OdpoOptions { OffsetForm = (OdpoOffsetForm)7 }, "OffsetForm");
        yield return Case(() => _ = new SppoOptions { Form = (SppoForm)7 }, "Form");
        yield return Case(() => SequenceLogProbs.Compute(randn(1, 2, 3), zeros(1, 2, dtype: ScalarType.Int64), null, (LabelAlignment)7), "alignment");
        yield return Case(() => FusedLinearLogProbs.Compute(randn(1, 2, 3), randn(4, 3), null, zeros(1, 2, dtype: ScalarType.Int64), null, (LabelAlignment)7), "alignment");
        static object[] Case(Action act, string param) => new object[] { act, param };
    }

    [Theory, MemberData(nameof(EnumsOutOfRange))]
    public void Enum_values_outside_their_declared_values_are_rejected(Action act, string param) =>
        Assert.Equal(param, Assert.Throws<ArgumentOutOfRangeException>(act).ParamName);

    [Fact]
    public void Fused_path_names_a_non_finite_weight_or_bias_and_checks_the_bias_dtype()
    {
        using var scope = NewDisposeScope();
        var hidden = randn(2, 3, 4);
        var labels = randint(0, 5, new long[] { 2, 3 });
        var weight = randn(5, 4);
        var nanWeight = weight.clone(); nanWeight[2, 1] = tensor(float.NaN);
        var infBias = zeros(5); infBias[0] = tensor(float.PositiveInfinity);
        Assert.Equal("weight", Assert.Throws<ArgumentException>(() => FusedLinearLogProbs.Compute(hidden, nanWeight, null, labels, null, LabelAlignment.Aligned)).ParamName);
        Assert.Equal("bias", Assert.Throws<ArgumentException>(() => FusedLinearLogProbs.Compute(hidden, weight, infBias, labels, null, LabelAlignment.Aligned)).ParamName);
        Assert.Equal("bias", Assert.Throws<ArgumentException>(() => FusedLinearLogProbs.Compute(hidden, weight, zeros(5, dtype: ScalarType.Int32), labels, null, LabelAlignment.Aligned)).ParamName);
        var nanHidden = hidden.clone(); nanHidden[1, 0, 0] = tensor(float.NaN);
        var e = Assert.Throws<ArgumentException>(() => FusedLinearLogProbs.Compute(nanHidden, weight, null, labels, null, LabelAlignment.Aligned));
        Assert.Equal("hidden", e.ParamName);
        Assert.Contains("sequence(s) 1", e.Message);
    }

    [Fact]
    public void An_empty_vocabulary_names_the_tensor_that_has_it()
    {
        Assert.Equal("logits", Assert.Throws<ArgumentException>(() =>
            SequenceLogProbs.Compute(zeros(2, 3, 0), zeros(2, 3, dtype: ScalarType.Int64), null, LabelAlignment.Aligned)).ParamName);
        Assert.Equal("weight", Assert.Throws<ArgumentException>(() =>
            FusedLinearLogProbs.Compute(randn(2, 3, 4), zeros(0, 4), null, zeros(2, 3, dtype: ScalarType.Int64), null, LabelAlignment.Aligned)).ParamName);
    }

    [Fact]
    public void The_fused_loss_with_an_odd_row_count_names_hidden()
    {
        var e = Assert.Throws<ArgumentException>(() => FusedLinearLogProbs.ComputeLoss(new DpoLoss(), randn(3, 2, 4), randn(5, 4), null,
            randint(0, 5, new long[] { 3, 2 }), null, LabelAlignment.Aligned));
        Assert.Equal("hidden", e.ParamName);
        Assert.Contains("odd", e.Message);
    }

    // ---- the log-prob step: vectorised, exact ----------------------------------------------------------------------

    [Fact]
    public void Many_short_sequences_run_in_a_few_large_blocks_and_equal_the_naive_computation()
    {
        Assert.Equal(79, ChunkMath.Blocks(20_000, 4, 1024).Count());          // not 20,000 per-sequence kernels
        Assert.Equal(4 * 3, ChunkMath.Blocks(4, 2500, 1024).Count());           // long sequences: token ranges
        using var scope = NewDisposeScope();
        var logits = randn(3000, 5, 7, dtype: ScalarType.Float64).requires_grad_(true);
        var labels = randint(0, 7, new long[] { 3000, 5 });
        foreach (var alignment in new[] { LabelAlignment.Aligned, LabelAlignment.ShiftByOne })
        {
            using var r = SequenceLogProbs.Compute(logits, labels, null, alignment, new SequenceLogProbsOptions { ChunkTokens = 64 });
            var (x, y) = alignment == LabelAlignment.ShiftByOne ? (logits.narrow(1, 0, 4), labels.narrow(1, 1, 4)) : (logits, labels);
            var naive = nn.functional.log_softmax(x.detach(), 2).gather(2, y.unsqueeze(2)).squeeze(2).sum(1);
            Assert.True(allclose(r.Sum.detach(), naive, 1e-12, 1e-12), alignment.ToString());
        }
    }

    // ---- results and explicit variants ----------------------------------------------------------------------------

    [Fact]
    public void Reading_a_result_after_its_scope_ended_names_the_result()
    {
        PreferenceLossResult r;
        SequenceLogProbsResult logps;
        double accuracy;
        using (NewDisposeScope())
        {
            r = DpoLoss.Compute(Ok());
            accuracy = r[MetricNames.RewardsAccuracies];                         // read inside the scope: kept
            logps = SequenceLogProbs.Compute(randn(2, 3, 4), zeros(2, 3, dtype: ScalarType.Int64), null, LabelAlignment.Aligned);
        }
        var e = Assert.Throws<ObjectDisposedException>(() => r.Loss);
        Assert.Equal("PreferenceLossResult (dpo)", e.ObjectName);
        Assert.Contains("dispose scope", e.Message);
        Assert.Throws<ObjectDisposedException>(() => r.PerExample);
        Assert.Equal(accuracy, r[MetricNames.RewardsAccuracies]);
        Assert.Equal(nameof(SequenceLogProbsResult), Assert.Throws<ObjectDisposedException>(() => logps.Sum).ObjectName);

        var unread = DpoLoss.Compute(Ok());
        unread.Dispose();
        Assert.Throws<ObjectDisposedException>(() => unread.Metrics);
    }

    [Fact]
    public void Rpo_without_embeddings_is_an_error_unless_a_variant_without_them_is_chosen()
    {
        var e = Assert.Throws<ArgumentException>(() => RpoLoss.Compute(Ok(), Ok()));
        Assert.Equal("batch.PromptEmbeddings", e.ParamName);
        Assert.Contains("RpoVariant.AllPairs", e.Message);
        using var allPairs = RpoLoss.Compute(Ok(), Ok(), new RpoOptions { Variant = RpoVariant.AllPairs });
        Assert.True(double.IsFinite(allPairs.Loss.ToDouble()));
        Assert.Equal("batch.PromptEmbeddings", Assert.Throws<ArgumentException>(() =>
            RpoLoss.Compute(Ok(), Ok(), randn(3, 2), new RpoOptions { Variant = RpoVariant.AllPairs })).ParamName);
    }

    [Fact]
    public void Every_variant_has_its_own_name()
    {
        IPreferenceLoss[] variants =
        {
            new DpoLoss(), new ConservativeDpoLoss(), new RobustDpoLoss(), new HingeLoss(), new DpoNllLoss(),
            new IpoLoss(), new IpoLoss(new() { LogRatio = IpoLogRatio.PerTokenMean }),
            new RpoLoss(), new RpoLoss(new() { WeightPlacement = RpoWeightPlacement.OutsideSigmoid }),
            new RpoLoss(new() { Variant = RpoVariant.AllPairs }), new RpoLoss(new() { Variant = RpoVariant.AllPairs, WeightPlacement = RpoWeightPlacement.OutsideSigmoid }),
            new RpoLoss(new() { Variant = RpoVariant.Diagonal }),
            new SpoLoss(), new SpoLoss(new() { KlWeight = 0 }),
            new OdpoLoss(), new OdpoLoss(new() { OffsetForm = OdpoOffsetForm.Ratio }),
            new SppoLoss(), new SppoLoss(new() { Form = SppoForm.Single }), new SppoLoss(new() { Form = SppoForm.Hard }),
        };
        var names = variants.Select(v => v.Name).ToList();
        Assert.Equal(names.Count, names.Distinct().Count());
        Assert.Contains("rpo_diagonal", names);
        Assert.Contains("rpo_all_pairs", names);
        Assert.Contains("ipo_per_token", names);
        Assert.Contains("spo_no_kl", names);
    }

    [Fact]
    public void The_fused_loss_takes_the_reference_and_side_inputs_without_a_placeholder_policy()
    {
        using var scope = NewDisposeScope();
        manual_seed(2);
        var hidden = randn(4, 3, 5, dtype: ScalarType.Float64);
        var weight = randn(6, 5, dtype: ScalarType.Float64);
        var labels = randint(0, 6, new long[] { 4, 3 });
        var reference = new PreferenceLogps(D(-9, -8), D(-10, -7));
        using var logps = FusedLinearLogProbs.Compute(hidden, weight, null, labels, null, LabelAlignment.Aligned);
        using var expected = DpoLoss.Compute(logps.ToPreferenceLogps(), reference);
        using var fused = FusedLinearLogProbs.ComputeLoss(new DpoLoss(), hidden, weight, null, labels, null, LabelAlignment.Aligned, reference);
        Assert.Equal(expected.Loss.ToDouble(), fused.Loss.ToDouble(), 12);
        var scores = new ResponseScores(D(2, 3), D(1, 1));
        using var odpo = FusedLinearLogProbs.ComputeLoss(new OdpoLoss(), p => new PreferenceBatch(p, reference) { Scores = scores },
            hidden, weight, null, labels, null, LabelAlignment.Aligned);
        Assert.True(double.IsFinite(odpo.Loss.ToDouble()));
        Assert.Throws<InvalidOperationException>(() => FusedLinearLogProbs.ComputeLoss(new DpoLoss(), _ => new PreferenceBatch(Ok(2)),
            hidden, weight, null, labels, null, LabelAlignment.Aligned));
    }
}

/// <summary>Issue #24, round two: state left as it was by failed calls, combinations that overflow, unpaired metrics.</summary>
public class HardeningRoundTwoTests
{
    static Tensor F(params double[] v) => tensor(v, dtype: ScalarType.Float64);

    [Fact]
    public void A_bco_call_that_fails_validation_leaves_the_callers_baseline_as_it_was()
    {
        using var scope = NewDisposeScope();
        var baseline = new BcoRewardBaseline();
        var loss = new BcoLoss(baseline, new BcoOptions { Beta = 0.5 });
        var policy = PreferenceLogps.Unpaired(F(-3, -4), F(-6));
        var reference = PreferenceLogps.Unpaired(F(-4, -4.5), F(-5));
        using (var ok = loss.Compute(new PreferenceBatch(policy, reference))) { }
        var (mean, count) = (baseline.Mean, baseline.Count);
        Assert.Equal(3, count);
        // negative weights, then the wrong number of weights: both refused, the baseline untouched, so a retry counts once
        Assert.Throws<ArgumentException>(() => loss.Compute(new PreferenceBatch(policy, reference) { ExampleWeights = F(1, -1, 1) }));
        Assert.Throws<ArgumentException>(() => loss.Compute(new PreferenceBatch(policy, reference) { ExampleWeights = F(1, 1) }));
        Assert.Equal((mean, count), (baseline.Mean, baseline.Count));
        using var retry = loss.Compute(new PreferenceBatch(policy, reference) { ExampleWeights = F(1, 1, 1) });
        Assert.Equal(6, baseline.Count);
        Assert.Equal(mean, baseline.Mean, 12);                         // the same batch again: the mean of its rewards twice
        Assert.Equal(mean, retry[MetricNames.Delta], 12);
    }

    [Fact]
    public void A_weighted_combination_that_overflows_is_an_arithmetic_error_not_a_silent_infinity()
    {
        using var scope = NewDisposeScope();
        var policy = new PreferenceLogps(tensor(new[] { -5e28f }), tensor(new[] { -1f }), tensor(new[] { 1f }), tensor(new[] { 1f }));
        var loss = new WeightedLoss((new SftLoss(), 1e12));
        var e = Assert.Throws<ArithmeticException>(() => loss.Compute(new PreferenceBatch(policy)));
        Assert.Contains("overflowed", e.Message);
        Assert.Contains("1E+12", e.Message);
        Assert.Contains("sft", e.Message);
    }

    [Fact]
    public void A_combination_that_fails_leaves_its_parts_state_as_it_was()
    {
        using var scope = NewDisposeScope();
        var baseline = new BcoRewardBaseline();
        var loss = new WeightedLoss((new BcoLoss(baseline), 1e12));
        var policy = PreferenceLogps.Unpaired(tensor(new[] { -5e29f }), tensor(new[] { -2f }));
        var reference = PreferenceLogps.Unpaired(tensor(new[] { -1f }), tensor(new[] { -1f }));
        Assert.Throws<ArithmeticException>(() => loss.Compute(new PreferenceBatch(policy, reference)));   // BCO's loss is finite, x 1e12 is not
        Assert.Equal((0.0, 0L), (baseline.Mean, baseline.Count));
        using var ok = new WeightedLoss((new BcoLoss(baseline), 0.5)).Compute(new PreferenceBatch(policy, reference));
        Assert.Equal(2, baseline.Count);                               // a combination that succeeds commits its parts' state
    }

    [Fact]
    public void Unpaired_metrics_accumulate_over_micro_batches_to_the_full_batchs()
    {
        using var scope = NewDisposeScope();
        double[] dw = { -3, -5, -2, -7 }, dr = { -3.5, -4, -2.5, -6 }, uw = { -6, -8, -4, -9 }, ur = { -5, -8.5, -4.2, -9.5 };
        var loss = new KtoLoss(new KtoOptions { Beta = 0.3 });
        PreferenceLossResult Run(int[] d, int[] u) => loss.Compute(new PreferenceBatch(
            PreferenceLogps.Unpaired(F(d.Select(i => dw[i]).ToArray()), F(u.Select(i => uw[i]).ToArray())),
            PreferenceLogps.Unpaired(F(d.Select(i => dr[i]).ToArray()), F(u.Select(i => ur[i]).ToArray())))
        { KlDivergence = zeros(1, dtype: ScalarType.Float64) });           // a fixed z0, so micro-batches see the same objective
        using var full = Run(new[] { 0, 1, 2, 3 }, new[] { 0, 1, 2, 3 });
        foreach (var (first, second) in new[]
        {
            ((new[] { 0, 1, 2 }, new[] { 0 }), (new[] { 3 }, new[] { 1, 2, 3 })),      // (3, 1) + (1, 3)
            ((new[] { 0, 1, 2, 3 }, Array.Empty<int>()), (Array.Empty<int>(), new[] { 0, 1, 2, 3 })),   // one side empty in each
        })
        {
            var acc = new Alignment.Losses.Metrics.MetricsAccumulator();
            using (var a = Run(first.Item1, first.Item2)) acc.Add(a);
            using (var b = Run(second.Item1, second.Item2)) acc.Add(b);
            var m = acc.Flush();
            foreach (var name in new[] { MetricNames.Loss, MetricNames.RewardsChosen, MetricNames.RewardsRejected, MetricNames.RewardsMargins, MetricNames.LogpsChosen, MetricNames.LogpsRejected })
            {
                double want = name == MetricNames.Loss ? full.Loss.ToDouble() : full[name];
                Assert.True(Math.Abs(m[name] - want) < 1e-12, $"{name}: accumulated {m[name]:R}, full batch {want:R}");
            }
        }
    }
}

/// <summary>Issue #24, round two: the data path and the helpers under bad input.</summary>
public class HardeningRoundTwoDataTests
{
    static readonly Alignment.Losses.Data.PreferenceExample Good = new(new[] { 1, 2 }, new[] { 3 }, new[] { 4, 5 });

    [Fact]
    public void The_collator_refuses_token_ids_it_would_drop_and_sizes_it_cannot_hold()
    {
        var collator = new Alignment.Losses.Data.PreferenceCollator();
        var e = Assert.Throws<ArgumentException>(() => collator.Collate(new[] { Good, new Alignment.Losses.Data.PreferenceExample(new[] { 1 }, new[] { 7, -100 }, new[] { 4 }) }));
        Assert.Contains("example 1", e.Message);
        Assert.Contains("chosen completion", e.Message);
        var own = new Alignment.Losses.Data.PreferenceCollator(new() { IgnoreIndex = 5 });
        Assert.Contains("IgnoreIndex", Assert.Throws<ArgumentException>(() => own.Collate(new[] { Good })).Message);
        Assert.Equal("PadTokenId", Assert.Throws<ArgumentOutOfRangeException>(() => new Alignment.Losses.Data.PreferenceCollatorOptions { PadTokenId = -1 }).ParamName);
        var huge = new Alignment.Losses.Data.PreferenceCollator(new() { PadToMultipleOf = int.MaxValue });
        Assert.Equal("PadToMultipleOf", Assert.Throws<ArgumentException>(() => huge.Collate(new[] { Good })).ParamName);
        Assert.Equal("PadToMultipleOf", Assert.Throws<ArgumentException>(() => huge.CollatePacked(new[] { Good })).ParamName);
    }

    [Fact]
    public void Kto_refuses_two_reference_points_and_balance_advice_names_the_bad_count()
    {
        using var scope = NewDisposeScope();
        var policy = PreferenceLogps.Unpaired(tensor(new[] { -3.0 }), tensor(new[] { -4.0 }));
        var reference = PreferenceLogps.Unpaired(tensor(new[] { -3.5 }), tensor(new[] { -3.5 }));
        var both = new PreferenceBatch(policy, reference) { KlDivergence = zeros(1, dtype: ScalarType.Float64), Mismatched = new MismatchedLogps(tensor(new[] { -5.0 }), tensor(new[] { -5.5 })) };
        Assert.Equal("batch.KlDivergence", Assert.Throws<ArgumentException>(() => new KtoLoss().Compute(both)).ParamName);
        Assert.Equal("undesirable", Assert.Throws<ArgumentOutOfRangeException>(() => KtoLoss.BalanceAdvice(5, -1)).ParamName);
        Assert.Equal("desirable", Assert.Throws<ArgumentOutOfRangeException>(() => KtoLoss.BalanceAdvice(-5, 1)).ParamName);
    }

    [Fact]
    public void Token_kl_refuses_a_negative_mask()
    {
        using var scope = NewDisposeScope();
        var logits = randn(1, 3, 4);
        var e = Assert.Throws<ArgumentException>(() => TokenKl.Compute(logits, randn(1, 3, 4), tensor(new long[] { 1, -1, 0 }).reshape(1, 3)));
        Assert.Equal("mask", e.ParamName);
    }

    [Fact]
    public void The_console_sink_counts_hours_past_a_day_and_every_sink_gets_a_row_when_one_throws()
    {
        Assert.Equal("49:05:12", Alignment.Losses.Metrics.ConsoleMetricsSink.Duration(49 * 3600 + 5 * 60 + 12));
        Assert.Equal("00:00:07", Alignment.Losses.Metrics.ConsoleMetricsSink.Duration(7.2));
        Assert.EndsWith(" h", Alignment.Losses.Metrics.ConsoleMetricsSink.Duration(1e300));
        var after = new StringWriter();
        using var sinks = new Alignment.Losses.Metrics.MetricsSinks(new Throwing(), new Alignment.Losses.Metrics.ConsoleMetricsSink(after));
        Assert.Throws<IOException>(() => sinks.Write(3, new Dictionary<string, double> { ["loss"] = 0.5 }));
        Assert.Contains("step 3 | loss 0.5", after.ToString());
    }

    sealed class Throwing : Alignment.Losses.Metrics.IMetricsSink
    {
        public void Write(long step, IReadOnlyDictionary<string, double> metrics) => throw new IOException("disk full");
        public void Dispose() { }
    }
}

public class ReferenceCacheRoundTwoTests
{
    static readonly Alignment.Losses.Data.PreferenceExample Good = new(new[] { 1, 2 }, new[] { 3 }, new[] { 4, 5 });

    [Fact]
    public void An_unwritable_cache_path_fails_before_the_reference_pass_and_stale_temporaries_are_removed()
    {
        var dir = Directory.CreateTempSubdirectory("cache-round-two-");
        try
        {
            var blocker = Path.Combine(dir.FullName, "a-file");
            File.WriteAllText(blocker, "not a folder");
            int calls = 0;
            SequenceLogProbsResult Reference(Alignment.Losses.Data.CollatedPreferences b)
            {
                calls++;
                return SequenceLogProbs.Compute(zeros(b.InputIds.shape[0], b.InputIds.shape[1], 6), b.Labels, null, LabelAlignment.ShiftByOne);
            }
            var collator = new Alignment.Losses.Data.PreferenceCollator();
            var options = new Alignment.Losses.Data.ReferenceCacheOptions { Progress = null };
            var e = Assert.Throws<ArgumentException>(() => Alignment.Losses.Data.ReferenceLogProbCache.Build(new[] { Good }, collator, Reference, Path.Combine(blocker, "ref.cache"), options));
            Assert.Equal("path", e.ParamName);
            Assert.Equal(0, calls);                                     // no reference work was done
            // a temporary left by a process that no longer exists is removed by the next build; the build leaves none
            var path = Path.Combine(dir.FullName, "ref.cache");
            var stale = path + ".tmp-" + int.MaxValue;
            File.WriteAllText(stale, "partial");
            Alignment.Losses.Data.ReferenceLogProbCache.Build(new[] { Good }, collator, Reference, path, options);
            Assert.Equal(1, calls);
            Assert.False(File.Exists(stale));
            Assert.Equal(new[] { path }, Directory.GetFiles(dir.FullName, "ref.cache*"));
        }
        finally { dir.Delete(recursive: true); }
    }
}

public class CsvSinkRoundTwoTests
{
    [Fact]
    public void The_csv_sink_streams_a_new_column_into_earlier_rows_and_recreates_a_deleted_file_with_its_header()
    {
        var dir = Directory.CreateTempSubdirectory("csv-round-two-");
        try
        {
            var path = Path.Combine(dir.FullName, "m.csv");
            using var sink = new Alignment.Losses.Metrics.CsvMetricsSink(path);
            sink.Write(1, new Dictionary<string, double> { ["loss"] = 0.5 });
            sink.Write(2, new Dictionary<string, double> { ["loss"] = 0.25, ["eval_loss"] = 0.75 });
            Assert.Equal(new[] { "step,loss,eval_loss", "1,0.5,", "2,0.25,0.75" }, File.ReadAllLines(path));
            File.Delete(path);
            sink.Write(3, new Dictionary<string, double> { ["loss"] = 0.125 });
            Assert.Equal(new[] { "step,loss,eval_loss", "3,0.125," }, File.ReadAllLines(path));
        }
        finally { dir.Delete(recursive: true); }
    }
}

public class BoundariesRoundTwoTests
{
    [Fact]
    public void Boundaries_refuse_lengths_they_cannot_serve_with_named_errors()
    {
        var b = SequenceBoundaries.FromLengths(new long[] { 2, 4 });
        Assert.Equal("total", Assert.Throws<ArgumentOutOfRangeException>(() => b.PositionIds(-1)).ParamName);
        Assert.Equal("total", Assert.Throws<ArgumentOutOfRangeException>(() => b.CausalAttentionMask(3)).ParamName);
        Assert.Equal("dtype", Assert.Throws<ArgumentException>(() => b.CumulativeLengthsTensor(dtype: ScalarType.Float32)).ParamName);
        // 2^31 + 2 tokens do not fit Int32 offsets
        var huge = SequenceBoundaries.FromLengths(new long[] { int.MaxValue, 3 });
        Assert.Equal("dtype", Assert.Throws<ArgumentException>(() => huge.CumulativeLengthsTensor()).ParamName);
        using var wide = huge.CumulativeLengthsTensor(dtype: ScalarType.Int64);
        Assert.Equal((long)int.MaxValue + 3, wide[2].item<long>());
        // 200,000 tokens: a [200000, 200000] mask (40 GB, about 160 GB of work) is refused before allocating on this machine
        var big = SequenceBoundaries.FromLengths(new long[] { 200_000 });
        Assert.Throws<InsufficientMemoryException>(() => big.CausalAttentionMask());
    }
}

public class ReferenceCacheLoadRoundTwoTests
{
    static readonly Alignment.Losses.Data.PreferenceExample Good = new(new[] { 1, 2 }, new[] { 3 }, new[] { 4, 5 });

    /// <summary>A cache of one example, with its first entry's four doubles and the count rewritten and the checksum renewed.</summary>
    static string Tampered(string dir, Action<byte[], int, int> edit)
    {
        var path = Path.Combine(dir, Guid.NewGuid().ToString("N") + ".cache");
        Alignment.Losses.Data.ReferenceLogProbCache.Build(new[] { Good }, new Alignment.Losses.Data.PreferenceCollator(),
            b => SequenceLogProbs.Compute(zeros(b.InputIds.shape[0], b.InputIds.shape[1], 6), b.Labels, null, LabelAlignment.ShiftByOne),
            path, new Alignment.Losses.Data.ReferenceCacheOptions { Progress = null });
        var bytes = File.ReadAllBytes(path);
        int descriptionLength = BitConverter.ToInt32(bytes, 12);
        int countAt = 16 + descriptionLength, entryAt = countAt + 8 + 16;
        edit(bytes, countAt, entryAt);
        var body = bytes.AsSpan(0, bytes.Length - 32);
        System.Security.Cryptography.SHA256.HashData(body).CopyTo(bytes.AsSpan(bytes.Length - 32));
        File.WriteAllBytes(path, bytes);
        return path;
    }

    [Fact]
    public void Load_refuses_what_build_would_refuse_and_names_the_file_and_lookup_refuses_what_its_dtype_cannot_hold()
    {
        var dir = Directory.CreateTempSubdirectory("cache-load-").FullName;
        try
        {
            void Refused(Action<byte[], int, int> edit, string because)
            {
                var path = Tampered(dir, edit);
                var e = Assert.Throws<InvalidDataException>(() => Alignment.Losses.Data.ReferenceLogProbCache.Load(path));
                Assert.Contains(path, e.Message);
                Assert.Contains(because, e.Message);
            }
            Refused((b, _, at) => BitConverter.GetBytes(double.NaN).CopyTo(b, at), "holds values no build writes");
            Refused((b, _, at) => BitConverter.GetBytes(-2.0).CopyTo(b, at + 16), "holds values no build writes");      // a negative token count
            Refused((b, count, _) => BitConverter.GetBytes(long.MaxValue).CopyTo(b, count), "do not fit the file");
            // a log-prob beyond float16: refused for a Float16 lookup, fine as Float32
            var big = Tampered(dir, (b, _, at) => BitConverter.GetBytes(-70_000.0).CopyTo(b, at));
            var cache = Alignment.Losses.Data.ReferenceLogProbCache.Load(big);
            using var scope = NewDisposeScope();
            var batch = new Alignment.Losses.Data.PreferenceCollator().Collate(new[] { Good });
            Assert.Equal("dtype", Assert.Throws<ArgumentException>(() => cache.Lookup(batch, ScalarType.Float16)).ParamName);
            Assert.Equal("dtype", Assert.Throws<ArgumentException>(() => cache.Lookup(batch, ScalarType.Int64)).ParamName);
            Assert.Equal(-70_000.0, cache.Lookup(batch).Chosen.ToDouble());
            batch.Dispose();
            Assert.Throws<ObjectDisposedException>(() => cache.Lookup(batch));
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    [Fact]
    public void A_bco_baseline_beyond_the_inputs_range_is_named()
    {
        using var scope = NewDisposeScope();
        var loss = new BcoLoss(BcoRewardBaseline.FromJson("{\"mean\": 1e300, \"count\": 5}"));
        var policy = PreferenceLogps.Unpaired(tensor(new[] { -3f }), tensor(new[] { -4f }));
        Assert.Equal("baseline", Assert.Throws<ArgumentException>(() => loss.Compute(new PreferenceBatch(policy, policy))).ParamName);
    }
}

public class MeanPoolingRoundTwoTests
{
    [Fact]
    public void Mean_pooling_refuses_a_nan_mask_and_blames_an_overflow_not_the_hidden_states()
    {
        using var scope = NewDisposeScope();
        var hidden = ones(2, 3, 4);
        var nanMask = tensor(new[] { 1f, float.NaN, 0, 1, 1, 0 }).reshape(2, 3);
        Assert.Equal("promptMask", Assert.Throws<ArgumentException>(() => PromptEmbeddings.MeanPooled(hidden, nanMask)).ParamName);
        var huge = full(2, 3, 4, 3e38f);                                   // finite, but two of them sum past float32
        var e = Assert.Throws<ArithmeticException>(() => PromptEmbeddings.MeanPooled(huge, ones(2, 3)));
        Assert.Contains("overflowed", e.Message);
    }
}

public class RpoMessagesRoundTwoTests
{
    sealed class InfiniteWeighting : IRpoWeighting
    {
        public Tensor ComputeWeights(Tensor chosen, Tensor rejected, ScalarType dtype) => full(chosen.shape[0], rejected.shape[0], double.PositiveInfinity, dtype: dtype);
    }

    [Fact]
    public void Rpo_stays_finite_with_huge_embeddings_and_names_bad_ones_under_the_callers_parameter_name()
    {
        using var scope = NewDisposeScope();
        var policy = new PreferenceLogps(tensor(new[] { -3.0, -4 }), tensor(new[] { -5.0, -6 }));
        // 1e200 embeddings (float64): the cosine is scale-free, so the loss stays finite rather than overflowing
        var huge = tensor(new[] { 1e200, 1, 1, 1e200 }).reshape(2, 2);
        using (var r = RpoLoss.Compute(policy, null, huge)) Assert.True(double.IsFinite(r.Loss.ToDouble()));
        // a NaN is named under the caller's parameter
        Assert.Equal("promptEmbeddings", Assert.Throws<ArgumentException>(() => RpoLoss.Compute(policy, null, full(2, 2, double.NaN))).ParamName);
        // a custom weighting that returns +Inf is named, not reported as a generic overflow
        var e = Assert.Throws<InvalidOperationException>(() => RpoLoss.Compute(policy, null, randn(2, 3, dtype: ScalarType.Float64), new RpoOptions { Weighting = new InfiniteWeighting() }));
        Assert.Contains(nameof(InfiniteWeighting), e.Message);
        Assert.Contains("infinite", e.Message);
        Assert.Equal("promptEmbeddings", Assert.Throws<ArgumentException>(() => RpoLoss.Compute(policy, null, randn(2))).ParamName);
    }
}

public class TrlFactoriesRoundTwoTests
{
    [Fact]
    public void Trl_factories_honour_or_refuse_every_field_by_its_trl_name()
    {
        // CreateForTrainer with a DPOTrainer name keeps label_smoothing (robust with 0.2 was plain DPO)
        var robust = Assert.IsType<RobustDpoLoss>(TrlLosses.CreateForTrainer("robust", new TrlTrainerConfig { LabelSmoothing = 0.2, Beta = 0.3 }));
        Assert.Equal((0.2, 0.3), (robust.Options.LabelSmoothing, robust.Options.Beta));
        var exo = Assert.IsType<ExoPairLoss>(TrlLosses.CreateForTrainer("exo_pair", new TrlTrainerConfig { LabelSmoothing = 0.1 }));
        Assert.Equal(0.1, exo.Options.LabelSmoothing);
        // bad loss_weights are named as TRL names them; ld_alpha is checked by Create itself
        Assert.Equal("loss_weights[1]", Assert.ThrowsAny<ArgumentException>(() => TrlLosses.Create(new TrlDpoConfig { LossType = new[] { "sigmoid", "sft" }, LossWeights = new[] { 1.0, -2 } })).ParamName);
        Assert.Equal("ld_alpha", Assert.ThrowsAny<ArgumentException>(() => TrlLosses.Create(new TrlDpoConfig { LdAlpha = 1.5 })).ParamName);
    }
}
