using System.Runtime.InteropServices;
using System.Text;

namespace Alignment.Losses;

/// <summary>
/// Makes TorchSharp 0.107's native library loadable on Linux hosts with an older libstdc++ (Debian 12, Ubuntu 22.04, RHEL
/// 9) where no build step ran: notebooks (<c>#r "nuget: ..."</c> in .NET Interactive), scripting hosts, test runners
/// that load assemblies from the NuGet cache. Call <see cref="Prepare"/> once, before the first use of <c>torch</c>.
/// </summary>
/// <remarks>
/// <para>Why: TorchSharp 0.107.0's <c>libLibTorchSharp.so</c> records a need for <c>GLIBCXX_3.4.32</c> (GCC 13) for one
/// link marker nothing calls; GCC 12's libstdc++ stops at 3.4.30, so the loader refuses the library and TorchSharp reports,
/// misleadingly, that the project lacks a reference to libtorch-cpu. A project that references Alignment.Losses gets a
/// build-time fix (the package's build targets patch the copy in the output folder). A notebook has no build: its
/// <c>#r "nuget:"</c> references TorchSharp straight from the NuGet cache.</para>
/// <para>What: when the host's libstdc++ lacks the version and TorchSharp's own copy is unpatched, this writes a copy of
/// <c>libLibTorchSharp.so</c> with that one version need marked weak (which the loader accepts) into the folder where
/// TorchSharp looks when its first attempt fails: <c>cpu/</c> beside TorchSharp.dll (TorchSharp creates that folder
/// itself and never overwrites a file there). In a notebook that folder lies inside the NuGet cache's TorchSharp folder;
/// the package's own files are not touched. Nothing is done on Windows, macOS, or hosts whose libstdc++ has the version.
/// The CPU backend is handled; CUDA builds of TorchSharp are linked on newer systems anyway.</para>
/// </remarks>
public static class TorchSharpLoader
{
    /// <summary>The version need that TorchSharp 0.107.0 records and older libstdc++ builds lack.</summary>
    public const string GlibcxxVersion = "GLIBCXX_3.4.32";

