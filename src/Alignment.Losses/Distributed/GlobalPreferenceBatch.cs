using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

public static partial class GlobalBatch
{
    /// <summary>
    /// Any sequence-pair loss over the whole data-parallel batch (spec §14): every rank's micro-batches are gathered (every
    /// tensor of their <see cref="PreferenceBatch"/>es: log-probs, token counts, prompt embeddings, weights, scores,
    /// win-rates, KL samples, mismatched pairs), <paramref name="loss"/> runs once on the global batch on every rank, and
    /// each micro-batch gets back a result whose loss has the global loss's value (times the micro-batch's share of this
    /// rank's rows) and, as gradient, exactly the global loss's gradient with respect to that micro-batch's rows. So RPO's
    /// contrast is between every chosen and every rejected row of the global batch, AOT sorts the global batch, KTO's
    /// reference point is the global mean of the mismatched pairs, BCO's baseline advances once with the global batch
    /// (identically on every rank), and every metric is the global batch's, on every rank.
    /// </summary>
    /// <remarks>
    /// <para><b>What is exchanged:</b> two all-gathers of float64 vectors: a layout (a few numbers per input of each
    /// micro-batch), then every input's values. That is a few numbers per sequence, plus D per row for RPO's prompt
    /// embeddings (B × D), N per chosen row for a caller's RPO weight matrix, and K for KTO's mismatched pairs. Every rank
    /// then computes the global loss (RPO's global M × N contrast on every rank: O(M N) time and memory per rank).</para>
    /// <para><b>Gradients:</b> the global loss's gradient with respect to each global row is computed on every rank; each
    /// micro-batch's loss is a surrogate sg(L) s + sum_i (x_i - sg(x_i)) g_i over its differentiable inputs x (the policy
    /// log-probs and ORPO's prompt log-probs), with g the global gradient at its rows (times the world size when
    /// <paramref name="gradientsAveraged"/>, so that <see cref="Collectives.AverageGradients"/> or DDP averaging gives the
    /// whole batch's gradient). Its backward pass reaches the model through the caller's graph, as a plain
    /// <c>loss.Compute(batch)</c> would; it has no second derivative. Every micro-batch's graph must be alive when this is
    /// called (compute all of the step's log-probs first): a loss coupled across micro-batches needs them all at once. A
    /// micro-batch given without grad gets a result without grad (an evaluation call).</para>
    /// <para><b>The results:</b> <see cref="LossResult.Loss"/> of micro-batch k has the value L n_k / n (n_k its chosen rows,
    /// n this rank's), so the rank's losses sum to the global L; the metrics are the global batch's on every micro-batch;
    /// <see cref="PreferenceLossResult.PerExample"/> holds the global per-example losses at the micro-batch's rows (chosen
    /// rows, then rejected rows for KTO and BCO; for AOT, whose rows are ranks of the sorted batch, the ranks at the same
    /// positions), detached.</para>
    /// <para><b>Errors:</b> a rank whose micro-batches cannot be read (a disposed tensor, a null batch) throws its own error
    /// and every other rank an <see cref="InvalidOperationException"/> naming it; inputs that disagree across ranks (paired
    /// on one and unpaired on another, a different embedding size or dtype, a reference on some only) and every error of
    /// the loss itself are thrown identically on every rank, so no rank is left waiting. A KL estimate
    /// (<see cref="PreferenceBatch.KlDivergence"/>) is concatenated over the micro-batches: pass per-sample values [S] for
    /// SPO's global mean (a scalar per micro-batch gives the mean of those scalars; KTO's z0 from
    /// <see cref="KtoReferencePoint"/> is the same on every micro-batch, so its mean is itself).</para>
    /// </remarks>
    /// <param name="collectives">The ranks; every rank calls this with its own micro-batches (possibly none).</param>
    /// <param name="loss">The loss, the same on every rank (any <see cref="IPreferenceLoss"/>, yours included).</param>
    /// <param name="microBatches">This rank's micro-batches of the step, every one with its log-probs' graph alive.</param>
    /// <param name="gradientsAveraged">True (default) when the engine averages gradients over ranks; false when it sums them.</param>
    /// <returns>One result per micro-batch, in order; dispose each after the backward pass.</returns>
    /// <exception cref="ArgumentException">The global batch is malformed for <paramref name="loss"/> (the message names the input).</exception>
    /// <exception cref="InvalidOperationException">Another rank failed to describe its batch.</exception>
    public static PreferenceLossResult[] Compute(ICollectives collectives, IPreferenceLoss loss, IReadOnlyList<PreferenceBatch> microBatches, bool gradientsAveraged = true)
    {
        ArgumentNullException.ThrowIfNull(collectives);
        ArgumentNullException.ThrowIfNull(loss);
        ArgumentNullException.ThrowIfNull(microBatches);
        return GatheredPreferences.Compute(collectives, loss, microBatches, gradientsAveraged);
    }

