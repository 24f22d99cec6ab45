using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Two-phase batch statistics over an optimiser step's window (spec §14): local partial statistics, combined across
/// ranks through an <see cref="ICollectives"/>, then applied, so that a batch split over ranks and gradient-accumulation
/// steps gives the objective of the whole batch.
/// </summary>
public static partial class GlobalBatch
{
    /// <summary>
    /// The window's counts before its micro-batches run (TRL's num_items_in_batch, over the right window): the valid tokens
    /// and sequences of every micro-batch of every rank (one all-reduce of two numbers), this rank's number of
    /// micro-batches, and the data-parallel size.
    /// </summary>
    /// <param name="microBatches">This rank's micro-batches of the window (their masks and layouts; nothing is computed).</param>
    /// <param name="collectives">The ranks; null: this process alone.</param>
    /// <param name="countEmptySequences">Count sequences without a valid token too (TRL's mean over rows; the factory of a
    /// reduction with <see cref="TokenReduction.CountEmptySequences"/> should match).</param>
    /// <param name="gradientsAveraged">True (default) when the engine averages gradients over ranks (DDP,
    /// <see cref="Collectives.AverageGradients"/>): <see cref="TokenWindow.DataParallelSize"/> is then the world size; false
    /// when it sums them (1).</param>
    /// <exception cref="ArgumentException">No micro-batch, or the window has no valid token on any rank.</exception>
    public static TokenWindow CountWindow(IEnumerable<TokenBatch> microBatches, ICollectives? collectives = null, bool countEmptySequences = false,
        bool gradientsAveraged = true)
    {
        ArgumentNullException.ThrowIfNull(microBatches);
        var list = microBatches.ToList();
        if (list.Count == 0) throw new ArgumentException("A window has at least one micro-batch on each rank.", nameof(microBatches));
        double tokens = 0, sequences = 0;
        using (var scope = NewDisposeScope())
        using (no_grad())
        {
            foreach (var (b, i) in list.Select((b, i) => (b, i)))
            {
                if (b is null) throw new ArgumentException($"microBatches[{i}] is null.", nameof(microBatches));
                Guard.Usable(b.Mask, $"microBatches[{i}].Mask");
                Guard.Usable(b.LogProbs, $"microBatches[{i}].LogProbs");
                var valid = (b.Mask != 0).to_type(ScalarType.Float64);
                var perSequence = b.SegmentsFor(b.LogProbs).Reduce(valid);
                tokens += valid.sum().ToDouble();
                sequences += countEmptySequences ? perSequence.shape[0] : (perSequence > 0).sum().ToDouble();
            }
        }
        return Window(tokens, sequences, list.Count, collectives, gradientsAveraged);
    }

    /// <summary>The window's counts from padded masks [N, T] (nonzero where a token counts), one per micro-batch of this rank.</summary>
    /// <param name="masks">This rank's micro-batches' masks.</param>
    /// <param name="collectives">The ranks; null: this process alone.</param>
    /// <param name="countEmptySequences">Count rows without a valid token too.</param>
    /// <param name="gradientsAveraged">True (default) when the engine averages gradients over ranks.</param>
    public static TokenWindow CountWindow(IEnumerable<Tensor> masks, ICollectives? collectives = null, bool countEmptySequences = false,
        bool gradientsAveraged = true)
    {
        ArgumentNullException.ThrowIfNull(masks);
        return CountWindow(masks.Select(m => new TokenBatch(m, m)), collectives, countEmptySequences, gradientsAveraged);
    }

