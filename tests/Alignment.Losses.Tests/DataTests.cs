using Alignment.Losses;
using Alignment.Losses.Data;

namespace Alignment.Losses.Tests;

/// <summary>The preference collator (padded and packed), the on-disk reference cache, and mean-pooled prompt embeddings.</summary>
public class DataTests
{
    static PreferenceExample Ex(int[] p, int[] c, int[] r) => new(p, c, r);

    static long[] Row(Tensor t, int i) => t[i].to_type(ScalarType.Int64).data<long>().ToArray();

    [Fact]
    public void Padded_batch_stacks_chosen_then_rejected_with_masks_and_labels()
    {
        var collator = new PreferenceCollator(new PreferenceCollatorOptions { PadTokenId = 99 });
        using var b = collator.Collate(new[] { Ex(new[] { 1, 2 }, new[] { 3 }, new[] { 4, 5, 6 }), Ex(new[] { 7 }, new[] { 8, 9 }, new[] { 10 }) });
        Assert.Equal(new long[] { 4, 5 }, b.InputIds.shape);   // longest row: prompt 2 + rejected 3
        Assert.Equal(new long[] { 1, 2, 3, 99, 99 }, Row(b.InputIds, 0));
        Assert.Equal(new long[] { 7, 8, 9, 99, 99 }, Row(b.InputIds, 1));
        Assert.Equal(new long[] { 1, 2, 4, 5, 6 }, Row(b.InputIds, 2));
        Assert.Equal(new long[] { 7, 10, 99, 99, 99 }, Row(b.InputIds, 3));
        Assert.Equal(new long[] { 1, 1, 1, 0, 0 }, Row(b.AttentionMask, 0));
        Assert.Equal(new long[] { 0, 0, 1, 0, 0 }, Row(b.CompletionMask, 0));
        Assert.Equal(new long[] { 1, 1, 0, 0, 0 }, Row(b.PromptMask, 2));
        Assert.Equal(new long[] { -100, -100, 4, 5, 6 }, Row(b.Labels, 2));
        Assert.Equal(new long[] { -100, 8, 9, -100, -100 }, Row(b.Labels, 1));
        Assert.Equal(2, b.PairCount);
        Assert.False(b.IsPacked);
    }

    [Fact]
    public void Limits_truncate_prompts_by_mode_and_completions_from_the_end()
    {
        var example = Ex(new[] { 1, 2, 3, 4, 5 }, new[] { 10, 11, 12, 13 }, new[] { 20, 21 });
        var keepEnd = new PreferenceCollator(new PreferenceCollatorOptions { MaxPromptLength = 3, MaxCompletionLength = 3 }).Truncate(example);
        Assert.Equal(new[] { 3, 4, 5 }, keepEnd.Prompt);
        Assert.Equal(new[] { 10, 11, 12 }, keepEnd.Chosen);
        Assert.Equal(new[] { 20, 21 }, keepEnd.Rejected);
        var keepStart = new PreferenceCollator(new PreferenceCollatorOptions { MaxPromptLength = 3, PromptTruncation = PromptTruncation.KeepStart, MaxLength = 5 }).Truncate(example);
        Assert.Equal(new[] { 1, 2, 3 }, keepStart.Prompt);
        Assert.Equal(new[] { 10, 11 }, keepStart.Chosen);   // MaxLength 5 - prompt 3
        Assert.NotEqual(keepEnd.Key, keepStart.Key);
        Assert.Equal(keepEnd.Key, new PreferenceCollator(new PreferenceCollatorOptions { MaxPromptLength = 3, MaxCompletionLength = 3 }).Truncate(example).Key);
        using var padded = new PreferenceCollator(new PreferenceCollatorOptions { PadToMultipleOf = 8 }).Collate(new[] { example });
        Assert.Equal(16, padded.InputIds.shape[1]);   // 9 rounded up
    }

