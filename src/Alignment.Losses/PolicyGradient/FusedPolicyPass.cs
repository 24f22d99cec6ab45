using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// The fused CPU path of a policy-gradient loss whose policy term is a <see cref="TokenLink"/>: one managed pass over the
/// rows of [N, T] reads every input once (mask, l, l_old, l_ref, l_beh, A, H) and computes the clamped log-ratio, the
/// ratio, the policy term and its derivative, the top-entropy mask, the rollout weights, the KL term, the entropy bonus,
/// every metric of the op-by-op path and every value check. The per-token loss then leaves through a surrogate,
/// L + (l - sg(l)) * dL/dl, whose value is the per-token loss and whose gradient is the saved derivative (no second
/// derivative); the per-sequence means and the reduction are native ops on it: a GRPO call with a KL term creates 10
/// tensor handles instead of the op-by-op path's 164.
/// </summary>
/// <remarks>
/// Rows run in parallel (<see cref="LogSoftmaxRows.Parallel"/>); every row's sums are taken in a fixed order and the
/// per-row results are combined in row order, so the result does not depend on the thread count. Any failed check (a
/// NaN/Inf input at a valid token, a positive log-prob, an overflow, a batch without a valid token) returns null: the
/// op-by-op path then runs and raises its error. NaN/Inf where no token counts is ignored, as op by op.
/// </remarks>
internal static unsafe class FusedPolicyPass
{
    /// <summary>Counts the calls that returned a fused result on this thread (for tests that prove which path ran).</summary>
    [ThreadStatic] internal static int CompletedOnThisThread;

    /// <summary>Whether the batch can take the fused path: CPU, padded [N, T].</summary>
    internal static bool Applies(TokenBatch batch)
    {
        if (batch.Boundaries is not null || batch.ScoredSegments is not null || batch.LogProbs.device.type != DeviceType.CPU) return false;
        return batch.LogProbs.numel() <= int.MaxValue / 2;
    }

    /// <summary>What a call needs besides the batch: the loss's term, options and reduction.</summary>
    internal sealed record Setup(TokenLink Link, ImportanceRatio Ratio, PolicyGradientOptions Options, TokenReduction Reduction, string Name);