    /// <summary>
    /// One micro-batch per rank: <see cref="Compute(ICollectives, IPreferenceLoss, IReadOnlyList{PreferenceBatch}, bool)"/>
    /// with this rank's only batch. The result's loss has the global loss's value and the global gradient at this rank's rows.
    /// </summary>
    public static PreferenceLossResult Compute(ICollectives collectives, IPreferenceLoss loss, PreferenceBatch batch, bool gradientsAveraged = true)
    {
        ArgumentNullException.ThrowIfNull(batch);
        return Compute(collectives, loss, new[] { batch }, gradientsAveraged)[0];
    }

    /// <summary>
    /// <paramref name="loss"/> over the whole data-parallel batch, as an <see cref="IPreferenceLoss"/>: each
    /// <see cref="IPreferenceLoss.Compute"/> is a collective call of
    /// <see cref="Compute(ICollectives, IPreferenceLoss, PreferenceBatch, bool)"/>, so a training loop written for one
    /// device runs data-parallel by wrapping its loss once. Every rank must call it once per step.
    /// </summary>
    /// <param name="loss">The loss.</param>
    /// <param name="collectives">The ranks.</param>
    /// <param name="gradientsAveraged">True (default) when the engine averages gradients over ranks.</param>
    public static IPreferenceLoss AcrossRanks(this IPreferenceLoss loss, ICollectives collectives, bool gradientsAveraged = true)
    {
        ArgumentNullException.ThrowIfNull(loss);
        ArgumentNullException.ThrowIfNull(collectives);
        return new AcrossRanksLoss(loss, collectives, gradientsAveraged);
    }

    private sealed class AcrossRanksLoss(IPreferenceLoss inner, ICollectives collectives, bool averaged) : IPreferenceLoss
    {
        public string Name => inner.Name;
        public PreferenceLossResult Compute(PreferenceBatch batch) => GlobalBatch.Compute(collectives, inner, batch, averaged);
        public override string ToString() => $"{inner.Name} across {collectives}";
    }
}

/// <summary>The gather, the global computation and the surrogates of <see cref="GlobalBatch.Compute(ICollectives, IPreferenceLoss, IReadOnlyList{PreferenceBatch}, bool)"/>.</summary>
internal static class GatheredPreferences
{
    /// <summary>Which rows of the global batch an input follows.</summary>
    private enum Rows
    {
        Chosen,          // [m, ...]: concatenated in the chosen order
        Rejected,        // [n, ...]
        ChosenThenRejected, // unpaired per-example weights [m + n]: the chosen parts, then the rejected parts
        Free,            // any shape, flattened and concatenated (KL samples, mismatched pairs)
    }

    private sealed record Slot(string Name, Func<PreferenceBatch, Tensor?> Get, Rows Rows, bool Differentiable = false, bool Matrix = false);

