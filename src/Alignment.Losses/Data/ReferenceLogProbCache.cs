using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using static TorchSharp.torch;

namespace Alignment.Losses.Data;

/// <summary>Options of <see cref="ReferenceLogProbCache.Build"/>.</summary>
public sealed record ReferenceCacheOptions
{
    /// <summary>Examples per reference forward pass. Default 8.</summary>
    public int BatchSize { get => field; init => field = value >= 1 ? value : throw new ArgumentOutOfRangeException(nameof(BatchSize), value, "BatchSize must be >= 1."); } = 8;

    /// <summary>Where the batches go (default CPU).</summary>
    public Device? Device { get; init; }

    /// <summary>
    /// What produced the log-probs (model name and revision, LD-DPO alpha, ...): stored in the file and compared by
    /// <see cref="ReferenceLogProbCache.Load"/> when asked, so that a cache of another model is refused. Default "".
    /// </summary>
    public string Description { get; init; } = "";

    /// <summary>Progress lines ("reference log-probs: 64/200 examples, 31.5 examples/s") go here; null for none. Default standard error.</summary>
    public TextWriter? Progress { get; init; } = Console.Error;
}

/// <summary>
/// Reference log-probs computed once, stored on disk, one file per dataset, keyed by example, so that training reuses
/// them and never holds the reference model in memory.
/// </summary>
/// <remarks>
/// <para><see cref="Build"/> runs the reference model over the dataset in batches under no_grad and writes the file;
/// <see cref="Load"/> reads it back (after a restart too); <see cref="Lookup"/> returns a collated batch's reference
/// log-probs. Each entry is keyed by the content of the example as truncated by the collator (a 128-bit SHA-256 prefix of
/// its prompt, chosen and rejected ids), so an example the cache never saw, or one changed by other truncation
/// limits, is an error naming it, never a wrong reward.</para>
/// <para>File format (little-endian): the 8 bytes "ALRCACHE", int32 version 1, the description (int32 byte length + UTF-8),
/// int64 entry count, then per entry the 16 key bytes, float64 chosen and rejected log-probs, float64 chosen and
/// rejected completion-token counts; last, the SHA-256 of everything before it. Written to a temporary file and moved
/// into place, so an interrupted build leaves no partial cache.</para>
/// </remarks>
public sealed class ReferenceLogProbCache
{
    private static readonly byte[] Magic = "ALRCACHE"u8.ToArray();
    private const int Version = 1;

    /// <summary>One example's reference values.</summary>
    /// <param name="Chosen">Summed reference log-prob of the chosen completion.</param>
    /// <param name="Rejected">Summed reference log-prob of the rejected completion.</param>
    /// <param name="ChosenTokens">Completion tokens of the chosen completion.</param>
    /// <param name="RejectedTokens">Completion tokens of the rejected completion.</param>
    public readonly record struct Entry(double Chosen, double Rejected, double ChosenTokens, double RejectedTokens);

    private readonly Dictionary<string, Entry> _entries;

    private ReferenceLogProbCache(string path, string description, Dictionary<string, Entry> entries)
    {
        Path = path;
        Description = description;
        _entries = entries;
    }

    /// <summary>The file the cache lives in.</summary>
    public string Path { get; }

    /// <summary>What produced the log-probs (<see cref="ReferenceCacheOptions.Description"/>).</summary>
    public string Description { get; }

    /// <summary>Number of distinct examples stored.</summary>
    public int Count => _entries.Count;

    /// <summary>The stored values of the example with content key <paramref name="key"/>, if present.</summary>
    public bool TryGet(string key, out Entry entry) => _entries.TryGetValue(key, out entry);

