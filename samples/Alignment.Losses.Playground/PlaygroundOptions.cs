using System.Globalization;

namespace Alignment.Losses.Playground;

/// <summary>Command-line options of the playground.</summary>
internal sealed record PlaygroundOptions
{
    public IReadOnlySet<string> Losses { get; init; } = new HashSet<string>();
    public IReadOnlySet<string> Groups { get; init; } = new HashSet<string>();
    public int Steps { get; init; } = 300;
    public int Seed { get; init; } = 7;
    public string Device { get; init; } = "cpu";
    public string OutputDirectory { get; init; } = "playground-output";
    public int BatchSize { get; init; } = 64;
    public double LearningRate { get; init; } = 0.05;
    public double LabelNoise { get; init; }
    public bool Help { get; init; }

    /// <summary>The help text, with the groups and loss names of the catalogue.</summary>
    public static string HelpText => HelpTemplate
        .Replace("{GROUPS}", string.Join(", ", Trainer.Catalogue(new PlaygroundOptions()).Select(r => r.Group).Distinct().Append("rl")), StringComparison.Ordinal)
        .Replace("{LOSSES}", string.Join(Environment.NewLine + "                                 ", Trainer.Catalogue(new PlaygroundOptions())
            .GroupBy(r => r.Group).Select(g => $"{g.Key}: {string.Join(", ", g.Select(r => r.Name))}")
            .Append($"rl: {string.Join(", ", RlTrainer.Catalogue().Select(r => r.Name))}")), StringComparison.Ordinal);

    private const string HelpTemplate = """
        Alignment playground: aligns a small tabular policy with every loss in Alignment.Losses on built-in synthetic
        preference data and prints, per loss, the policy's reward, its win-rate against the reference, its KL to the
        reference and its distance to the optimum the paper proves (where there is one). The rl group trains the
        policy-gradient objectives online (GRPO, DAPO, Dr. GRPO, GSPO, CISPO, SAPO, GMPO, RLOO, REINFORCE) on a
        verifiable-reward task: sample 8 completions per prompt, reward them by rule, update (rl_results.csv).

        Usage: dotnet run --project samples/Alignment.Losses.Playground -- [options]

        Options:
          --losses NAME[,NAME...] losses to train (default: all; --loss also works), by group:
                                 {LOSSES}
          --group NAME[,NAME...] train the losses of these groups only ({GROUPS}); each group gets its own
                                 section of the table and its own reward-curve plot
          --steps N              optimisation steps per loss (default 300; the rl group: N / 2 generation steps of 2 updates)
          --quick                a fast run: 60 steps (what the tests use)
          --seed N               seed of the data and the training (default 7); CPU runs are deterministic
          --device cpu|cuda      where to train (default cpu)
          --output DIR           output folder for results.csv, curves.csv and the PNG plots (default playground-output;
                                 --out also works)
          --batch N              preference pairs per step (default 64)
          --lr X                 Adam learning rate (default 0.05)
          --label-noise X        probability that a preference label is flipped, in [0, 0.5) (default 0)
          --help                 this text
        """;

    public static PlaygroundOptions Parse(string[] args)
    {
        var o = new PlaygroundOptions();
        for (int i = 0; i < args.Length; i++)
        {
            string Value() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value.");
            int Int(string v, int min) => int.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture, out var n) && n >= min
                ? n : throw new ArgumentException($"{args[i - 1]} expects an integer >= {min}; got '{v}'.");
            double Dbl(string v) => double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var d)
                ? d : throw new ArgumentException($"{args[i - 1]} expects a number; got '{v}'.");
            switch (args[i])
            {
                case "--help" or "-h": o = o with { Help = true }; break;
                case "--losses" or "--loss": o = o with { Losses = Value().Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToHashSet() }; break;
                case "--group": o = o with { Groups = Value().Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToHashSet() }; break;
                case "--steps": o = o with { Steps = Int(Value(), 1) }; break;
                case "--quick": o = o with { Steps = 60 }; break;
                case "--seed": o = o with { Seed = Int(Value(), 0) }; break;
                case "--device":
                    var d = Value();
                    o = d is "cpu" or "cuda" ? o with { Device = d } : throw new ArgumentException($"--device must be cpu or cuda; got '{d}'.");
                    break;
                case "--output" or "--out": o = o with { OutputDirectory = Value() }; break;
                case "--batch": o = o with { BatchSize = Int(Value(), 2) }; break;
                case "--lr":
                    var lr = Dbl(Value());
                    o = lr > 0 ? o with { LearningRate = lr } : throw new ArgumentException("--lr must be > 0.");
                    break;
                case "--label-noise":
                    var n = Dbl(Value());
                    o = n is >= 0 and < 0.5 ? o with { LabelNoise = n } : throw new ArgumentException("--label-noise must lie in [0, 0.5).");
                    break;
                default: throw new ArgumentException($"unknown option '{args[i]}'.");
            }
        }
        return o;
    }
}