    /// <summary>The loss through the fused pass, or null when a check fails (the op-by-op path then runs and names the problem).</summary>
    internal static TokenLossResult? TryCompute(TokenBatch batch, Setup setup)
    {
        using var scope = NewDisposeScope();
        var options = setup.Options;
        var l = batch.LogProbs;
        int n = (int)l.shape[0], t = (int)l.shape[1];
        var dtype = Numerics.DTypeFor(l, batch.OldLogProbs, batch.ReferenceLogProbs, batch.BehaviourLogProbs);
        bool grad = l.requires_grad;
        var kl = options.Kl is { } k && batch.ReferenceLogProbs is not null ? k : null;
        var correction = options.RolloutCorrection;
        var entropy = batch.Entropy;
        bool bonus = options.EntropyCoefficient != 0 && entropy is not null;
        bool entropyGrad = bonus && entropy!.requires_grad;

        // the inputs' memory, each a contiguous tensor of the compute dtype (converted once otherwise); the mask as bool,
        // mask != 0 in its own dtype (a float64 mask of 1e-50 counts, as op by op), a floating one checked finite first
        nint Memory(Tensor x) => (nint)TensorMemory.Address(x.dtype == dtype && x.is_contiguous() ? x : x.detach().to_type(dtype).contiguous());
        nint Optional(Tensor? x) => x is null ? 0 : Memory(x);
        var mask = batch.Mask;
        if (mask.is_floating_point() && !isfinite(mask).all().item<bool>()) return null;     // op by op names it
        nint maskMemory = (nint)TensorMemory.Address(mask.dtype == ScalarType.Bool && mask.is_contiguous() ? mask : mask.ne(0).contiguous());

        double? threshold = null;
        if (options.TopEntropyQuantile < 1 && entropy is not null)
        {
            threshold = batch.Window?.EntropyThreshold ?? QuantileThreshold(batch, entropy, dtype, options.TopEntropyQuantile);
            if (threshold is null) return null;                   // no valid token: the op-by-op path handles it
        }

        var outLoss = empty(new long[] { n, t }, dtype: dtype);
        var outSlope = grad ? empty(new long[] { n, t }, dtype: dtype) : null;
        var outEntropySlope = entropyGrad ? empty(new long[] { n, t }, dtype: dtype) : null;
        var link = setup.Link;
        bool sequenceLevel = setup.Ratio is ImportanceRatio.SequenceMean or ImportanceRatio.SequenceSum;
        bool sequenceGradient = grad && link.UsesRatio && link.DifferentiatesRatio && sequenceLevel;
        var outSequenceSlope = sequenceGradient ? empty(new long[] { n, t }, dtype: dtype) : null;
        var outSequenceWeight = sequenceGradient ? empty(new long[] { n, t }, dtype: dtype) : null;
        bool asDouble = dtype == ScalarType.Float64;
        double limit = asDouble ? double.MaxValue : float.MaxValue;
        var stats = new PolicyRows.RowStats(n);
        var job = new PolicyRows
        {
            Length = t, Double = asDouble, Mask = maskMemory, LogProbs = Memory(l), Old = Optional(batch.OldLogProbs),
            Reference = kl is null ? 0 : Memory(batch.ReferenceLogProbs!), Behaviour = correction is null ? 0 : Memory(batch.BehaviourLogProbs!),
            Entropy = Optional(entropy), Advantages = Memory(batch.Advantages!), PerSequenceAdvantages = batch.Advantages!.dim() == 1,
            Ratio = setup.Ratio, UsesRatio = link.UsesRatio, Clamp = options.LogRatioClamp ?? double.PositiveInfinity, Kl = kl, Correction = correction,
            Threshold = threshold, Bonus = bonus, EntropyGrad = entropyGrad, EntropyCoefficient = options.EntropyCoefficient,
            CheckLogProbs = options.CheckFinite, Flags = link.Flags, OutLoss = (nint)TensorMemory.Address(outLoss),
            OutSlope = outSlope is null ? 0 : (nint)TensorMemory.Address(outSlope),
            OutEntropySlope = outEntropySlope is null ? 0 : (nint)TensorMemory.Address(outEntropySlope), Stats = stats,
            SequenceGradient = sequenceGradient,
            OutSequenceSlope = outSequenceSlope is null ? 0 : (nint)TensorMemory.Address(outSequenceSlope),
            OutSequenceWeight = outSequenceWeight is null ? 0 : (nint)TensorMemory.Address(outSequenceWeight),
        };
        LogSoftmaxRows.Parallel(n, (long)t * 16, (from, to) => link.Rows(job, from, to));

        // the rows combined in order
        bool padding = false;
        double tokens = 0, nonEmpty = 0, lossSum = 0, sequenceMeans = 0, klSum = 0, entropySum = 0, bonusSum = 0, wSum = 0;
        double wMin = double.PositiveInfinity, wMax = double.NegativeInfinity;
        var count = new double[3];
        var minFraction = new[] { double.PositiveInfinity, double.PositiveInfinity, double.PositiveInfinity };
        var maxFraction = new[] { double.NegativeInfinity, double.NegativeInfinity, double.NegativeInfinity };
        var sequenceFraction = new double[3];
        for (int i = 0; i < n; i++)
        {
            if (stats.Bad[i] || !(stats.Magnitude[i] <= limit)) return null;
            padding |= stats.Padding[i];
            double ni = stats.Tokens[i];
            tokens += ni;
            klSum += stats.Kl[i];
            entropySum += stats.Entropy[i];
            bonusSum += stats.Bonus[i];
            wSum += stats.WeightSum[i];
            lossSum += stats.Loss[i];
            if (ni == 0) continue;
            nonEmpty++;
            sequenceMeans += stats.Loss[i] / ni;
            wMin = Math.Min(wMin, stats.WeightMin[i]);
            wMax = Math.Max(wMax, stats.WeightMax[i]);
            for (int f = 0; f < 3; f++)
            {
                count[f] += stats.Flags[f][i];
                minFraction[f] = Math.Min(minFraction[f], stats.Flags[f][i] / ni);
                sequenceFraction[f] += stats.Flags[f][i] / ni;
                maxFraction[f] = Math.Max(maxFraction[f], stats.Flags[f][i] / ni);
            }
        }
        if (tokens == 0) return null;
        double perToken = 1 / Math.Max(1, tokens);
        var metrics = new List<(string Name, double Value)>();
        for (int f = 0; f < 3; f++) sequenceFraction[f] /= Math.Max(1, nonEmpty);
        link.AddMetrics(new FlagTotals(tokens, count, minFraction, maxFraction, sequenceFraction, sequenceLevel), metrics);
        if (correction is not null)
        {
            metrics.Add((MetricNames.ImportanceSamplingRatioMin, wMin));
            metrics.Add((MetricNames.ImportanceSamplingRatioMean, wSum * perToken));
            metrics.Add((MetricNames.ImportanceSamplingRatioMax, wMax));
        }
        if (kl is not null) metrics.Add((MetricNames.Kl, klSum * perToken));
        if (entropy is not null) metrics.Add((MetricNames.Entropy, entropySum * perToken));

        // the reduction's factor on sum(L) (on the sum of the sequence means for the sequence mean of token means)
        var reduction = setup.Reduction;
        double scale = reduction.Scale(tokens, nonEmpty, n, batch.Window);
        double lossValue = (reduction.Aggregation == TokenAggregation.SequenceMeanTokenMean ? sequenceMeans : lossSum) * scale;
        double bonusScale = TokenReduction.TokenMean.Scale(tokens, nonEmpty, n, batch.Window), bonusValue = bonusSum * bonusScale;
        bool finite = Math.Abs(lossValue + bonusValue) <= limit;
        foreach (var (_, value) in metrics) finite &= Math.Abs(value) <= limit;
        if (!finite) return null;

        // the result: the surrogate and the native reductions on it
        Tensor In(Tensor x) => x.dtype == dtype ? x : x.to_type(dtype);
        // x - sg(x): 0 in value, the identity in gradient; NaN where a padding position holds NaN/Inf, set to 0 then
        Tensor Tangent(Tensor x)
        {
            var y = In(x);
            var z = y - y.detach();
            return padding ? z.nan_to_num(0) : z;
        }
        var perTokenLoss = outLoss;
        if (grad)
        {
            var z = Tangent(l);
            perTokenLoss = outLoss.addcmul_(z, outSlope!, 1);      // in place: outLoss is ours and constant
            // a sequence ratio: + dL_t/dlog s_i * sum_t' (l_t' - sg(l_t')) dlog s_i/dl_t', the rank-one coupling of a sequence's tokens
            if (sequenceGradient) perTokenLoss = perTokenLoss.addcmul_(outSequenceSlope!, z.mul(outSequenceWeight!).sum(1, keepdim: true), 1);
        }
        var counts = new double[n];
        for (int i = 0; i < n; i++) counts[i] = Math.Max(1, stats.Tokens[i]);
        var perSequence = perTokenLoss.sum(1).div_(TensorMemory.FromValues(counts, dtype));
        var loss = (reduction.Aggregation == TokenAggregation.SequenceMeanTokenMean ? perSequence.sum() : perTokenLoss.sum()).mul_(scale);
        if (bonus)
        {
            loss = loss.add_(bonusValue);
            if (entropyGrad)
            {
                loss = loss + Tangent(entropy!).mul_(outEntropySlope!).sum().mul_(bonusScale);
            }
        }
        var metricValues = TensorMemory.FromValues(metrics.Select(m => m.Value).ToArray(), dtype);
        var result = new TokenLossResult(loss, perTokenLoss, perSequence, metricValues, metrics.Select(m => m.Name).ToArray(), setup.Name,
            tensor(tokens, dtype: dtype));
        result.MoveToOuter(scope);
        CompletedOnThisThread++;
        return result;
    }

    /// <summary>The op-by-op path's threshold (the same native ops, so the same value): null without a valid token.</summary>
    private static double? QuantileThreshold(TokenBatch batch, Tensor entropy, ScalarType dtype, double quantile)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var values = Numerics.As(entropy.detach(), dtype).masked_select(batch.Mask != 0);
        if (values.shape[0] == 0) return null;
        return Numerics.QuantileThreshold(values, quantile).to_type(ScalarType.Float64).item<double>();
    }
}