    [Fact]
    public void Empty_completions_and_impossible_limits_are_clear_errors()
    {
        var collator = new PreferenceCollator();
        var e = Assert.Throws<ArgumentException>(() => collator.Collate(new[] { Ex(new[] { 1 }, new[] { 2 }, new[] { 3 }), Ex(new[] { 1 }, new[] { 2 }, Array.Empty<int>()) }));
        Assert.Contains("example 1", e.Message);
        Assert.Contains("empty rejected", e.Message);
        e = Assert.Throws<ArgumentException>(() => collator.Collate(new[] { Ex(Array.Empty<int>(), new[] { 2 }, new[] { 3 }) }));
        Assert.Contains("empty prompt", e.Message);
        Assert.Throws<ArgumentException>(() => collator.Collate(Array.Empty<PreferenceExample>()));
        e = Assert.Throws<ArgumentException>(() => new PreferenceCollatorOptions { MaxPromptLength = 512, MaxLength = 512 });
        Assert.Equal("MaxLength", e.ParamName);
        Assert.Throws<ArgumentException>(() => new PreferenceCollatorOptions { MaxLength = 8, MaxPromptLength = 9 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new PreferenceCollatorOptions { PadToMultipleOf = 0 });
        e = Assert.Throws<ArgumentException>(() => new PreferenceCollator(new PreferenceCollatorOptions { MaxLength = 3 }).Collate(new[] { Ex(new[] { 1, 2, 3 }, new[] { 4 }, new[] { 5 }) }));
        Assert.Contains("no room for a completion", e.Message);
    }

    /// <summary>A toy causal "model": logits from the token and its position only (no attention), so packing cannot change them.</summary>
    static Tensor ToyLogits(Tensor ids, Tensor positions, Tensor tokenTable, Tensor positionTable) =>
        tokenTable.index_select(0, ids.flatten()).view(ids.shape[0], ids.shape[1], -1) + positionTable.index_select(0, positions.flatten()).view(ids.shape[0], ids.shape[1], -1);

    [Fact]
    public void Packed_batches_give_the_padded_batches_log_probs()
    {
        using var scope = NewDisposeScope();
        manual_seed(3);
        var examples = new[] { Ex(new[] { 1, 2, 3 }, new[] { 4, 5 }, new[] { 6 }), Ex(new[] { 7 }, new[] { 8, 9, 10, 11 }, new[] { 12, 13 }) };
        var collator = new PreferenceCollator(new PreferenceCollatorOptions { PadToMultipleOf = 4 });
        var tokens = randn(16, 16, dtype: ScalarType.Float64);
        var positions = randn(16, 16, dtype: ScalarType.Float64);
        using var padded = collator.Collate(examples);
        using var packed = collator.CollatePacked(examples);
        Assert.Equal(new long[] { 0, 5, 10, 14, 17 }, packed.Boundaries!.CumulativeLengths);
        Assert.Equal(20, packed.InputIds.shape[1]);   // 17 rounded up to 4
        Assert.Equal(new long[] { 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2 }, packed.PositionIds[0].narrow(0, 0, 17).data<long>().ToArray());
        using var a = SequenceLogProbs.Compute(ToyLogits(padded.InputIds, padded.PositionIds, tokens, positions), padded.Labels, null, LabelAlignment.ShiftByOne);
        using var b = SequenceLogProbs.Compute(ToyLogits(packed.InputIds, packed.PositionIds, tokens, positions), packed.Labels, null, packed.Boundaries, LabelAlignment.ShiftByOne);
        Assert.True(allclose(a.Sum, b.Sum, 1e-12, 1e-12));
        Assert.Equal(new[] { 2.0, 4.0, 1.0, 2.0 }, TensorUtil.Values(b.TokenCounts));
        // the first completion token is scored from the prompt's last token, in both layouts
        var logp = ToyLogits(padded.InputIds, padded.PositionIds, tokens, positions)[2].log_softmax(1);
        Assert.Equal(logp[2, 6].ToDouble(), TensorUtil.Values(a.Sum)[2], 12);
    }

    static int _referenceCalls;

    /// <summary>A deterministic stand-in for a reference model: log-probs from fixed tables.</summary>
    static SequenceLogProbsResult FakeReference(CollatedPreferences b)
    {
        _referenceCalls++;
        var tokens = arange(0, 32 * 32, dtype: ScalarType.Float64).view(32, 32).sin();
        var logits = tokens.index_select(0, b.InputIds.flatten()).view(b.InputIds.shape[0], b.InputIds.shape[1], 32);
        return SequenceLogProbs.Compute(logits, b.Labels, null, LabelAlignment.ShiftByOne);
    }

    static List<PreferenceExample> Dataset(int n) => Enumerable.Range(0, n).Select(i =>
        Ex(new[] { 1, 2 + i % 5 }, Enumerable.Range(3, 1 + i % 4).Select(t => (t * 7 + i) % 32).ToArray(), new[] { (i * 3) % 32, 30 })).ToList();

    [Fact]
    public void Reference_cache_is_reused_after_a_restart_and_equals_the_direct_computation()
    {
        using var scope = NewDisposeScope();
        var dir = Directory.CreateTempSubdirectory("alignment-cache-");
        try
        {
            var path = System.IO.Path.Combine(dir.FullName, "sub", "train.refcache");
            var data = Dataset(13);
            var collator = new PreferenceCollator(new PreferenceCollatorOptions { MaxLength = 6 });
            var progress = new StringWriter();
            var options = new ReferenceCacheOptions { BatchSize = 4, Description = "toy-ref v1", Progress = progress };
            _referenceCalls = 0;
            var built = ReferenceLogProbCache.LoadOrBuild(data, collator, FakeReference, path, options);
            Assert.Equal(4, _referenceCalls);
            Assert.Contains("13/13 examples", progress.ToString());
            // "restart": a new cache object from the file alone; the reference is not run again
            var loaded = ReferenceLogProbCache.LoadOrBuild(data, collator, FakeReference, path, options);
            Assert.Equal(4, _referenceCalls);
            Assert.Equal(13, loaded.Count);
            Assert.Equal("toy-ref v1", loaded.Description);
            using var batch = collator.Collate(data.Skip(5).Take(3).ToList());
            var fromCache = loaded.Lookup(batch, ScalarType.Float64);
            using var direct = FakeReference(batch);
            var d = direct.ToPreferenceLogps();
            Assert.True(allclose(fromCache.Chosen, d.Chosen, 0, 0));      // stored as float64: exact
            Assert.True(allclose(fromCache.Rejected, d.Rejected, 0, 0));
            Assert.Equal(TensorUtil.Values(d.ChosenTokenCounts!), TensorUtil.Values(fromCache.ChosenTokenCounts!));
            Assert.Equal(ScalarType.Float32, loaded.Lookup(batch).Chosen.dtype);
        }
        finally { dir.Delete(true); }
    }

    [Fact]
    public void A_cache_that_does_not_match_the_dataset_is_a_clear_error_never_wrong_rewards()
    {
        using var scope = NewDisposeScope();
        var dir = Directory.CreateTempSubdirectory("alignment-cache-");
        try
        {
            var path = System.IO.Path.Combine(dir.FullName, "train.refcache");
            var data = Dataset(6);
            var collator = new PreferenceCollator();
            var cache = ReferenceLogProbCache.Build(data, collator, FakeReference, path, new ReferenceCacheOptions { Progress = null, Description = "m1" });
            // an edited example
            var edited = data.ToList();
            edited[2] = edited[2] with { Chosen = new[] { 5, 6 } };
            using var batch = collator.Collate(edited.Take(4).ToList());
            var e = Assert.Throws<InvalidOperationException>(() => cache.Lookup(batch));
            Assert.Contains("Example 2", e.Message);
            Assert.Throws<InvalidOperationException>(() => cache.Verify(edited, collator));
            // other truncation limits change what the reference scored
            var shorter = new PreferenceCollator(new PreferenceCollatorOptions { MaxCompletionLength = 1 });
            Assert.Throws<InvalidOperationException>(() => cache.Verify(data, shorter));
            // another model's cache
            Assert.Throws<InvalidDataException>(() => ReferenceLogProbCache.Load(path, "m2"));
            // corruption and truncation
            var bytes = File.ReadAllBytes(path);
            bytes[30] ^= 0xff;
            File.WriteAllBytes(path, bytes);
            Assert.Contains("corrupted", Assert.Throws<InvalidDataException>(() => ReferenceLogProbCache.Load(path)).Message);
            File.WriteAllBytes(path, bytes.AsSpan(0, 20).ToArray());
            Assert.Throws<InvalidDataException>(() => ReferenceLogProbCache.Load(path));
            Assert.Throws<FileNotFoundException>(() => ReferenceLogProbCache.Load(System.IO.Path.Combine(dir.FullName, "none")));
        }
        finally { dir.Delete(true); }
    }

    [Fact]
    public void Mean_pooled_prompt_embeddings_average_the_prompt_tokens_only()
    {
        using var scope = NewDisposeScope();
        var hidden = randn(3, 4, 2, dtype: ScalarType.Float64).requires_grad_(true);
        using (no_grad()) hidden[1, 3] = full(2, double.NaN, dtype: ScalarType.Float64);   // padding: must not leak
        var mask = tensor(new[,] { { true, true, false, false }, { false, true, true, false }, { true, false, false, false } });
        var pooled = PromptEmbeddings.MeanPooled(hidden, mask);
        Assert.False(pooled.requires_grad);
        var h = hidden.detach();
        Assert.True(allclose(pooled[0], (h[0, 0] + h[0, 1]) / 2, 1e-15, 1e-15));
        Assert.True(allclose(pooled[1], (h[1, 1] + h[1, 2]) / 2, 1e-15, 1e-15));
        Assert.True(allclose(pooled[2], h[2, 0], 1e-15, 1e-15));
        var e = Assert.Throws<ArgumentException>(() => PromptEmbeddings.MeanPooled(hidden, zeros(3, 4, dtype: ScalarType.Bool)));
        Assert.Equal("promptMask", e.ParamName);
        // feeds RPO directly
        using var r = RpoLoss.Compute(new PreferenceLogps(-rand(3) * 9, -rand(3) * 9), new PreferenceLogps(-rand(3) * 9, -rand(3) * 9), PromptEmbeddings.MeanPooled(hidden, mask));
        Assert.True(double.IsFinite(r.Loss.ToDouble()));
    }
}
