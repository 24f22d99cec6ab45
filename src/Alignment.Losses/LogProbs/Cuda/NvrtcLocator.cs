namespace Alignment.Losses.Internal.Cuda;

/// <summary>
/// Where libnvrtc may be: next to the loaded libtorch_cuda (libtorch bundles a hashed copy; pip PyTorch ships it in
/// the nvidia-cuda-nvrtc wheel beside torch), CUDA_HOME / CUDA_PATH, LD_LIBRARY_PATH, then plain names for the
/// dynamic loader. A pure function of its inputs, so the search order is testable without CUDA.
/// </summary>
internal static class NvrtcLocator
{
    /// <summary>Environment variable naming an explicit libnvrtc file (checked first).</summary>
    internal const string OverrideVariable = "ALIGNMENT_LOSSES_NVRTC";

    internal static readonly string[] LoaderNames = { "libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2" };

    /// <summary>Candidate library paths (or loader names), most specific first, without duplicates.</summary>
    /// <param name="procMaps">Contents of /proc/self/maps (the loaded libraries).</param>
    /// <param name="env">Environment lookup.</param>
    /// <param name="listDirectory">Lists the file names of a directory (empty when it does not exist).</param>
    internal static IReadOnlyList<string> Candidates(string procMaps, Func<string, string?> env, Func<string, IEnumerable<string>> listDirectory)
    {
        var result = new List<string>();
        void AddFrom(string dir)
        {
            foreach (var name in listDirectory(dir).Where(IsNvrtc).OrderByDescending(n => n, StringComparer.Ordinal))
                result.Add(Path.Combine(dir, name));
        }

        if (env(OverrideVariable) is { Length: > 0 } explicitPath) result.Add(explicitPath);

        foreach (var torchDir in LoadedLibraryDirectories(procMaps, "libtorch_cuda.so"))
        {
            AddFrom(torchDir);                                                      // libtorch distribution: lib/libnvrtc-<hash>.so.12
            var sitePackages = Path.GetFullPath(Path.Combine(torchDir, "..", ".."));  // pip: site-packages/torch/lib
            AddFrom(Path.Combine(sitePackages, "nvidia", "cuda_nvrtc", "lib"));     // nvidia-cuda-nvrtc-cu12 wheel
            AddFrom(Path.Combine(sitePackages, "nvidia", "cu13", "lib"));           // CUDA 13 wheels
        }
        foreach (var variable in new[] { "CUDA_HOME", "CUDA_PATH" })
            if (env(variable) is { Length: > 0 } root)
            {
                AddFrom(Path.Combine(root, "lib64"));
                AddFrom(Path.Combine(root, "lib"));
            }
        foreach (var dir in (env("LD_LIBRARY_PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries)) AddFrom(dir);
        result.AddRange(LoaderNames);
        return result.Distinct(StringComparer.Ordinal).ToList();
    }

    /// <summary>libnvrtc.so, libnvrtc.so.12, libnvrtc-1a2b3c4d.so.12 ... but not libnvrtc-builtins.</summary>
    internal static bool IsNvrtc(string fileName) =>
        fileName.StartsWith("libnvrtc", StringComparison.Ordinal)
        && !fileName.Contains("builtins", StringComparison.Ordinal)
        && fileName.Contains(".so", StringComparison.Ordinal);

    /// <summary>Directories of the loaded libraries whose file name starts with <paramref name="library"/>.</summary>
    internal static IEnumerable<string> LoadedLibraryDirectories(string procMaps, string library) =>
        procMaps.Split('\n')
            .Select(line => line.Trim())
            .Select(line => line.IndexOf('/', StringComparison.Ordinal) is var i and >= 0 ? line[i..] : "")
            .Where(path => Path.GetFileName(path).StartsWith(library, StringComparison.Ordinal))
            .Select(path => Path.GetDirectoryName(path)!)
            .Distinct(StringComparer.Ordinal);

    /// <summary>The candidates on this machine.</summary>
    internal static IReadOnlyList<string> Candidates()
    {
        string maps = "";
        try { maps = File.ReadAllText("/proc/self/maps"); }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return Candidates(maps, Environment.GetEnvironmentVariable,
            dir => Directory.Exists(dir) ? Directory.EnumerateFiles(dir).Select(f => Path.GetFileName(f)) : Enumerable.Empty<string>());
    }
}
