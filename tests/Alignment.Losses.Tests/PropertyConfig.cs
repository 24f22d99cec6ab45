using FsCheck;
using Microsoft.FSharp.Core;

namespace Alignment.Losses.Tests;

/// <summary>
/// FsCheck configuration shared by the property tests. CI is deterministic: a fixed seed unless
/// ALIGNMENT_LOSSES_FSCHECK_SEED is set (to a number, or to "random" to explore new cases locally).
/// A failure prints its replay seed and the shrunk counterexample either way.
/// </summary>
public static class PropertyConfig
{
    public static Config Quick(int maxTest)
    {
        var config = Config.QuickThrowOnFailure.WithMaxTest(maxTest);
        var env = Environment.GetEnvironmentVariable("ALIGNMENT_LOSSES_FSCHECK_SEED");
        if (string.Equals(env, "random", StringComparison.OrdinalIgnoreCase)) return config;
        ulong seed = ulong.TryParse(env, out var s) ? s : 20261123UL;
        return config.WithReplay(FSharpOption<Replay>.Some(new Replay(new Rnd(seed, 0x9E3779B97F4A7C15UL), FSharpOption<int>.None)));
    }
}