    private static readonly Slot[] Slots =
    {
        new("policy.Chosen", b => b.Policy.Chosen, Rows.Chosen, Differentiable: true),      // slots 0-1: the rows' counts
        new("policy.Rejected", b => b.Policy.Rejected, Rows.Rejected, Differentiable: true),
        new("policy.ChosenTokenCounts", b => b.Policy.ChosenTokenCounts, Rows.Chosen),
        new("policy.RejectedTokenCounts", b => b.Policy.RejectedTokenCounts, Rows.Rejected),
        new("reference.Chosen", b => b.Reference?.Chosen, Rows.Chosen),
        new("reference.Rejected", b => b.Reference?.Rejected, Rows.Rejected),
        new("reference.ChosenTokenCounts", b => b.Reference?.ChosenTokenCounts, Rows.Chosen),
        new("reference.RejectedTokenCounts", b => b.Reference?.RejectedTokenCounts, Rows.Rejected),
        new("batch.PromptEmbeddings.Chosen", b => b.PromptEmbeddings?.Chosen, Rows.Chosen, Matrix: true),
        new("batch.PromptEmbeddings.Rejected", b => b.PromptEmbeddings is { IsPaired: false } e ? e.Rejected : null, Rows.Rejected, Matrix: true),
        new("batch.RpoWeights", b => b.RpoWeights, Rows.Chosen, Matrix: true),
        new("batch.Scores.Chosen", b => b.Scores?.Chosen, Rows.Chosen),
        new("batch.Scores.Rejected", b => b.Scores?.Rejected, Rows.Rejected),
        new("batch.WinRates.Chosen", b => b.WinRates?.Chosen, Rows.Chosen),
        new("batch.WinRates.Rejected", b => b.WinRates?.Rejected, Rows.Rejected),
        new("batch.WinRates.Pairwise", b => b.WinRates?.Pairwise, Rows.Chosen),
        new("batch.ExampleWeights", b => b.ExampleWeights, Rows.ChosenThenRejected),
        new("batch.KlDivergence", b => b.KlDivergence, Rows.Free),
        new("batch.Mismatched.Policy", b => b.Mismatched?.Policy, Rows.Free),
        new("batch.Mismatched.Reference", b => b.Mismatched?.Reference, Rows.Free),
        new("batch.Prompt.Sum", b => b.Prompt?.Sum, Rows.Chosen, Differentiable: true),
        new("batch.Prompt.TokenCounts", b => b.Prompt?.TokenCounts, Rows.Chosen),
    };

    private const int PartHeader = 3;                 // paired, embeddings paired, reference paired
    private const int SlotFields = 5;                 // present, dtype, rows, columns (elements per row), requires grad
    private static int PartLength => PartHeader + Slots.Length * SlotFields;

    /// <summary>One micro-batch as described by its rank: its flags and, per slot, presence, dtype, shape and grad.</summary>
    private sealed record Part(int Rank, int Index, bool Paired, bool EmbeddingsPaired, double[] Fields)
    {
        public bool Present(int s) => Fields[s * SlotFields] != 0;
        public ScalarType DType(int s) => (ScalarType)(int)Fields[s * SlotFields + 1];
        public long RowCount(int s) => (long)Fields[s * SlotFields + 2];
        public long Columns(int s) => (long)Fields[s * SlotFields + 3];
        public bool RequiresGrad(int s) => Fields[s * SlotFields + 4] != 0;
        public long Elements(int s) => Present(s) ? RowCount(s) * Columns(s) : 0;
        public long Chosen => RowCount(0);
        public long Rejected => RowCount(1);
        public string Where => $"rank {Rank}'s micro-batch {Index}";
    }