    /// <summary>
    /// Prepares TorchSharp's native library for this host (see the class remarks), and says what it did. Idempotent and
    /// cheap after the first call; safe to call when nothing is needed.
    /// </summary>
    /// <returns>A one-line description: nothing needed (and why), or the file it wrote.</returns>
    /// <exception cref="InvalidOperationException">The host needs the fix but TorchSharp's native library could not be found
    /// (the message says where it looked), or the folder is not writable.</exception>
    public static string Prepare()
    {
        if (!RuntimeInformation.IsOSPlatform(OSPlatform.Linux)) return "nothing to do: not Linux.";
        var libstdcxx = HostLibstdcxx();
        if (libstdcxx is null) return "nothing to do: no libstdc++.so.6 in the usual places (the loader will say what it needs).";
        if (Contains(File.ReadAllBytes(libstdcxx), Encoding.ASCII.GetBytes(GlibcxxVersion + "\0")))
            return $"nothing to do: {libstdcxx} provides {GlibcxxVersion}.";

        var torchSharpDir = Path.GetDirectoryName(typeof(TorchSharp.torch).Assembly.Location)
            ?? throw new InvalidOperationException("TorchSharp.dll has no location on disk (loaded from memory?); its native library cannot be prepared.");
        var beside = Path.Combine(torchSharpDir, "libLibTorchSharp.so");
        if (File.Exists(beside) && !NeedsPatch(File.ReadAllBytes(beside)))
            return $"nothing to do: {beside} is already patched (a build with Alignment.Losses' targets did it).";

        var consolidated = Path.Combine(torchSharpDir, "cpu", "libLibTorchSharp.so");
        if (File.Exists(consolidated) && !NeedsPatch(File.ReadAllBytes(consolidated)))
            return $"{consolidated} is already patched; {Preload(Path.GetDirectoryName(consolidated)!)}";
        var source = File.Exists(consolidated) ? consolidated : PackageCopy(torchSharpDir)
            ?? throw new InvalidOperationException(
                $"TorchSharp's native library (libLibTorchSharp.so) was not found beside {torchSharpDir} nor in its NuGet package folder " +
                "(runtimes/linux-x64/native). Reference TorchSharp-cpu (in a notebook: #r \"nuget: TorchSharp-cpu, 0.107.0\") before calling Prepare.");
        var elf = File.ReadAllBytes(source);
        int weakened = ElfVersionNeed.Weaken(elf, GlibcxxVersion);
        try
        {
            Directory.CreateDirectory(Path.GetDirectoryName(consolidated)!);
            var temp = consolidated + "." + Environment.ProcessId + ".tmp";
            File.WriteAllBytes(temp, elf);
            File.Move(temp, consolidated, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new InvalidOperationException($"Could not write the patched {consolidated}: {e.Message}", e);
        }
        return $"wrote {consolidated} with {weakened} {GlibcxxVersion} version need(s) marked weak ({libstdcxx} lacks it); " +
               Preload(Path.GetDirectoryName(consolidated)!);
    }

    /// <summary>
    /// Links libtorch's files into the folder beside the patched library (TorchSharp copies them there itself otherwise) and
    /// loads libtorch_cpu from it, so that TorchSharp's lookup of "torch_cpu" by name finds this one and not another
    /// libtorch the system may have (Debian's python3-torch installs one on the loader's default path).
    /// </summary>
    private static string Preload(string folder)
    {
        if (File.ReadAllText("/proc/self/maps").Contains("libLibTorchSharp.so", StringComparison.Ordinal))
            return "TorchSharp's native library is already loaded in this process (restart the kernel or process if it failed).";
        var native = LibtorchNative(Path.GetDirectoryName(folder)!);
        if (native is not null)
            foreach (var file in Directory.GetFiles(native))
            {
                var link = Path.Combine(folder, Path.GetFileName(file));
                if (!File.Exists(link)) File.CreateSymbolicLink(link, file);
            }
        var torchCpu = Path.Combine(folder, "libtorch_cpu.so");
        if (!File.Exists(torchCpu))
            return $"libtorch_cpu.so is not in {folder} yet (TorchSharp copies it there on first use: reference TorchSharp-cpu).";
        NativeLibrary.Load(torchCpu);
        return $"TorchSharp loads it on first use (libtorch from {native ?? folder}).";
    }

    /// <summary>The libtorch-cpu package's native folder (highest version) in the NuGet packages folder above TorchSharp.dll, if any.</summary>
    private static string? LibtorchNative(string torchSharpDir)
    {
        var arch = RuntimeInformation.ProcessArchitecture == Architecture.Arm64 ? "linux-arm64" : "linux-x64";
        var roots = new List<string> { Path.GetFullPath(Path.Combine(torchSharpDir, "..", "..", "..", "..")) };   // .../packages/torchsharp/V/lib/TFM
        roots.Add(Environment.GetEnvironmentVariable("NUGET_PACKAGES") is { Length: > 0 } p ? p
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages"));
        foreach (var root in roots)
        {
            var package = Path.Combine(root, $"libtorch-cpu-{arch}");
            if (!Directory.Exists(package)) continue;
            var best = Directory.GetDirectories(package)
                .Select(d => (Dir: Path.Combine(d, "runtimes", arch, "native"), Version: Version.TryParse(Path.GetFileName(d).Split('-')[0], out var v) ? v : new Version()))
                .Where(c => File.Exists(Path.Combine(c.Dir, "libtorch_cpu.so")))
                .OrderByDescending(c => c.Version)
                .Select(c => c.Dir)
                .FirstOrDefault();
            if (best is not null) return best;
        }
        return null;
    }

    /// <summary>Whether the ELF file still has a strong need on <see cref="GlibcxxVersion"/>.</summary>
    private static bool NeedsPatch(byte[] elf) => ElfVersionNeed.Weaken((byte[])elf.Clone(), GlibcxxVersion) > 0;

    /// <summary>The package's own copy: TorchSharp.dll at .../torchsharp/VERSION/lib/TFM/ has it at .../torchsharp/VERSION/runtimes/linux-x64/native.</summary>
    private static string? PackageCopy(string torchSharpDir)
    {
        var arch = RuntimeInformation.ProcessArchitecture == Architecture.Arm64 ? "linux-arm64" : "linux-x64";
        var candidates = new List<string>
        {
            Path.Combine(torchSharpDir, "runtimes", arch, "native", "libLibTorchSharp.so"),
            Path.GetFullPath(Path.Combine(torchSharpDir, "..", "..", "runtimes", arch, "native", "libLibTorchSharp.so")),
        };
        var version = typeof(TorchSharp.torch).Assembly.GetName().Version;
        var packages = Environment.GetEnvironmentVariable("NUGET_PACKAGES") is { Length: > 0 } p ? p
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
        if (version is not null)
            candidates.Add(Path.Combine(packages, "torchsharp", $"{version.Major}.{version.Minor}.{version.Build}", "runtimes", arch, "native", "libLibTorchSharp.so"));
        return candidates.FirstOrDefault(File.Exists);
    }

    /// <summary>The libstdc++ the dynamic loader would use (the first found in the standard places).</summary>
    private static string? HostLibstdcxx() => LibstdcxxPlaces.FirstOrDefault(File.Exists);

    private static readonly string[] LibstdcxxPlaces =
    {
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6",
        "/usr/lib/aarch64-linux-gnu/libstdc++.so.6", "/lib/aarch64-linux-gnu/libstdc++.so.6",
        "/usr/lib64/libstdc++.so.6", "/lib64/libstdc++.so.6", "/usr/lib/libstdc++.so.6",
    };

    private static bool Contains(byte[] data, byte[] wanted) => data.AsSpan().IndexOf(wanted) >= 0;
}

/// <summary>
/// Marks a named version need of an ELF64 little-endian shared library weak (VER_FLG_WEAK in its .gnu.version_r
/// entries), in memory. The runtime twin of the package's build-time task (buildTransitive/Alignment.Losses.targets, which
/// MSBuild compiles on its own and so cannot share this code); a test checks that both give the same bytes.
/// </summary>
internal static class ElfVersionNeed
{
    /// <summary>Weakens every strong need on <paramref name="versionName"/>; returns how many were changed (0: nothing to do).</summary>
    /// <exception cref="ArgumentException">The bytes are not a 64-bit little-endian ELF file.</exception>
    internal static int Weaken(byte[] elf, string versionName)
    {
        if (elf.Length < 64 || elf[0] != 0x7f || elf[1] != (byte)'E' || elf[2] != (byte)'L' || elf[3] != (byte)'F' || elf[4] != 2 || elf[5] != 1)
            throw new ArgumentException("not a 64-bit little-endian ELF file.", nameof(elf));
        long sectionTable = (long)BitConverter.ToUInt64(elf, 0x28);
        int sectionSize = BitConverter.ToUInt16(elf, 0x3A), sectionCount = BitConverter.ToUInt16(elf, 0x3C);
        const uint ShtGnuVerneed = 0x6ffffffe;
        const ushort VerFlgWeak = 0x2;
        int weakened = 0;
        for (int s = 0; s < sectionCount; s++)
        {
            int header = checked((int)(sectionTable + (long)s * sectionSize));
            if (BitConverter.ToUInt32(elf, header + 4) != ShtGnuVerneed) continue;
            int entry = checked((int)BitConverter.ToUInt64(elf, header + 0x18));                 // sh_offset
            uint stringSection = BitConverter.ToUInt32(elf, header + 0x28);                     // sh_link: .dynstr
            uint needCount = BitConverter.ToUInt32(elf, header + 0x2C);                         // sh_info
            int strings = checked((int)BitConverter.ToUInt64(elf, checked((int)(sectionTable + (long)stringSection * sectionSize)) + 0x18));
            for (uint n = 0; n < needCount; n++)
            {
                int auxCount = BitConverter.ToUInt16(elf, entry + 2);                           // vn_cnt
                int aux = entry + (int)BitConverter.ToUInt32(elf, entry + 8);                   // vn_aux
                for (int a = 0; a < auxCount; a++)
                {
                    // Elf64_Vernaux: vna_hash(4) vna_flags(2) vna_other(2) vna_name(4) vna_next(4)
                    int nameStart = strings + (int)BitConverter.ToUInt32(elf, aux + 8);
                    int nameEnd = Array.IndexOf(elf, (byte)0, nameStart);
                    ushort flags = BitConverter.ToUInt16(elf, aux + 4);
                    if (Encoding.ASCII.GetString(elf, nameStart, nameEnd - nameStart) == versionName && (flags & VerFlgWeak) == 0)
                    {
                        flags |= VerFlgWeak;
                        elf[aux + 4] = (byte)flags;
                        elf[aux + 5] = (byte)(flags >> 8);
                        weakened++;
                    }
                    aux += (int)BitConverter.ToUInt32(elf, aux + 12);                           // vna_next
                }
                entry += (int)BitConverter.ToUInt32(elf, entry + 12);                           // vn_next
            }
        }
        return weakened;
    }
}