    /// <summary>
    /// Runs <paramref name="reference"/> over <paramref name="dataset"/> in batches (under no_grad, each batch in its own
    /// dispose scope), writes the cache file at <paramref name="path"/> and returns the cache.
    /// </summary>
    /// <param name="dataset">The examples.</param>
    /// <param name="collator">The collator training will use (its truncation decides the keys).</param>
    /// <param name="reference">The reference model's log-probs of a collated batch, e.g.
    /// <c>b =&gt; SequenceLogProbs.Compute(refModel.forward(b.InputIds), b.Labels, null, LabelAlignment.ShiftByOne)</c>;
    /// 2B sequences, chosen then rejected. The cache disposes the result.</param>
    /// <param name="path">The cache file (its folder is created).</param>
    /// <param name="options">Batch size, device, description, progress output.</param>
    /// <exception cref="ArgumentException">The dataset is empty, or the reference returns the wrong number of values or non-finite ones.</exception>
    public static ReferenceLogProbCache Build(IReadOnlyList<PreferenceExample> dataset, PreferenceCollator collator,
        Func<CollatedPreferences, SequenceLogProbsResult> reference, string path, ReferenceCacheOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(dataset);
        ArgumentNullException.ThrowIfNull(collator);
        ArgumentNullException.ThrowIfNull(reference);
        ArgumentException.ThrowIfNullOrEmpty(path);
        options ??= new ReferenceCacheOptions();
        if (dataset.Count == 0) throw new ArgumentException("dataset is empty: there is nothing to cache.", nameof(dataset));
        CheckWritable(System.IO.Path.GetFullPath(path));                 // before hours of reference passes, not after
        var entries = new Dictionary<string, Entry>();
        var clock = Stopwatch.StartNew();
        for (int start = 0; start < dataset.Count; start += options.BatchSize)
        {
            var slice = dataset.Skip(start).Take(options.BatchSize).ToList();
            using (NewDisposeScope())
            using (no_grad())
            {
                using var batch = collator.Collate(slice, options.Device);
                using var result = reference(batch) ?? throw new InvalidOperationException("The reference function returned null.");
                var sums = result.Sum.detach().to_type(ScalarType.Float64).cpu().data<double>().ToArray();
                var counts = result.TokenCounts.to_type(ScalarType.Float64).cpu().data<double>().ToArray();
                int b = slice.Count;
                if (sums.Length != 2 * b)
                    throw new ArgumentException($"The reference function returned {sums.Length} log-probs for a batch of {b} examples; it must return 2B = {2 * b} (chosen rows, then rejected rows).", nameof(reference));
                for (int i = 0; i < 2 * b; i++)
                    if (!double.IsFinite(sums[i]))
                        throw new ArgumentException($"The reference log-prob of example {start + i % b} ({(i < b ? "chosen" : "rejected")}) is {sums[i]}; the cache stores finite values only.", nameof(reference));
                for (int i = 0; i < b; i++)
                    entries[batch.Examples[i].Key] = new Entry(sums[i], sums[b + i], counts[i], counts[b + i]);
            }
            int done = Math.Min(dataset.Count, start + options.BatchSize);
            options.Progress?.WriteLine($"reference log-probs: {done}/{dataset.Count} examples, {done / Math.Max(1e-9, clock.Elapsed.TotalSeconds):F1} examples/s");
        }
        var cache = new ReferenceLogProbCache(System.IO.Path.GetFullPath(path), options.Description, entries);
        cache.Save();
        return cache;
    }

    /// <summary>Loads a cache file, if <paramref name="path"/> exists, else builds it (see <see cref="Build"/>); the loaded one is verified against the dataset.</summary>
    public static ReferenceLogProbCache LoadOrBuild(IReadOnlyList<PreferenceExample> dataset, PreferenceCollator collator,
        Func<CollatedPreferences, SequenceLogProbsResult> reference, string path, ReferenceCacheOptions? options = null)
    {
        options ??= new ReferenceCacheOptions();
        if (!File.Exists(path)) return Build(dataset, collator, reference, path, options);
        var cache = Load(path, options.Description);
        cache.Verify(dataset, collator);
        options.Progress?.WriteLine($"reference log-probs: {cache.Count} examples loaded from {cache.Path}");
        return cache;
    }