    public static PreferenceLossResult[] Compute(ICollectives collectives, IPreferenceLoss loss, IReadOnlyList<PreferenceBatch> microBatches, bool averaged)
    {
        int rank = collectives.Rank, world = collectives.WorldSize;

        // 1. layouts (a rank that cannot describe its batches says so, so that nobody waits for it)
        double[] layout;
        Exception? localFailure = null;
        try
        {
            layout = Describe(microBatches);
        }
        catch (Exception e)
        {
            localFailure = e;
            layout = new double[] { 0 };
        }
        var layouts = collectives.AllGather(layout);
        int failed = Array.FindIndex(layouts, l => l.Length == 0 || l[0] == 0);
        if (localFailure is not null) throw localFailure;
        if (failed >= 0)
            throw new InvalidOperationException($"rank {failed} of {world} could not read its preference batches (its own error says why); no rank computed the loss.");
        var parts = layouts.SelectMany((l, r) => Parts(l, r)).ToList();
        var mine = parts.Where(p => p.Rank == rank).ToList();

        // 2. values, behind a flag (every rank exchanges, even when the layouts disagree, so that every rank fails the same way)
        string? mismatch = Disagreement(parts);
        double[] values;
        try
        {
            values = mismatch is null ? Values(microBatches) : new double[] { 1 };
        }
        catch (Exception e)
        {
            localFailure = e;
            values = new double[] { 0 };
        }
        var gathered = collectives.AllGather(values);
        failed = Array.FindIndex(gathered, v => v.Length == 0 || v[0] == 0);
        if (localFailure is not null) throw localFailure;
        if (failed >= 0)
            throw new InvalidOperationException($"rank {failed} of {world} could not read its preference batches' values (its own error says why); no rank computed the loss.");
        if (mismatch is not null) throw new ArgumentException(mismatch + " Every rank's micro-batches must carry the same inputs, in the same dtypes.", "microBatches");
        if (parts.Count == 0)
            throw new ArgumentException($"No rank gave a preference batch: the global batch of {world} rank(s) is empty.", nameof(microBatches));

        var device = microBatches.Count > 0 ? microBatches[0].Policy.Device : CPU;
        using var scope = NewDisposeScope();
        var globals = Assemble(parts, gathered, device);
        var global = Build(parts[0], globals);
        var leaves = Slots.Select((s, i) => s.Differentiable && globals[i] is { } t && parts.Any(p => p.RequiresGrad(i)) ? t.requires_grad_(true) : null).ToArray();

        PreferenceLossResult whole;
        try
        {
            whole = loss.Compute(global) ?? throw new InvalidOperationException($"{loss.GetType().Name}.Compute returned null.");
        }
        catch (ArgumentException e)
        {
            string suffix = $" (Parameter '{e.ParamName}')";
            string message = e.Message.EndsWith(suffix, StringComparison.Ordinal) ? e.Message[..^suffix.Length] : e.Message;
            throw new ArgumentException(
                $"{message} [in the global batch of {parts.Count} micro-batch(es) from {world} rank(s): {parts.Sum(p => p.Chosen)} chosen and {parts.Sum(p => p.Rejected)} rejected rows, " +
                "rank 0's first, in rank order]", e.ParamName, e);
        }
        using var wholeResult = whole;
        var gradients = new Tensor?[Slots.Length];
        if (leaves.Any(l => l is not null) && whole.RequiresGrad)
        {
            whole.Loss.backward();
            for (int i = 0; i < leaves.Length; i++)
                if (leaves[i] is { } leaf && leaf.grad is { } g) gradients[i] = g;
        }

        var results = new PreferenceLossResult[microBatches.Count];
        double localRows = mine.Sum(p => (double)p.Chosen);
        double scale = averaged ? world : 1;
        var perExample = whole.PerExample.detach();
        long globalChosen = parts.Sum(p => p.Chosen), globalRejected = parts.Sum(p => p.Rejected);
        for (int k = 0; k < microBatches.Count; k++)
        {
            var part = mine[k];
            var batch = microBatches[k];
            var lossValue = whole.Loss.detach() * (localRows > 0 ? part.Chosen / localRows : 0);
            for (int i = 0; i < Slots.Length; i++)
            {
                if (gradients[i] is not { } g || Slots[i].Get(batch) is not { } x || !x.requires_grad) continue;
                var rows = g.narrow(0, Offset(parts, part, i), part.RowCount(i)) * scale;
                lossValue = lossValue + ((x - x.detach()) * rows.to_type(x.dtype)).sum().to_type(lossValue.dtype);
            }
            var own = LocalRows(perExample, parts, part, globalChosen, globalRejected).clone();
            var metrics = whole.MetricTensor.clone();
            scope.MoveToOuter(lossValue, own, metrics);
            results[k] = new PreferenceLossResult(lossValue, own, metrics, whole.MetricNames.ToArray(), whole.LossName)
            {
                UnpairedCounts = part.Paired ? null : (part.Chosen, part.Rejected),
            };
        }
        return results;
    }