    /// <summary>
    /// The threshold of <see cref="PolicyGradientOptions.TopEntropyQuantile"/> over the whole data-parallel batch: the
    /// (1 - q) quantile (torch.quantile's linear interpolation) of the valid tokens' entropies of every given micro-batch
    /// of every rank, gathered (one all-gather of a float64 per valid token). Set it on the window
    /// (<c>window with { EntropyThreshold = t }</c>) of the micro-batches it was computed over. TRL gathers the current
    /// micro-batch's entropies across processes: pass each rank's current micro-batch for TRL's threshold, or the whole
    /// window's micro-batches for one threshold per optimiser step. Computed in the loss's compute dtype, so one rank
    /// alone gets exactly the loss's own threshold.
    /// </summary>
    /// <param name="collectives">The ranks; null: this process alone.</param>
    /// <param name="microBatches">This rank's micro-batches, each with <see cref="TokenBatch.Entropy"/>.</param>
    /// <param name="quantile">q in (0, 1], the loss's <see cref="PolicyGradientOptions.TopEntropyQuantile"/>.</param>
    /// <exception cref="ArgumentException">A micro-batch has no entropy, entropies are not finite at valid tokens, or no rank has a valid token.</exception>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="quantile"/> is not in (0, 1].</exception>
    public static double EntropyThreshold(ICollectives? collectives, IEnumerable<TokenBatch> microBatches, double quantile)
    {
        ArgumentNullException.ThrowIfNull(microBatches);
        if (!(quantile > 0 && quantile <= 1)) throw new ArgumentOutOfRangeException(nameof(quantile), quantile, "the quantile must be in (0, 1].");
        var c = collectives ?? Collectives.SingleProcess;
        var local = new List<double>();
        bool wide = false;
        Exception? failure = null;
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            foreach (var (b, i) in microBatches.Select((b, i) => (b, i)))
            {
                if (b is null) throw new ArgumentException($"microBatches[{i}] is null.", nameof(microBatches));
                if (b.Entropy is null) throw new ArgumentException($"microBatches[{i}].Entropy is required: the threshold is a quantile of the per-token entropies.", nameof(microBatches));
                Guard.Usable(b.Entropy, $"microBatches[{i}].Entropy");
                Guard.Usable(b.Mask, $"microBatches[{i}].Mask");
                if (!b.Entropy.shape.SequenceEqual(b.Mask.shape))
                    throw new ArgumentException($"microBatches[{i}].Entropy has shape {Guard.Shape(b.Entropy)} but its mask has {Guard.Shape(b.Mask)}.", nameof(microBatches));
                wide |= Numerics.DTypeFor(b.LogProbs, b.OldLogProbs, b.ReferenceLogProbs, b.BehaviourLogProbs) == ScalarType.Float64;
                var values = b.Entropy.detach().masked_select(b.Mask != 0).to(ScalarType.Float64, CPU).contiguous();
                if (values.numel() > 0) local.AddRange(values.data<double>().ToArray());
            }
            if (local.Any(v => !double.IsFinite(v))) throw new ArgumentException("The entropies hold NaN or Inf at valid tokens.", nameof(microBatches));
        }
        catch (Exception e)
        {
            failure = e;
        }
        // a flag first (0: this rank failed; 2: float64 compute), so that a failing rank never leaves the others waiting
        var gathered = c.AllGather(new[] { failure is null ? (wide ? 2.0 : 1.0) : 0.0 }.Concat(failure is null ? local : Enumerable.Empty<double>()).ToArray());
        if (failure is not null) throw failure;
        int failed = Array.FindIndex(gathered, g => g[0] == 0);
        if (failed >= 0) throw new InvalidOperationException($"rank {failed} of {c.WorldSize} could not read its entropies (its own error says why).");
        var all = gathered.SelectMany(g => g.Skip(1)).ToArray();
        if (all.Length == 0) throw new ArgumentException($"No valid token on any of the {c.WorldSize} rank(s): the entropy quantile is undefined.", nameof(microBatches));
        var dtype = gathered.Any(g => g[0] == 2) ? ScalarType.Float64 : ScalarType.Float32;
        using var threshold = NewDisposeScope();
        using var t = tensor(all, dtype: ScalarType.Float64).to_type(dtype);
        return Numerics.QuantileThreshold(t, quantile).ToDouble();
    }

    private static TokenWindow Window(double tokens, double sequences, int microBatches, ICollectives? collectives, bool gradientsAveraged)
    {
        var c = collectives ?? Collectives.SingleProcess;
        var sums = c.AllReduceSum(new[] { tokens, sequences });
        if (!(sums[0] > 0))
            throw new ArgumentException($"The window has no valid token on any of its {c.WorldSize} rank(s): there is nothing to train on.", "microBatches");
        return new TokenWindow
        {
            Tokens = sums[0],
            Sequences = Math.Max(1, sums[1]),
            DataParallelSize = gradientsAveraged ? c.WorldSize : 1,
            MicroBatches = microBatches,
        };
    }

    /// <summary>
    /// A group-relative advantage estimator over the whole data-parallel batch: every rank's rewards (and group ids) are
    /// gathered, <paramref name="estimator"/> runs on the global batch (so a group may span ranks, and batch-level scaling
    /// uses the global std), and this rank gets its own rows back. The metrics are the global batch's, identical on every
    /// rank. Exchanges two numbers per completion.
    /// </summary>
    /// <param name="collectives">The ranks.</param>
    /// <param name="rewards">This rank's rewards [n_r] (NaN = unscorable).</param>
    /// <param name="groups">Contiguous groups (each rank must hold whole groups: n_r a multiple of G) or ids that mean the same
    /// prompt on every rank (a prompt's uid), in which case groups may span ranks.</param>
    /// <param name="estimator">e.g. <c>(r, g) =&gt; Advantages.Grpo(r, g)</c>, run on the global rewards.</param>
    /// <exception cref="ArgumentException">The rewards are not [n] floating, or contiguous groups are cut by a rank.</exception>
    public static AdvantageResult Advantages(ICollectives collectives, Tensor rewards, GroupIds groups, Func<Tensor, GroupIds, AdvantageResult> estimator)
    {
        ArgumentNullException.ThrowIfNull(collectives);
        ArgumentNullException.ThrowIfNull(groups);
        ArgumentNullException.ThrowIfNull(estimator);
        Guard.Usable(rewards, nameof(rewards));
        if (rewards.dim() != 1) throw new ArgumentException($"rewards must be [n] (one per completion on this rank); got {Guard.Shape(rewards)}.", nameof(rewards));
        Guard.Floating(rewards, nameof(rewards));
        double[] local;
        using (NewDisposeScope()) local = rewards.detach().to(ScalarType.Float64, CPU).contiguous().data<double>().ToArray();
        var (offset, length, all) = Collectives.Concatenate(collectives.AllGather(local), collectives.Rank);
        GroupIds global;
        if (groups.Ids is { } ids)
        {
            if (ids.Length != local.Length)
                throw new ArgumentException($"the group ids hold {ids.Length} entries but rewards has {local.Length} on rank {collectives.Rank}.", nameof(groups));
            var (_, _, allIds) = Collectives.Concatenate(collectives.AllGather(ids.Select(i => (double)i).ToArray()), collectives.Rank);
            global = GroupIds.FromIds(allIds.Select(i => (long)i).ToArray());
        }
        else
        {
            var counts = collectives.AllGather(new[] { (double)local.Length });
            int bad = Array.FindIndex(counts, c => (long)c[0] % groups.Size != 0);
            if (bad >= 0)
                throw new ArgumentException(
                    $"rank {bad} holds {(long)counts[bad][0]} completions, not a multiple of the group size {groups.Size}: with contiguous groups each rank must hold whole groups " +
                    "(or pass GroupIds.FromIds with the prompts' ids, which may span ranks).", nameof(groups));
            global = groups;
        }
        using var scope = NewDisposeScope();
        var dtype = rewards.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        using var allRewards = tensor(all, dtype: ScalarType.Float64).to(dtype, rewards.device);
        using var whole = estimator(allRewards, global) ?? throw new InvalidOperationException("The estimator returned null.");
        var mine = whole.Values.narrow(0, offset, length).clone();
        var result = new AdvantageResult(mine, whole.Metrics);
        scope.MoveToOuter(mine);
        return result;
    }

    /// <summary>
    /// KTO's reference point over the whole window (spec §14): the global sum of the mismatched pairs' log-ratios
    /// l_pol - l_ref over their global count, from every micro-batch of every rank (one all-reduce of two numbers), not a
    /// mean of per-rank means. Pass it as <see cref="PreferenceBatch.KlDivergence"/> to every micro-batch's
    /// <see cref="KtoLoss"/>, which applies max(0, ·); weigh each micro-batch's loss by its share of the window's examples
    /// (<see cref="Metrics.MetricsAccumulator.Share"/>) so the sum is the window's mean.
    /// </summary>
    /// <param name="collectives">The ranks; null: this process alone.</param>
    /// <param name="mismatched">This rank's mismatched pairs of the window, one per micro-batch.</param>
    /// <returns>A 0-d float64 tensor (detached) on the first pair's device.</returns>
    /// <exception cref="ArgumentException">No pairs, mismatched lengths, or non-finite log-probs.</exception>
    public static Tensor KtoReferencePoint(ICollectives? collectives, IEnumerable<MismatchedLogps> mismatched)
    {
        ArgumentNullException.ThrowIfNull(mismatched);
        var list = mismatched.ToList();
        if (list.Count == 0) throw new ArgumentException("Give at least one micro-batch's mismatched pairs.", nameof(mismatched));
        double sum = 0, count = 0;
        using (var scope = NewDisposeScope())
        using (no_grad())
        {
            foreach (var (m, i) in list.Select((m, i) => (m, i)))
            {
                if (m is null) throw new ArgumentException($"mismatched[{i}] is null.", nameof(mismatched));
                Guard.Usable(m.Policy, $"mismatched[{i}].Policy");
                Guard.Usable(m.Reference, $"mismatched[{i}].Reference");
                Guard.SameLength(m.Policy, $"mismatched[{i}].Policy", m.Reference, $"mismatched[{i}].Reference");
                var ratio = m.Policy.detach().to_type(ScalarType.Float64) - m.Reference.detach().to_type(ScalarType.Float64).to(m.Policy.device);
                sum += ratio.sum().ToDouble();
                count += ratio.numel();
            }
        }
        if (!double.IsFinite(sum)) throw new ArgumentException("The mismatched pairs' log-probs hold NaN or Inf.", nameof(mismatched));
        var global = (collectives ?? Collectives.SingleProcess).AllReduceSum(new[] { sum, count });
        if (!(global[1] > 0)) throw new ArgumentException("No rank gave a mismatched pair: KTO's reference point is undefined.", nameof(mismatched));
        var z0 = tensor(global[0] / global[1], dtype: ScalarType.Float64, device: list[0].Policy.device);
        return z0;
    }

    /// <summary>
    /// Advances BCO's running reward mean once per optimiser step with the global batch's rewards: their sum and count
    /// over every rank (one all-reduce of two numbers), so the baseline is identical on every rank. Use it with
    /// <see cref="BcoRewardBaseline.Training"/> = false during the step's micro-batches (the loss then reads the
    /// baseline without updating it). The rewards are beta (l_pol - l_ref) of the step's chosen and rejected examples.
    /// </summary>
    /// <param name="collectives">The ranks; null: this process alone.</param>
    /// <param name="baseline">The baseline to advance (the same state on every rank).</param>
    /// <param name="rewards">This rank's rewards of the step (any shape; detached here).</param>
    /// <exception cref="ArgumentException">Non-finite rewards.</exception>
    public static void AdvanceBaseline(ICollectives? collectives, BcoRewardBaseline baseline, Tensor rewards)
    {
        ArgumentNullException.ThrowIfNull(baseline);
        Guard.Usable(rewards, nameof(rewards));
        Guard.Floating(rewards, nameof(rewards));
        double sum;
        using (var scope = NewDisposeScope())
        using (no_grad()) sum = rewards.detach().to_type(ScalarType.Float64).sum().ToDouble();
        if (!double.IsFinite(sum)) throw new ArgumentException("rewards hold NaN or Inf.", nameof(rewards));
        var global = (collectives ?? Collectives.SingleProcess).AllReduceSum(new[] { sum, (double)rewards.numel() });
        if (global[1] > 0) baseline.Update(global[0] / global[1], (long)global[1]);
    }
}
