using System.Runtime.Intrinsics;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// The fused CPU path of a policy-gradient loss whose policy term is a <see cref="TokenLink"/>: one managed pass over the
/// rows of [N, T] reads every input once (mask, l, l_old, l_ref, l_beh, A, H) and computes the clamped log-ratio, the
/// ratio, the policy term and its derivative, the top-entropy mask, the rollout weights, the KL term, the entropy bonus,
/// every metric of the op-by-op path and every value check. The per-token loss then leaves through a surrogate,
/// L + (l - sg(l)) * dL/dl, whose value is the per-token loss and whose gradient is the saved derivative (no second
/// derivative); the per-sequence means and the reduction are native ops on it, so the graph is a handful of nodes instead
/// of the op-by-op path's hundred and sixty.
/// </summary>
/// <remarks>
/// Rows run in parallel (<see cref="LogSoftmaxRows.Parallel"/>); every row's sums are taken in a fixed order and the
/// per-row results are combined in row order, so the result does not depend on the thread count. Any failed check (a
/// NaN/Inf input at a valid token, a positive log-prob, an overflow, a batch without a valid token) returns null: the
/// op-by-op path then runs and raises its error. NaN/Inf where no token counts is ignored, as op by op.
/// </remarks>
internal static unsafe class FusedPolicyPass
{
    private const double LogProbTolerance = 1e-3;

    /// <summary>Counts the calls that returned a fused result on this thread (for tests that prove which path ran).</summary>
    [ThreadStatic] internal static int CompletedOnThisThread;

    /// <summary>Whether the batch can take the fused path: CPU, padded [N, T], and a ratio the term can use.</summary>
    internal static bool Applies(TokenBatch batch, TokenLink link, ImportanceRatio ratio)
    {
        if (batch.Boundaries is not null || batch.ScoredSegments is not null || batch.LogProbs.device.type != DeviceType.CPU) return false;
        if (link.UsesRatio && link.DifferentiatesRatio && ratio is not (ImportanceRatio.Token or ImportanceRatio.SequenceMeanToken)) return false;
        return batch.LogProbs.numel() <= int.MaxValue / 2;
    }

    /// <summary>A contiguous float32 or float64 view of an input's memory (converted once when it is neither or strided).</summary>
    private readonly struct Source
    {
        internal readonly nint Address;
        internal readonly bool Double;

        internal Source(Tensor t)
        {
            if (!(t.dtype is ScalarType.Float32 or ScalarType.Float64) || !t.is_contiguous())
                t = t.detach().to_type(t.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32).contiguous();   // in the call's scope
            Address = (nint)TensorMemory.Address(t);
            Double = t.dtype == ScalarType.Float64;
        }

        /// <summary>Elements [offset, offset + n) widened into dst[0, n).</summary>
        internal void Read(long offset, int n, double* dst)
        {
            if (Double)
            {
                new ReadOnlySpan<double>((double*)Address + offset, n).CopyTo(new Span<double>(dst, n));
                return;
            }
            float* f = (float*)Address + offset;
            int j = 0;
            for (; j + 8 <= n; j += 8)
            {
                var (lower, upper) = Vector256.Widen(Vector256.Load(f + j));
                lower.Store(dst + j);
                upper.Store(dst + j + 4);
            }
            for (; j < n; j++) dst[j] = f[j];
        }
    }

    /// <summary>What a call needs besides the batch: the loss's term, options and reduction.</summary>
    internal sealed record Setup(TokenLink Link, ImportanceRatio Ratio, PolicyGradientOptions Options, TokenReduction Reduction, string Name);

    // the per-row results, combined in row order after the parallel pass
    private sealed class RowStats(int n)
    {
        internal readonly double[] Tokens = new double[n], Loss = new double[n], Kl = new double[n], Entropy = new double[n], Bonus = new double[n],
            WeightSum = new double[n], WeightMin = new double[n], WeightMax = new double[n];
        internal readonly double[][] Flags = { new double[n], new double[n], new double[n] };
        internal readonly bool[] Bad = new bool[n], Padding = new bool[n];
    }

    private const int Arrays = 16;   // scratch rows per worker

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