    /// <summary>[1 (ok), parts, then per part its header and slot fields]; throws what the batches' own checks throw.</summary>
    private static double[] Describe(IReadOnlyList<PreferenceBatch> batches)
    {
        var layout = new List<double> { 1, batches.Count };
        for (int k = 0; k < batches.Count; k++)
        {
            var b = batches[k] ?? throw new ArgumentException($"microBatches[{k}] is null.", "microBatches");
            if (b.Policy is null) throw new ArgumentException($"microBatches[{k}].Policy is null.", "microBatches");
            b.Policy.CheckUsable($"microBatches[{k}].policy");
            b.Reference?.CheckUsable($"microBatches[{k}].reference");
            layout.Add(b.Policy.IsPaired ? 1 : 0);
            layout.Add(b.PromptEmbeddings?.IsPaired == true ? 1 : 0);
            layout.Add(b.Reference?.IsPaired == true ? 1 : 0);
            var device = batches[0].Policy.Device;
            foreach (var slot in Slots)
            {
                var t = slot.Get(b);
                if (t is null) { layout.AddRange(new double[SlotFields]); continue; }
                string name = $"microBatches[{k}].{slot.Name}";
                Guard.Usable(t, name);
                if (t.device_type != device.type || t.device_index != device.index)
                    throw new ArgumentException($"{name} is on {t.device}, not on the first micro-batch's policy device {device}.", "microBatches");
                if (t.dim() != (slot.Matrix ? 2 : slot.Rows == Rows.Free ? t.dim() : 1))
                    throw new ArgumentException($"{name} has shape {Guard.Shape(t)}; expected {(slot.Matrix ? "[rows, columns]" : "[rows]")}.", "microBatches");
                long rows = slot.Rows == Rows.Free ? t.numel() : t.shape[0];
                long expected = slot.Rows switch
                {
                    Rows.Chosen => b.Policy.ChosenCount,
                    Rows.Rejected => b.Policy.RejectedCount,
                    Rows.ChosenThenRejected => b.Policy.IsPaired ? b.Policy.ChosenCount : b.Policy.ChosenCount + b.Policy.RejectedCount,
                    _ => rows,
                };
                if (rows != expected)
                    throw new ArgumentException($"{name} has {rows} rows but the micro-batch has {expected} (its policy log-probs' rows).", "microBatches");
                layout.AddRange(new double[] { 1, (int)t.dtype, rows, slot.Matrix ? t.shape[1] : 1, t.requires_grad ? 1 : 0 });
            }
        }
        return layout.ToArray();
    }

    private static IEnumerable<Part> Parts(double[] layout, int rank)
    {
        int count = (int)layout[1];
        for (int k = 0; k < count; k++)
        {
            int at = 2 + k * PartLength;
            yield return new Part(rank, k, layout[at] != 0, layout[at + 1] != 0, layout.AsSpan(at + PartHeader, Slots.Length * SlotFields).ToArray());
        }
    }

    /// <summary>A message when the parts cannot form one batch (the same message on every rank), else null.</summary>
    private static string? Disagreement(List<Part> parts)
    {
        if (parts.Count == 0) return null;
        var first = parts[0];
        foreach (var p in parts.Skip(1))
        {
            if (p.Paired != first.Paired)
                return $"{p.Where} is {(p.Paired ? "paired" : "unpaired")} but {first.Where} is {(first.Paired ? "paired" : "unpaired")}.";
            if (p.EmbeddingsPaired != first.EmbeddingsPaired && p.Present(8) && first.Present(8))
                return $"{p.Where}'s prompt embeddings are {(p.EmbeddingsPaired ? "paired" : "unpaired")} but {first.Where}'s are not.";
            for (int s = 0; s < Slots.Length; s++)
            {
                if (p.Present(s) != first.Present(s))
                    return $"{Slots[s].Name} is given in {(p.Present(s) ? p.Where : first.Where)} but not in {(p.Present(s) ? first.Where : p.Where)}.";
                if (!p.Present(s)) continue;
                if (p.DType(s) != first.DType(s))
                    return $"{Slots[s].Name} is {p.DType(s)} in {p.Where} but {first.DType(s)} in {first.Where}.";
                if (Slots[s].Matrix && Slots[s].Name != "batch.RpoWeights" && p.Columns(s) != first.Columns(s))
                    return $"{Slots[s].Name} has {p.Columns(s)} values per row in {p.Where} but {first.Columns(s)} in {first.Where} (a different embedding size?).";
            }
        }
        long rejected = parts.Sum(p => p.Rejected);
        var weights = Array.FindIndex(Slots, s => s.Name == "batch.RpoWeights");
        if (first.Present(weights) && parts.FirstOrDefault(p => p.Columns(weights) != rejected) is { } bad)
            return $"batch.RpoWeights of {bad.Where} has {bad.Columns(weights)} columns, but the global batch has {rejected} rejected rows: across ranks, each micro-batch " +
                   "gives its chosen rows' weights against every rejected row of the global batch, in rank and micro-batch order.";
        return null;
    }

    private static double[] Values(IReadOnlyList<PreferenceBatch> batches)
    {
        var all = new List<double> { 1 };                 // the "values read" flag
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        foreach (var b in batches)
            foreach (var slot in Slots)
                if (slot.Get(b) is { } t && t.numel() > 0)
                {
                    all.AddRange(t.detach().to(ScalarType.Float64, CPU).contiguous().data<double>().ToArray());
                }
        return all.ToArray();
    }