    /// <summary>Reads a cache file.</summary>
    /// <param name="path">The file.</param>
    /// <param name="expectedDescription">When set, the file's description must equal it (a cache of another reference model is refused).</param>
    /// <exception cref="FileNotFoundException">No such file.</exception>
    /// <exception cref="InvalidDataException">Not a cache file, another version, truncated or corrupted (checksum), or another description.</exception>
    public static ReferenceLogProbCache Load(string path, string? expectedDescription = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var full = System.IO.Path.GetFullPath(path);
        if (!File.Exists(full)) throw new FileNotFoundException($"No reference log-prob cache at {full}.", full);
        var bytes = File.ReadAllBytes(full);
        if (bytes.Length < Magic.Length + 4 + 32 || !bytes.AsSpan(0, Magic.Length).SequenceEqual(Magic))
            throw new InvalidDataException($"{full} is not a reference log-prob cache (no ALRCACHE header).");
        var body = bytes.AsSpan(0, bytes.Length - 32);
        if (!SHA256.HashData(body).AsSpan().SequenceEqual(bytes.AsSpan(bytes.Length - 32)))
            throw new InvalidDataException($"{full} is corrupted or truncated (its checksum does not match); rebuild it.");
        try
        {
            using var reader = new BinaryReader(new MemoryStream(bytes, 0, body.Length));
            reader.ReadBytes(Magic.Length);
            int version = reader.ReadInt32();
            if (version != Version)
                throw new InvalidDataException($"{full} is a version {version} cache; this library reads version {Version}. Rebuild it.");
            int descriptionLength = reader.ReadInt32();
            if (descriptionLength < 0 || descriptionLength > body.Length - reader.BaseStream.Position)
                throw new InvalidDataException($"{full} is not a valid reference log-prob cache (its description length {descriptionLength} does not fit the file). Rebuild it.");
            string description = Encoding.UTF8.GetString(reader.ReadBytes(descriptionLength));
            if (expectedDescription is not null && description != expectedDescription)
                throw new InvalidDataException($"{full} holds reference log-probs of \"{description}\", not of \"{expectedDescription}\". Rebuild it, or use another path.");
            long count = reader.ReadInt64();
            const int EntryBytes = 16 + 4 * 8;
            if (count < 0 || count > (body.Length - reader.BaseStream.Position) / EntryBytes)
                throw new InvalidDataException($"{full} is not a valid reference log-prob cache (it claims {count} entries, which do not fit the file). Rebuild it.");
            var entries = new Dictionary<string, Entry>((int)count);
            for (long i = 0; i < count; i++)
            {
                var key = Convert.ToHexString(reader.ReadBytes(16));
                var entry = new Entry(reader.ReadDouble(), reader.ReadDouble(), reader.ReadDouble(), reader.ReadDouble());
                // what Build refuses, Load refuses too: non-finite or positive log-probs, token counts that are not whole and positive
                if (!double.IsFinite(entry.Chosen) || !double.IsFinite(entry.Rejected) || entry.Chosen > 1e-3 || entry.Rejected > 1e-3
                    || !(entry.ChosenTokens >= 0) || !(entry.RejectedTokens >= 0) || entry.ChosenTokens != Math.Floor(entry.ChosenTokens)
                    || entry.RejectedTokens != Math.Floor(entry.RejectedTokens) || double.IsInfinity(entry.ChosenTokens) || double.IsInfinity(entry.RejectedTokens))
                    throw new InvalidDataException(
                        $"{full} entry {i} (key {key}) holds values no build writes (log-probs {entry.Chosen}, {entry.Rejected}; token counts {entry.ChosenTokens}, {entry.RejectedTokens}). Rebuild it.");
                if (!entries.TryAdd(key, entry))
                    throw new InvalidDataException($"{full} holds key {key} twice (entry {i}); no build writes that. Rebuild it.");
            }
            if (reader.BaseStream.Position != body.Length)
                throw new InvalidDataException($"{full} has {body.Length - reader.BaseStream.Position} unexpected bytes after its {count} entries.");
            return new ReferenceLogProbCache(full, description, entries);
        }
        catch (Exception e) when (e is EndOfStreamException or ArgumentException or DecoderFallbackException or OverflowException)
        {
            throw new InvalidDataException($"{full} is not a valid reference log-prob cache ({e.Message}). Rebuild it.", e);
        }
    }

    /// <summary>Checks that every example of <paramref name="dataset"/>, truncated by <paramref name="collator"/>, is in the cache.</summary>
    /// <exception cref="InvalidOperationException">Some are missing: names how many and the first.</exception>
    public void Verify(IReadOnlyList<PreferenceExample> dataset, PreferenceCollator collator)
    {
        ArgumentNullException.ThrowIfNull(dataset);
        ArgumentNullException.ThrowIfNull(collator);
        var missing = dataset.Select((e, i) => (Index: i, collator.Truncate(e, i).Key)).Where(x => !_entries.ContainsKey(x.Key)).ToList();
        if (missing.Count > 0)
            throw new InvalidOperationException(
                $"The reference cache {Path} does not match the dataset: {missing.Count} of {dataset.Count} examples are not in it (the first is example {missing[0].Index}, key {missing[0].Key}). " +
                "The dataset or the collator's limits changed since the cache was built; rebuild it.");
    }

