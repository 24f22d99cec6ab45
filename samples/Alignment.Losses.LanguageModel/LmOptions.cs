using System.Globalization;

namespace Alignment.Losses.LanguageModel;

/// <summary>Command-line options of the language-model sample.</summary>
internal sealed record LmOptions
{
    public IReadOnlyList<string> Losses { get; init; } = new[] { "dpo", "rpo" };
    public int SftSteps { get; init; } = 300;
    public int Steps { get; init; } = 200;
    public int BatchSize { get; init; } = 16;
    public int LogEvery { get; init; } = 20;
    public double Beta { get; init; } = 0.1;
    public double LearningRate { get; init; } = 1e-4;
    public int Seed { get; init; } = 1;
    public string Device { get; init; } = "cpu";
    public string Output { get; init; } = "lm-output";
    /// <summary>ORPO's NLL tokens: TRL's prompt and completion (default), or the completion only (--disable_prompt_loss).</summary>
    public bool OrpoPromptLoss { get; init; } = true;
    /// <summary>--distill: distil a wider teacher into a small student instead of aligning (see Distillation.cs).</summary>
    public bool Distill { get; init; }
    public double DistillLearningRate { get; init; } = 1e-3;
    /// <summary>--threads N: libtorch's intra-op threads (0: its default).</summary>
    public int Threads { get; init; }

    private const string Help = """
        Aligns a small causal transformer on a polite-vs-rude preference dataset with the library end to end:
        Microsoft.ML.Tokenizers (cl100k_base) -> PreferenceCollator -> ReferenceLogProbCache -> FusedLinearLogProbs -> loss.

        options:
          --losses a,b,...   dpo, rpo, any TRL DPO loss_type (sigmoid, ipo, hinge, robust, exo_pair, ...), or an objective of
                             TRL's other trainers (cpo, simpo, alphapo, orpo, kto, apo_zero_unpaired, bco), or an online
                             policy-gradient objective (grpo, dapo, dr_grpo, gspo, cispo, sapo, gmpo, rloo, reinforce, ...):
                             4 replies sampled per prompt, rewarded by the politeness judge, k3 KL to the SFT model with
                             beta --beta (default dpo,rpo)
          --sft-steps N      supervised steps before alignment (default 300)
          --steps N          alignment steps per loss (default 200)
          --batch N          pairs per step (default 16; online RL: N / 4 prompts x 4 replies)
          --beta X           beta of the losses (default 0.1)
          --lr X             alignment learning rate (default 1e-4)
          --seed N           seed (default 1)
          --device cpu|cuda  where to train (default cpu)
          --output DIR       output folder (default lm-output; --out also works)
          --quick            a short run for tests (sft 80, steps 40)
          --distill          instead of aligning: distil a wider teacher (width 128, trained 2 x --sft-steps) into a small
                             student (width 32, --sft-steps / 4 supervised steps) four ways for --steps each: sft only,
                             GKD off-policy (JSD 0.5), GKD on-policy (reverse KL), on-policy distillation (REINFORCE);
                             writes distill_results.csv and distill_kl.png
          --distill-lr X     the distillation runs' learning rate (default 1e-3)
          --threads N        libtorch's CPU threads (default: its own choice; give 1 per rank under mpiexec)
          --orpo-nll all|completion
                             ORPO's NLL over prompt and completion (all: TRL's and the authors' default) or over the
                             completion only (the authors' --disable_prompt_loss) (default all)

        data-parallel: launched by mpiexec (mpiexec.mpich -n 2 dotnet Alignment.Losses.LanguageModel.dll --threads 1 ...),
        each rank trains the offline losses on its shard of every step's batch (pair i on rank i % world): the loss runs
        over the whole batch (loss.AcrossRanks), gradients are averaged over MPI, rank 0 prints and writes the outputs
        (the other ranks write theirs under DIR/rank-R). loss-curve.csv is the same as one process's to rounding.
        """;

    public static LmOptions? Parse(string[] args)
    {
        var o = new LmOptions();
        try
        {
            for (int i = 0; i < args.Length; i++)
            {
                string Next() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
                int Int() { var s = Next(); return int.TryParse(s, CultureInfo.InvariantCulture, out var v) && v > 0 ? v : throw new ArgumentException($"{args[i - 1]} needs a positive integer; got {s}"); }
                double Real() { var s = Next(); return double.TryParse(s, CultureInfo.InvariantCulture, out var v) && v > 0 ? v : throw new ArgumentException($"{args[i - 1]} needs a positive number; got {s}"); }
                o = args[i] switch
                {
                    "--losses" or "--loss" => o with { Losses = Next().Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) },
                    "--sft-steps" => o with { SftSteps = Int() },
                    "--steps" => o with { Steps = Int() },
                    "--batch" => o with { BatchSize = Int() },
                    "--beta" => o with { Beta = Real() },
                    "--lr" => o with { LearningRate = Real() },
                    "--seed" => o with { Seed = Int() },
                    "--device" => o with { Device = Next() is var d && d is "cpu" or "cuda" ? d : throw new ArgumentException("--device must be cpu or cuda") },
                    "--output" or "--out" => o with { Output = Next() },
                    "--orpo-nll" => o with { OrpoPromptLoss = Next() switch { "all" => true, "completion" => false, var v => throw new ArgumentException($"--orpo-nll must be all or completion; got {v}") } },
                    "--distill" => o with { Distill = true },
                    "--distill-lr" => o with { DistillLearningRate = Real() },
                    "--threads" => o with { Threads = Int() is var t && t >= 1 ? t : throw new ArgumentException("--threads must be >= 1") },
                    "--quick" => o with { SftSteps = 80, Steps = 40, LogEvery = 10 },
                    "--help" or "-h" => throw new OperationCanceledException(),
                    _ => throw new ArgumentException($"unknown option {args[i]}"),
                };
            }
            foreach (var name in o.Losses)
                if (name is not ("rpo" or "dpo") && !Alignment.Losses.TrlLosses.LossTypes.Contains(name) && !Alignment.Losses.TrlLosses.TrainerObjectives.Contains(name)
                    && !Alignment.Losses.PolicyLosses.Names.Contains(name))
                    throw new ArgumentException($"unknown loss {name}; use dpo, rpo, one of TRL's DPO loss types ({string.Join(", ", Alignment.Losses.TrlLosses.LossTypes)}) " +
                                                $"or one of its other trainers' objectives ({string.Join(", ", Alignment.Losses.TrlLosses.TrainerObjectives)}), " +
                                                $"or an online policy-gradient objective ({string.Join(", ", Alignment.Losses.PolicyLosses.Names)})");
            if (o.Device == "cuda" && !TorchSharp.torch.cuda.is_available())
                throw new ArgumentException("--device cuda: no CUDA device is available to TorchSharp here");
            return o;
        }
        catch (OperationCanceledException)
        {
            Console.WriteLine(Help);
            return null;
        }
        catch (ArgumentException e)
        {
            Console.Error.WriteLine($"error: {e.Message}\n\n{Help}");
            return null;
        }
    }
}
