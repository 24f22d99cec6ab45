using System.Diagnostics;
using System.Text;

namespace Alignment.Losses.Tests;

/// <summary>Runs dotnet CLI commands from tests (the package consumer, scripts, the playground).</summary>
public static class ProcessRunner
{
    public static string RepoRoot { get; } = FindRoot();

    static string FindRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "Alignment.Losses.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("Alignment.Losses.sln not found above " + AppContext.BaseDirectory);
    }

    public sealed record Result(int ExitCode, string Output);

    public static Result Dotnet(string workingDirectory, TimeSpan timeout, params string[] args)
    {
        if (args.Length < 2 || args[0] != "run" || !args[1].EndsWith(".cs", StringComparison.Ordinal)) return Run("dotnet", workingDirectory, timeout, args);
        // A file-based app builds into a cache folder per script path (~0.5 GB with libtorch), which the SDK never removes:
        // from a fresh clone or a temporary folder every run would leave a new one behind. Remove the ones this run made.
        var before = RunFileCaches();
        try { return Run("dotnet", workingDirectory, timeout, args); }
        finally
        {
            foreach (var dir in RunFileCaches().Except(before))
                try { Directory.Delete(dir, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }

    /// <summary>The SDK's build folders of file-based apps (LocalApplicationData/dotnet/runfile/NAME-HASH).</summary>
    static HashSet<string> RunFileCaches()
    {
        var root = Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.LocalApplicationData), "dotnet", "runfile");
        return Directory.Exists(root) ? Directory.GetDirectories(root).ToHashSet() : new HashSet<string>();
    }

    /// <summary>Runs <paramref name="program"/> with its output and error captured together.</summary>
    /// <summary>Where <c>dotnet tool install -g</c> puts tools.</summary>
    public static string GlobalToolsFolder { get; } = Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".dotnet", "tools");

    public static Result Run(string program, string workingDirectory, TimeSpan timeout, params string[] args)
    {
        var psi = new ProcessStartInfo(program) { WorkingDirectory = workingDirectory, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args) psi.ArgumentList.Add(a);
        // the test host runs under `dotnet test`; its MSBuild variables must not leak into a nested build
        foreach (var key in psi.Environment.Keys.Where(k => k.StartsWith("MSBUILD", StringComparison.OrdinalIgnoreCase)).ToList())
            psi.Environment.Remove(key);
        // dotnet's global tools (the .NET Interactive kernel that Jupyter starts as `dotnet interactive`) live here; a login
        // shell adds the folder to PATH, a test host may not have it
        if (Directory.Exists(GlobalToolsFolder) && !(psi.Environment["PATH"] ?? "").Split(Path.PathSeparator).Contains(GlobalToolsFolder))
            psi.Environment["PATH"] = (psi.Environment["PATH"] is { Length: > 0 } path ? path + Path.PathSeparator : "") + GlobalToolsFolder;
        psi.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        psi.Environment["DOTNET_NOLOGO"] = "1";
        var output = new StringBuilder();
        using var p = new Process { StartInfo = psi };
        p.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        p.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        p.Start();
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(entireProcessTree: true);
            return new Result(-1, $"timed out after {timeout}: {program} {string.Join(' ', args)}\n{output}");
        }
        p.WaitForExit();
        return new Result(p.ExitCode, output.ToString());
    }

    public static string Ok(Result r, string what)
    {
        Assert.True(r.ExitCode == 0, $"{what} failed with exit code {r.ExitCode}:\n{Tail(r.Output)}");
        return r.Output;
    }

    static string Tail(string s) => s.Length > 6000 ? "..." + s[^6000..] : s;
}

[CollectionDefinition("Processes", DisableParallelization = true)]
public sealed class ProcessesCollection : ICollectionFixture<PackageFixture> { }

/// <summary>Packs Alignment.Losses once, with a unique version, into a local folder feed.</summary>
public sealed class PackageFixture : IDisposable
{
    public PackageFixture()
    {
        Version = $"0.1.0-test.{DateTime.UtcNow:yyyyMMddHHmmss}{Environment.ProcessId}";
        Root = Directory.CreateTempSubdirectory("alignment-losses-pkg-").FullName;
        Feed = Path.Combine(Root, "feed");
        // the core package, and the extra packages (Microsoft.Extensions.Logging sink, MPI collectives) that depend on it
        foreach (var project in new[] { "src/Alignment.Losses/Alignment.Losses.csproj", "src/Alignment.Losses.Logging/Alignment.Losses.Logging.csproj",
                     "src/Alignment.Losses.Mpi/Alignment.Losses.Mpi.csproj" })
        {
            var r = ProcessRunner.Dotnet(ProcessRunner.RepoRoot, TimeSpan.FromMinutes(5), "pack", project, "-c", "Release", "-o", Feed, $"-p:Version={Version}");
            PackOutput += r.Output;
            PackExitCode = PackExitCode != 0 ? PackExitCode : r.ExitCode;
        }
    }

    public string Version { get; }
    public string Root { get; }
    public string Feed { get; }
    public string PackOutput { get; } = "";
    public int PackExitCode { get; }
    public string Package => Path.Combine(Feed, $"Alignment.Losses.{Version}.nupkg");
    public string LoggingPackage => Path.Combine(Feed, $"Alignment.Losses.Logging.{Version}.nupkg");
    public string MpiPackage => Path.Combine(Feed, $"Alignment.Losses.Mpi.{Version}.nupkg");

    public void EnsurePacked() => Assert.True(PackExitCode == 0, "dotnet pack failed:\n" + PackOutput);

    /// <summary>A fresh folder outside the repository, with a NuGet.config that adds the local feed to the machine's sources.</summary>
    public string NewConsumerFolder(string name)
    {
        var dir = Path.Combine(Root, name);
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "NuGet.config"), $"""
            <?xml version="1.0" encoding="utf-8"?>
            <configuration>
              <packageSources>
                <add key="alignment-losses-local" value="{Feed}" />
              </packageSources>
            </configuration>
            """);
        return dir;
    }

    public void Dispose()
    {
        try { Directory.Delete(Root, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}