    /// <summary>
    /// The reference log-probs of a collated batch: [B] chosen and rejected (float32 on the batch's device), with token
    /// counts. The four tensors are new and the caller's (a dispose scope around the step releases them).
    /// </summary>
    /// <exception cref="InvalidOperationException">An example of the batch is not in the cache (names it), or its token counts differ from the batch's.</exception>
    public PreferenceLogps Lookup(CollatedPreferences batch, ScalarType dtype = ScalarType.Float32)
    {
        ArgumentNullException.ThrowIfNull(batch);
        if (dtype is not (ScalarType.Float64 or ScalarType.Float32 or ScalarType.BFloat16 or ScalarType.Float16))
            throw new ArgumentException($"dtype must be a floating type (Float32 by default, Float64, BFloat16 or Float16); got {dtype}.", nameof(dtype));
        if (batch.InputIds.IsInvalid)
            throw new ObjectDisposedException(nameof(batch), "The collated batch has been disposed; look up its reference log-probs before disposing it.");
        int b = batch.PairCount;
        var values = new double[4, b];
        for (int i = 0; i < b; i++)
        {
            var example = batch.Examples[i];
            if (!_entries.TryGetValue(example.Key, out var e))
                throw new InvalidOperationException(
                    $"Example {i} of this batch (key {example.Key}) is not in the reference cache {Path}: the dataset or the collator's limits changed since it was built. Rebuild it.");
            if (e.ChosenTokens != example.Chosen.Length || e.RejectedTokens != example.Rejected.Length)
                throw new InvalidOperationException(
                    $"Example {i} of this batch (key {example.Key}) has {example.Chosen.Length}/{example.Rejected.Length} completion tokens, but the cache scored {e.ChosenTokens}/{e.RejectedTokens}: the reference used another mask. Rebuild it.");
            (values[0, i], values[1, i], values[2, i], values[3, i]) = (e.Chosen, e.Rejected, e.ChosenTokens, e.RejectedTokens);
        }
        double largest = dtype == ScalarType.Float16 ? 65504 : dtype == ScalarType.Float64 ? double.MaxValue : float.MaxValue;
        for (int r = 0; r < 4; r++)
            for (int i = 0; i < b; i++)
                if (Math.Abs(values[r, i]) > largest)
                    throw new ArgumentException(
                        $"Example {i}'s cached {(r < 2 ? "log-prob" : "token count")} ({values[r, i]:G6}) does not fit {dtype} (largest {largest:G6}); look it up as Float32 (the default) and let the loss upcast.",
                        nameof(dtype));
        var device = batch.InputIds.device;
        Tensor Row(int r) => Internal.Numerics.FromHost(Enumerable.Range(0, b).Select(i => values[r, i]).ToArray(), new[] { (long)b }, dtype, device);
        return new PreferenceLogps(Row(0), Row(1), Row(2), Row(3));
    }

    /// <summary>
    /// Creates the folder and a probe file beside <paramref name="path"/>, so that a path that cannot be written fails before
    /// the reference pass; removes temporary files that a killed or failed earlier build left (their process is gone).
    /// </summary>
    private static void CheckWritable(string path)
    {
        var folder = System.IO.Path.GetDirectoryName(path)!;
        try
        {
            Directory.CreateDirectory(folder);
            var probe = path + ".tmp-probe-" + Environment.ProcessId;
            using (File.Create(probe, 1, FileOptions.DeleteOnClose)) { }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or NotSupportedException)
        {
            throw new ArgumentException($"The reference cache cannot be written at {path}: {e.Message} Choose a writable path (checked before the reference pass).", nameof(path), e);
        }
        foreach (var stale in Directory.EnumerateFiles(folder, System.IO.Path.GetFileName(path) + ".tmp-*"))
        {
            var suffix = stale[(path.Length + ".tmp-".Length)..].Replace("probe-", "", StringComparison.Ordinal);
            if (!int.TryParse(suffix, out var pid) || pid == Environment.ProcessId || ProcessAlive(pid)) continue;
            try { File.Delete(stale); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }

    private static bool ProcessAlive(int pid)
    {
        try { using var p = Process.GetProcessById(pid); return !p.HasExited; }
        catch (ArgumentException) { return false; }
        catch (InvalidOperationException) { return false; }
    }

    private void Save()
    {
        var folder = System.IO.Path.GetDirectoryName(Path);
        if (!string.IsNullOrEmpty(folder)) Directory.CreateDirectory(folder);
        using var stream = new MemoryStream();
        using (var writer = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true))
        {
            writer.Write(Magic);
            writer.Write(Version);
            var description = Encoding.UTF8.GetBytes(Description);
            writer.Write(description.Length);
            writer.Write(description);
            writer.Write((long)_entries.Count);
            foreach (var (key, e) in _entries)
            {
                writer.Write(Convert.FromHexString(key));
                writer.Write(e.Chosen);
                writer.Write(e.Rejected);
                writer.Write(e.ChosenTokens);
                writer.Write(e.RejectedTokens);
            }
        }
        var body = stream.ToArray();
        var temporary = Path + ".tmp-" + Environment.ProcessId;
        try
        {
            using (var file = File.Create(temporary))
            {
                file.Write(body);
                file.Write(SHA256.HashData(body));
            }
            File.Move(temporary, Path, overwrite: true);
        }
        finally
        {
            if (File.Exists(temporary)) try { File.Delete(temporary); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }
}