        // the inputs' memory (a mask that is not bool or floating becomes bool once)
        var mask = batch.Mask;
        bool maskFloat = mask.is_floating_point();
        var maskSource = maskFloat ? new Source(mask) : default;
        Tensor? maskBool = maskFloat ? null : mask.dtype == ScalarType.Bool && mask.is_contiguous() ? mask : mask.ne(0).contiguous();
        byte* maskBytes = maskBool is null ? null : (byte*)TensorMemory.Address(maskBool);
        var src = new Source(l);
        Source? old = batch.OldLogProbs is { } o ? new Source(o) : null, reference = kl is not null ? new Source(batch.ReferenceLogProbs!) : null,
            behaviour = correction is not null ? new Source(batch.BehaviourLogProbs!) : null, h = entropy is not null ? new Source(entropy) : null;
        var a = batch.Advantages!;
        bool perSequenceAdvantages = a.dim() == 1;
        var advantages = new Source(a);

        double? threshold = null;
        bool topEntropy = options.TopEntropyQuantile < 1 && entropy is not null;
        if (topEntropy)
        {
            threshold = batch.Window?.EntropyThreshold ?? QuantileThreshold(batch, entropy!, dtype, options.TopEntropyQuantile);
            if (threshold is null) return null;                   // no valid token: the op-by-op path handles it
        }

        var outLoss = empty(new long[] { n, t }, dtype: dtype);
        var outSlope = grad ? empty(new long[] { n, t }, dtype: dtype) : null;
        var outEntropySlope = entropyGrad ? empty(new long[] { n, t }, dtype: dtype) : null;
        nint pLoss = (nint)TensorMemory.Address(outLoss), pSlope = outSlope is null ? 0 : (nint)TensorMemory.Address(outSlope),
            pEntropySlope = outEntropySlope is null ? 0 : (nint)TensorMemory.Address(outEntropySlope);
        bool outDouble = dtype == ScalarType.Float64;
        double limit = outDouble ? double.MaxValue : float.MaxValue;
        var stats = new RowStats(n);
        var link = setup.Link;
        int width = (t + 3) & ~3;
        var rowSetup = new RowInputs(t, width, maskSource, maskFloat, (nint)maskBytes, src, old, reference, behaviour, h, advantages, perSequenceAdvantages,
            setup.Ratio, options, kl, correction, threshold, bonus, options.CheckFinite, limit);

        LogSoftmaxRows.Parallel(n, (long)t * 24, (from, to) =>
        {
            var scratch = System.Buffers.ArrayPool<double>.Shared.Rent(Arrays * width);
            try
            {
                fixed (double* s = scratch)
                    for (long i = from; i < to; i++)
                    {
                        if (!Row(rowSetup, link, (int)i, s, stats)) continue;
                        long offset = i * t;
                        Write(s + Slot.Out * width, t, pLoss, offset, outDouble);
                        if (pSlope != 0) Write(s + Slot.Slope * width, t, pSlope, offset, outDouble);
                        if (pEntropySlope != 0) Write(s + Slot.EntropySlope * width, t, pEntropySlope, offset, outDouble);
                    }
            }
            finally
            {
                System.Buffers.ArrayPool<double>.Shared.Return(scratch);
            }
        });

        // the rows combined in order
        bool padding = false;
        double tokens = 0, nonEmpty = 0, lossSum = 0, klSum = 0, entropySum = 0, bonusSum = 0, wSum = 0;
        double wMin = double.PositiveInfinity, wMax = double.NegativeInfinity;
        var count = new double[3];
        var minFraction = new[] { double.PositiveInfinity, double.PositiveInfinity, double.PositiveInfinity };
        var maxFraction = new[] { double.NegativeInfinity, double.NegativeInfinity, double.NegativeInfinity };
        for (int i = 0; i < n; i++)
        {
            if (stats.Bad[i]) return null;
            padding |= stats.Padding[i];
            double ni = stats.Tokens[i];
            tokens += ni;
            klSum += stats.Kl[i];
            entropySum += stats.Entropy[i];
            bonusSum += stats.Bonus[i];
            wSum += stats.WeightSum[i];
            if (ni == 0) continue;
            nonEmpty++;
            lossSum += stats.Loss[i] / ni;
            wMin = Math.Min(wMin, stats.WeightMin[i]);
            wMax = Math.Max(wMax, stats.WeightMax[i]);
            for (int f = 0; f < 3; f++)
            {
                count[f] += stats.Flags[f][i];
                minFraction[f] = Math.Min(minFraction[f], stats.Flags[f][i] / ni);
                maxFraction[f] = Math.Max(maxFraction[f], stats.Flags[f][i] / ni);
            }
        }
        if (tokens == 0) return null;
        double perToken = 1 / Math.Max(1, tokens);
        var metrics = new List<(string Name, double Value)>();
        link.AddMetrics(new FlagTotals(tokens, count, minFraction, maxFraction), metrics);
        if (correction is not null)
        {
            metrics.Add((MetricNames.ImportanceSamplingRatioMin, wMin));
            metrics.Add((MetricNames.ImportanceSamplingRatioMean, wSum * perToken));
            metrics.Add((MetricNames.ImportanceSamplingRatioMax, wMax));
        }
        if (kl is not null) metrics.Add((MetricNames.Kl, klSum * perToken));
        if (entropy is not null) metrics.Add((MetricNames.Entropy, entropySum * perToken));