    /// <summary>Each slot's global tensor on <paramref name="device"/>, in its own dtype (null where absent).</summary>
    private static Tensor?[] Assemble(List<Part> parts, double[][] gathered, Device device)
    {
        // where each part's values of each slot start in its rank's vector
        var starts = new Dictionary<(int Rank, int Index), long[]>();
        foreach (var group in parts.GroupBy(p => p.Rank))
        {
            long at = 1;                                 // after the flag
            foreach (var p in group)
            {
                var s = new long[Slots.Length];
                for (int i = 0; i < Slots.Length; i++) { s[i] = at; at += p.Elements(i); }
                starts[(p.Rank, p.Index)] = s;
            }
        }
        var first = parts[0];
        var result = new Tensor?[Slots.Length];
        for (int i = 0; i < Slots.Length; i++)
        {
            if (!first.Present(i)) continue;
            var values = new List<double>();
            void Take(Part p, long skip, long count) =>
                values.AddRange(gathered[p.Rank].AsSpan((int)(starts[(p.Rank, p.Index)][i] + skip), (int)count).ToArray());
            if (Slots[i].Rows == Rows.ChosenThenRejected)
            {
                bool split = !first.Paired;
                foreach (var p in parts) Take(p, 0, split ? p.Chosen : p.Elements(i));
                if (split) foreach (var p in parts) Take(p, p.Chosen, p.Elements(i) - p.Chosen);
            }
            else foreach (var p in parts) Take(p, 0, p.Elements(i));
            long rows = parts.Sum(p => p.Present(i) ? p.RowCount(i) : 0);
            long[] shape = Slots[i].Matrix ? new[] { rows, first.Columns(i) } : new[] { (long)values.Count };
            result[i] = tensor(values.ToArray(), shape, ScalarType.Float64).to(first.DType(i), device);
        }
        return result;
    }

    private static PreferenceBatch Build(Part first, Tensor?[] g)
    {
        PreferenceLogps Logps(int at, bool paired)
        {
            var (c, r, cc, rc) = (g[at]!, g[at + 1]!, g[at + 2], g[at + 3]);
            return paired ? new PreferenceLogps(c, r, cc, rc) : PreferenceLogps.Unpaired(c, r, cc, rc);
        }
        var policy = Logps(0, first.Paired);
        var reference = g[4] is null ? null : Logps(4, first.Paired);
        PromptEmbeddings? embeddings = g[8] is null ? null
            : g[9] is null ? PromptEmbeddings.Paired(g[8]!) : PromptEmbeddings.Unpaired(g[8]!, g[9]!);
        return new PreferenceBatch(policy, reference)
        {
            PromptEmbeddings = embeddings,
            RpoWeights = g[10],
            Scores = g[11] is null ? null : new ResponseScores(g[11]!, g[12]!),
            WinRates = g[15] is { } pairwise ? SppoWinRates.FromPairwise(pairwise) : g[13] is null ? null : SppoWinRates.Individual(g[13]!, g[14]!),
            ExampleWeights = g[16],
            KlDivergence = g[17],
            Mismatched = g[18] is null ? null : new MismatchedLogps(g[18]!, g[19]!),
            Prompt = g[20] is null ? null : new PromptLogps(g[20]!, g[21]!),
        };
    }

    /// <summary>Where <paramref name="part"/>'s rows of slot <paramref name="slot"/> start in the global tensor.</summary>
    private static long Offset(List<Part> parts, Part part, int slot) =>
        parts.TakeWhile(p => !ReferenceEquals(p, part)).Sum(p => p.Present(slot) ? p.RowCount(slot) : 0);

    /// <summary>The global per-example losses at the part's rows (chosen rows; chosen then rejected rows for [m + n] losses).</summary>
    private static Tensor LocalRows(Tensor perExample, List<Part> parts, Part part, long globalChosen, long globalRejected)
    {
        long length = perExample.shape[0];
        long chosenAt = Offset(parts, part, 0), rejectedAt = Offset(parts, part, 1);
        if (length == globalChosen) return perExample.narrow(0, chosenAt, part.Chosen);
        if (length == globalChosen + globalRejected)
            return cat(new[] { perExample.narrow(0, chosenAt, part.Chosen), perExample.narrow(0, globalChosen + rejectedAt, part.Rejected) });
        return perExample;
    }
}