        // the reduction's scale of sum(L) (or, for the sequence mean of token means, of the sum of sequence means)
        var window = batch.Window;
        var reduction = setup.Reduction;
        double d = window?.DataParallelSize ?? 1;
        double sequences = window?.Sequences ?? (reduction.CountEmptySequences ? Math.Max(1, n) : Math.Max(1, nonEmpty));
        double windowTokens = window?.Tokens ?? Math.Max(1, tokens);
        double scale = reduction.Aggregation switch
        {
            TokenAggregation.TokenMean => d / windowTokens,
            TokenAggregation.SequenceMeanTokenMean or TokenAggregation.SequenceMeanTokenSum => d / sequences,
            TokenAggregation.ConstantNormalizer => d / (sequences * reduction.MaxCompletionLength!.Value),
            _ => 1 / (Math.Max(1, tokens) * (window?.MicroBatches ?? 1)),
        };
        double rowTotal = 0;
        for (int i = 0; i < n; i++) rowTotal += stats.Loss[i];
        double lossValue = (reduction.Aggregation == TokenAggregation.SequenceMeanTokenMean ? lossSum : rowTotal) * scale;
        double bonusScale = d / windowTokens, bonusValue = bonusSum * bonusScale;
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
            perTokenLoss = outLoss.addcmul_(Tangent(l), outSlope!, 1);      // in place: outLoss is ours and constant
        }
        var counts = new double[n];
        for (int i = 0; i < n; i++) counts[i] = Math.Max(1, stats.Tokens[i]);
        var perSequence = perTokenLoss.sum(1).div_(Write(counts, dtype));
        var loss = (reduction.Aggregation == TokenAggregation.SequenceMeanTokenMean ? perSequence.sum() : perTokenLoss.sum()).mul_(scale);
        if (bonus)
        {
            loss = loss.add_(bonusValue);
            if (entropyGrad)
            {
                loss = loss + Tangent(entropy!).mul_(outEntropySlope!).sum().mul_(bonusScale);
            }
        }
        var metricValues = Write(metrics.Select(m => m.Value).ToArray(), dtype);
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

    /// <summary>A new [n] CPU tensor of <paramref name="dtype"/> holding <paramref name="values"/>.</summary>
    private static Tensor Write(double[] values, ScalarType dtype)
    {
        var x = empty(values.Length, dtype: dtype);
        fixed (double* v = values) Write(v, values.Length, (nint)TensorMemory.Address(x), 0, dtype == ScalarType.Float64);
        return x;
    }

    private static void Write(double* from, int count, nint to, long offset, bool asDouble)
    {
        if (asDouble)
        {
            new ReadOnlySpan<double>(from, count).CopyTo(new Span<double>((double*)to + offset, count));
            return;
        }
        float* f = (float*)to + offset;
        int j = 0;
        for (; j + 8 <= count; j += 8)
            Vector256.Narrow(Vector256.Load(from + j), Vector256.Load(from + j + 4)).Store(f + j);
        for (; j < count; j++) f[j] = (float)from[j];
    }

    /// <summary>The scratch rows of a worker, each <c>width</c> lanes.</summary>
    private static class Slot
    {
        internal const int Valid = 0, LogProbs = 1, Old = 2, Reference = 3, Behaviour = 4, Advantages = 5, Entropy = 6, TokenRatio = 7,
            ClampSlope = 8, LinkRatio = 9, LinkSlope = 10, Out = 11, Slope = 12, Flag0 = 13, Flag1 = 14, EntropySlope = 15;
    }

    /// <summary>Everything a row needs (shared by the workers, read only).</summary>
    private sealed record RowInputs(int T, int Width, Source MaskValues, bool MaskFloat, nint MaskBytes, Source LogProbs, Source? Old,
        Source? Reference, Source? Behaviour, Source? Entropy, Source Advantages, bool PerSequenceAdvantages, ImportanceRatio Ratio,
        PolicyGradientOptions Options, KlPenalty? Kl, RolloutCorrection? Correction, double? Threshold, bool Bonus, bool CheckLogProbs, double Limit);

    /// <summary>One row: loads, checks and computes it into the scratch; false (and the row marked bad) when a check fails.</summary>
    private static bool Row(RowInputs r, TokenLink link, int i, double* s, RowStats stats)
    {
        int t = r.T, w = r.Width;
        long offset = (long)i * t;
        double* Lane(int slot) => s + slot * w;
        double* m = Lane(Slot.Valid);
        var (zero, one) = (Vector256<double>.Zero, Vector256<double>.One);
        bool bad = false;

        // the mask, as 0/1 lanes (a floating mask must be finite: the op-by-op path names it otherwise)
        if (r.MaskFloat)
        {
            r.MaskValues.Read(offset, t, m);
            for (int j = 0; j < t; j++)
            {
                bad |= !double.IsFinite(m[j]);
                m[j] = m[j] != 0 ? 1 : 0;
            }
        }
        else
            {
            byte* bytes = (byte*)r.MaskBytes + offset;
            for (int j = 0; j < t; j++) m[j] = bytes[j] != 0 ? 1 : 0;
        }
        for (int j = t; j < w; j++) m[j] = 0;

        var nonFinite = Vector256<double>.Zero;    // NaN/Inf at a valid token of any input
        var positive = Vector256<double>.Zero;     // a log-prob above the tolerance at a valid token
        var padding = Vector256<double>.Zero;      // NaN/Inf in a differentiable input where no token counts (the surrogate zeroes it)
        var tolerance = Vector256.Create(LogProbTolerance);
        void Load(Source source, int slot, bool logProb, bool differentiable)
        {
            double* x = Lane(slot);
            source.Read(offset, t, x);
            for (int j = t; j < w; j++) x[j] = 0;
            for (int j = 0; j < w; j += 4)
            {
                var v = Vector256.Load(x + j);
                if (differentiable) padding |= ~Vector256.Equals(v - v, zero);
                var masked = v & Vector256.Equals(Vector256.Load(m + j), one);
                nonFinite |= ~Vector256.Equals(masked - masked, zero);
                if (logProb) positive |= Vector256.GreaterThan(masked, tolerance);
                masked.Store(x + j);
            }
        }
        Load(r.LogProbs, Slot.LogProbs, true, true);
        if (r.Old is { } old) Load(old, Slot.Old, true, false);
        else new ReadOnlySpan<double>(Lane(Slot.LogProbs), w).CopyTo(new Span<double>(Lane(Slot.Old), w));
        if (r.Reference is { } reference) Load(reference, Slot.Reference, true, false);
        if (r.Behaviour is { } behaviour) Load(behaviour, Slot.Behaviour, true, false);
        if (r.Entropy is { } entropy) Load(entropy, Slot.Entropy, false, r.Bonus);
        double* adv = Lane(Slot.Advantages);
        if (r.PerSequenceAdvantages)
        {
            double value;
            r.Advantages.Read(i, 1, &value);
            if (!double.IsFinite(value)) bad = true;
            for (int j = 0; j < w; j++) adv[j] = m[j] != 0 ? value : 0;
        }
        else Load(r.Advantages, Slot.Advantages, false, false);
        bad |= nonFinite != zero || r.CheckLogProbs && positive != zero;
        stats.Padding[i] = padding != zero;
        if (bad)
        {
            stats.Bad[i] = true;
            return false;
        }

        // the clamped log-ratio l - l_old, its clamp's slope, and the ratio the term uses
        double* lp = Lane(Slot.LogProbs), lo = Lane(Slot.Old), tr = Lane(Slot.TokenRatio), cs = Lane(Slot.ClampSlope);
        double clamp = r.Options.LogRatioClamp ?? double.PositiveInfinity;
        var vTokens = zero;
        var vRatioSum = zero;
        for (int j = 0; j < w; j += 4)
        {
            var (value, slope) = TokenLink.Clamp(Vector256.Load(lp + j) - Vector256.Load(lo + j), -clamp, clamp);
            value.Store(tr + j);
            slope.Store(cs + j);
            vRatioSum += value;                                    // 0 where no token counts
            vTokens += Vector256.Load(m + j);
        }
        double tokens = Vector256.Sum(vTokens);
        double* ratio = tr, ratioSlope = cs;
        if (link.UsesRatio && r.Ratio != ImportanceRatio.Token)
        {
            double total = Vector256.Sum(vRatioSum), sequence = r.Ratio == ImportanceRatio.SequenceSum ? total : total / Math.Max(1, tokens);
            ratio = Lane(Slot.LinkRatio);
            ratioSlope = Lane(Slot.LinkSlope);
            for (int j = 0; j < w; j++)
            {
                double at = m[j] != 0 ? sequence : 0;
                if (r.Ratio == ImportanceRatio.SequenceMeanToken)
                {
                    ratio[j] = at + lp[j] - lp[j];                       // sg(log s) + l - sg(l), as the op-by-op graph rounds it
                    ratioSlope[j] = 1;
                }
                else
                {
                    ratio[j] = at;
                    ratioSlope[j] = 0;
                }
            }
        }
        double* loss = Lane(Slot.Out), slopeOut = Lane(Slot.Slope), f0 = Lane(Slot.Flag0), f1 = Lane(Slot.Flag1);
        link.Evaluate(new LinkRow(w, lp, ratio, ratioSlope, adv, loss, slopeOut, f0, f1));

        // the top-entropy mask, the rollout weights, the KL term; then masked, summed, checked
        var kl = r.Kl;
        var correction = r.Correction;
        double* hv = Lane(Slot.Entropy), lr = Lane(Slot.Reference), lb = Lane(Slot.Behaviour), es = Lane(Slot.EntropySlope);
        double sequenceWeight = 1;
        if (correction is { Level: RolloutCorrectionLevel.Sequence })
        {
            var sum = zero;
            for (int j = 0; j < w; j += 4) sum += (Vector256.Load(lo + j) - Vector256.Load(lb + j)) * Vector256.Load(m + j);
            sequenceWeight = Math.Exp(Vector256.Sum(sum));
        }
        double wlo = correction?.Min ?? double.NegativeInfinity, whi = correction?.Max ?? double.PositiveInfinity;
        var (vLoss, vKl, vH, vBonus, vW, vF0, vF1, vF2) = (zero, zero, zero, zero, zero, zero, zero, zero);
        var (vWMin, vWMax) = (Vector256.Create(double.PositiveInfinity), Vector256.Create(double.NegativeInfinity));
        var vBig = zero;
        var vNan = zero;
        double beta = kl?.Beta ?? 0, coefficient = -r.Options.EntropyCoefficient;
        var threshold = Vector256.Create(r.Threshold ?? 0);
        int flags = link.Flags;
        for (int j = 0; j < w; j += 4)
        {
            var valid = Vector256.Equals(Vector256.Load(m + j), one);
            var p = Vector256.Load(loss + j);
            var g = Vector256.Load(slopeOut + j);
            var keep = one;
            if (r.Threshold is not null)
            {
                keep = TokenLink.Ones(Vector256.GreaterThanOrEqual(Vector256.Load(hv + j), threshold) & valid);
                (p, g) = (p * keep, g * keep);
            }
            if (correction is not null)
            {
                var weight = correction.Level == RolloutCorrectionLevel.Token
                    ? TokenLink.Exp((Vector256.Load(lo + j) - Vector256.Load(lb + j)) * Vector256.Load(m + j))
                    : Vector256.Create(sequenceWeight) & valid;
                weight = correction.Mode == RolloutCorrectionMode.Truncate
                    ? TokenLink.Clamp(weight, wlo, whi).Value
                    : weight & ~(Vector256.LessThan(weight, Vector256.Create(wlo)) | Vector256.GreaterThan(weight, Vector256.Create(whi)));
                (p, g) = (p * weight, g * weight);
                vW += weight & valid;
                vWMin = Vector256.Min(vWMin, Vector256.ConditionalSelect(valid, weight, Vector256.Create(double.PositiveInfinity)));
                vWMax = Vector256.Max(vWMax, Vector256.ConditionalSelect(valid, weight, Vector256.Create(double.NegativeInfinity)));
            }
            if (kl is not null)
            {
                var (k, dk) = Kl(kl, Vector256.Load(lr + j) - Vector256.Load(lp + j));
                if (kl.BiasCorrected)
                {
                    var rho = TokenLink.Exp(Vector256.Load(tr + j));
                    (k, dk) = (k * rho, dk * rho + k * rho * Vector256.Load(cs + j));
                }
                if (beta > 0) (p, g) = (p + k * beta, g + dk * beta);
                vKl += k & valid;
            }
            p &= valid;
            g &= valid;
            p.Store(loss + j);
            g.Store(slopeOut + j);
            vLoss += p;
            vBig = Vector256.Max(vBig, Vector256.Max(Vector256.Abs(p), Vector256.Abs(g)));
            vNan |= ~Vector256.Equals(p, p) | ~Vector256.Equals(g, g);
            if (r.Entropy is not null)
            {
                var e = Vector256.Load(hv + j);
                vH += e;                                            // masked on load
                if (r.Bonus)
                {
                    var c = (keep * coefficient) & valid;
                    vBonus += e * c;
                    c.Store(es + j);
                }
            }
            if (flags > 0)
            {
                var (a0, a1) = (Vector256.Load(f0 + j) & valid, flags > 1 ? Vector256.Load(f1 + j) & valid : zero);
                (vF0, vF1, vF2) = (vF0 + a0, vF1 + a1, vF2 + Vector256.Max(a0, a1));
            }
        }
        double big = Math.Max(Math.Max(vBig[0], vBig[1]), Math.Max(vBig[2], vBig[3]));
        if (vNan != zero || !(big <= r.Limit) || Math.Abs(Vector256.Sum(vBonus)) > r.Limit)
        {
            stats.Bad[i] = true;
            return false;
        }
        stats.Tokens[i] = tokens;
        stats.Loss[i] = Vector256.Sum(vLoss);
        stats.Kl[i] = Vector256.Sum(vKl);
        stats.Entropy[i] = Vector256.Sum(vH);
        stats.Bonus[i] = Vector256.Sum(vBonus);
        stats.WeightSum[i] = Vector256.Sum(vW);
        stats.WeightMin[i] = Math.Min(Math.Min(vWMin[0], vWMin[1]), Math.Min(vWMin[2], vWMin[3]));
        stats.WeightMax[i] = Math.Max(Math.Max(vWMax[0], vWMax[1]), Math.Max(vWMax[2], vWMax[3]));
        (stats.Flags[0][i], stats.Flags[1][i], stats.Flags[2][i]) = (Vector256.Sum(vF0), Vector256.Sum(vF1), Vector256.Sum(vF2));
        return true;
    }

    /// <summary>The KL estimate and its derivative with respect to l from u = l_ref - l (<see cref="KlPenalty"/>'s forms).</summary>
    private static (Vector256<double> Value, Vector256<double> Slope) Kl(KlPenalty kl, Vector256<double> u)
    {
        var (one, half) = (Vector256<double>.One, Vector256.Create(0.5));
        var du = -one;                                             // du / dl
        if (kl.Clamp)
        {
            var (clamped, inside) = TokenLink.Clamp(u, -20, 20);
            (u, du) = (clamped, -inside);
        }
        (Vector256<double>, Vector256<double>) K3(Vector256<double> v)
        {
            var e = TokenLink.Exp(v);
            var k = e - v - one;
            var dk = e - one;
            if (kl.Clamp)
            {
                var (ck, sk) = TokenLink.Clamp(k, -10, 10);
                (k, dk) = (ck, dk * sk);
            }
            return (k, dk);
        }
        switch (kl.Estimator)
        {
            case KlEstimator.K1: return (-u, -du);
            case KlEstimator.K2: return (u * u * half, u * du);
            case KlEstimator.K3:
                var (k3, d3) = K3(u);
                return (k3, d3 * du);
            default:
                var k2 = u * u * half;
                return (k2 + (K3(u).Item1 - k2), u * du);
        }
    }
}
