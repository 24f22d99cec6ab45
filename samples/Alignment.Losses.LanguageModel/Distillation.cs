using System.Diagnostics;
using Alignment.Losses.Data;
using ScottPlot;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.LanguageModel;

/// <summary>
/// <c>--distill</c>: a wider teacher (width 128, 2 layers, trained twice as long) distilled into a small student (width
/// 32, 1 layer, briefly supervised), four ways from the same start: supervised only (the baseline), GKD off-policy on the
/// dataset (generalised JSD, beta 0.5, both LM heads fused), GKD on-policy on the student's own replies (reverse KL, TRL's
/// distillation trainer default), and on-policy distillation as a policy gradient (advantages sg(l_T - l_S), REINFORCE).
/// Reported: the held-out teacher-student divergence (forward and reverse KL per token) and the student's NLL, before
/// and after each.
/// </summary>
internal static class Distillation
{
    private sealed record Held(double ForwardKl, double ReverseKl, double Nll, double OnPolicyReverseKl = double.NaN);

    public static int Run(LmOptions options, Corpus corpus, List<PreferenceExample> train, List<PreferenceExample> heldOut,
        PreferenceCollator collator, Device device)
    {
        var clock = Stopwatch.StartNew();
        var rng = new Random(options.Seed);
        List<PreferenceExample> Batch(int count) => Enumerable.Range(0, count).Select(_ => train[rng.Next(train.Count)]).ToList();
        manual_seed(options.Seed);
        var teacher = new TinyTransformer(corpus.VocabularySize, width: 128, layers: 2, heads: 4, maxLength: 48).to(device);
        var student = new TinyTransformer(corpus.VocabularySize, width: 32, layers: 1, heads: 2, maxLength: 48).to(device);
        Console.WriteLine($"teacher: {Parameters(teacher):N0} parameters, student: {Parameters(student):N0}");
        Supervise(teacher, options.SftSteps, 3e-3, "teacher");
        Supervise(student, Math.Max(1, options.SftSteps / 4), 3e-3, "student");
        teacher.eval();
        var start = student.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
        var teacherHeld = Evaluate(teacher);
        var before = Evaluate(student) with { OnPolicyReverseKl = OnPolicyReverseKl() };
        Console.WriteLine($"held-out: teacher NLL/token {teacherHeld.Nll:F3}; student before: NLL {before.Nll:F3}, KL(T||S) {before.ForwardKl:F3}, KL(S||T) {before.ReverseKl:F3}, " +
                          $"KL(S||T) on its own replies {before.OnPolicyReverseKl:F3} " +
                          $"({clock.Elapsed.TotalSeconds:F0} s)");

        var runs = new (string Name, string What)[]
        {
            ("sft", "cross-entropy on the dataset only (no teacher): the baseline"),
            ("gkd", "GKD off-policy: JSD(beta 0.5) to the teacher on the dataset's replies, fused heads"),
            ("gkd_on_policy", "GKD on-policy: reverse KL to the teacher on the student's own sampled replies"),
            ("opd", "on-policy distillation: REINFORCE with advantages sg(l_T - l_S) on the student's replies"),
        };
        var results = new List<(string Name, Held After, int[] Steps, double[] Curve)>();
        foreach (var (name, what) in runs)
        {
            using (no_grad()) foreach (var (key, value) in student.state_dict()) value.copy_(start[key]);
            var (steps, curve) = Train(name);
            var after = Evaluate(student) with { OnPolicyReverseKl = OnPolicyReverseKl() };
            results.Add((name, after, steps, curve));
            Console.WriteLine($"{name}: KL(T||S) {before.ForwardKl:F3} -> {after.ForwardKl:F3}, KL(S||T) {before.ReverseKl:F3} -> {after.ReverseKl:F3}, " +
                              $"on its own replies {before.OnPolicyReverseKl:F3} -> {after.OnPolicyReverseKl:F3}, " +
                              $"NLL {before.Nll:F3} -> {after.Nll:F3}  ({what}; {clock.Elapsed.TotalSeconds:F0} s)");
        }

        File.WriteAllLines(Path.Combine(options.Output, "distill_results.csv"),
            new[] { "run,heldout_forward_kl_before,heldout_forward_kl_after,heldout_reverse_kl_before,heldout_reverse_kl_after,own_replies_reverse_kl_before,own_replies_reverse_kl_after,student_nll_before,student_nll_after,teacher_nll" }
                .Concat(results.Select(r => $"{r.Name},{before.ForwardKl:F4},{r.After.ForwardKl:F4},{before.ReverseKl:F4},{r.After.ReverseKl:F4},{before.OnPolicyReverseKl:F4},{r.After.OnPolicyReverseKl:F4},{before.Nll:F4},{r.After.Nll:F4},{teacherHeld.Nll:F4}")));
        var plot = new Plot();
        foreach (var r in results) plot.Add.Scatter(r.Steps.Select(s => (double)s).ToArray(), r.Curve).LegendText = r.Name;
        plot.Title("Held-out KL(teacher || student) per token during distillation");
        plot.XLabel("step");
        plot.YLabel("forward KL (nats per token)");
        plot.ShowLegend(Edge.Right);
        plot.SavePng(Path.Combine(options.Output, "distill_kl.png"), 1000, 560);
        Console.WriteLine($"wrote distill_results.csv and distill_kl.png to {options.Output} ({clock.Elapsed.TotalSeconds:F0} s)");
        return 0;

        (int[] Steps, double[] Curve) Train(string name)
        {
            var optimizer = optim.AdamW(student.parameters(), lr: options.DistillLearningRate);
            var loss = name switch
            {
                "sft" => new DistillationLoss(new DistillationOptions { HardWeight = 1, SoftWeight = 0 }),
                "gkd" => new DistillationLoss(DistillationOptions.TrlGkd(beta: 0.5)),
                _ => new DistillationLoss(DistillationOptions.TrlDistillation(beta: 1.0)),
            };
            var reinforce = new ReinforceLoss();
            var generator = new Generator((ulong)options.Seed + 7, device);
            var steps = new List<int> { 0 };
            var curve = new List<double> { Evaluate(student).ForwardKl };
            for (int step = 1; step <= options.Steps; step++)
            {
                using var scope = NewDisposeScope();
                Tensor ids, attention, labels;
                if (name is "sft" or "gkd")
                {
                    var b = collator.Collate(Batch(options.BatchSize), device);
                    (ids, attention, labels) = (b.InputIds, b.AttentionMask, b.Labels);
                }
                else
                {
                    var rollouts = Batch(options.BatchSize).Select(e => (Prompt: e.Prompt.ToArray(), Reply: Rollouts.Sample(student, e.Prompt, 1, generator, device)[0])).ToList();
                    (ids, attention, labels) = Rollouts.Collate(rollouts, device);
                }
                student.train();
                var hidden = student.forward(ids, attention);
                Tensor teacherHidden;
                using (no_grad()) teacherHidden = teacher.forward(ids, attention);
                optimizer.zero_grad();
                if (name == "opd")
                {
                    // the per-token log-probs of the sampled tokens under both models, then REINFORCE on sg(l_T - l_S)
                    using var studentPass = FusedLinearLogProbs.Compute(hidden, student.Head.weight!, null, labels, null, LabelAlignment.ShiftByOne);
                    using var teacherPass = FusedLinearLogProbs.Compute(teacherHidden, teacher.Head.weight!, null, labels, null, LabelAlignment.ShiftByOne);
                    using var advantages = Advantages.OnPolicyDistillation(studentPass.TokenLogProbs.detach(), teacherPass.TokenLogProbs, studentPass.TokenMask);
                    using var r = reinforce.Compute(TokenBatch.FromLogProbs(studentPass, advantages.Values));
                    r.Backward();
                }
                else
                {
                    using var r = loss.Compute(DistillationStudent.FromHead(hidden, student.Head.weight!), DistillationTeacher.FromHead(teacherHidden, teacher.Head.weight!),
                        labels, null, LabelAlignment.ShiftByOne);
                    r.Backward();
                }
                optimizer.step();
                if (step % options.LogEvery == 0 || step == options.Steps)
                {
                    steps.Add(step);
                    curve.Add(Evaluate(student).ForwardKl);
                }
            }
            return (steps.ToArray(), curve.ToArray());
        }

        // held-out replies (chosen and rejected): KL(T || S), KL(S || T) and the NLL per reply token, fused heads, no grad
        Held Evaluate(TinyTransformer model)
        {
            model.eval();
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            using var b = collator.Collate(heldOut, device);
            var s = DistillationStudent.FromHead(model.forward(b.InputIds, b.AttentionMask), model.Head.weight!);
            var t = DistillationTeacher.FromHead(teacher.forward(b.InputIds, b.AttentionMask), teacher.Head.weight!);
            double Divergence(TokenDivergence d)
            {
                using var r = new DistillationLoss(new DistillationOptions { Divergence = d }).Compute(s, t, b.Labels, null, LabelAlignment.ShiftByOne);
                return r.Loss.ToDouble();
            }
            using var forward = new DistillationLoss(new DistillationOptions { Divergence = TokenDivergence.ForwardKl() }).Compute(s, t, b.Labels, null, LabelAlignment.ShiftByOne);
            return new Held(forward.Loss.ToDouble(), Divergence(TokenDivergence.ReverseKl()), forward[MetricNames.DistillationCrossEntropy]);
        }

        // KL(S || T) per token on replies the student samples to the held-out prompts (the quantity on-policy methods lower)
        double OnPolicyReverseKl()
        {
            var generator = new Generator((ulong)options.Seed + 99, device);
            var rollouts = heldOut.Select(e => (Prompt: e.Prompt.ToArray(), Reply: Rollouts.Sample(student, e.Prompt, 1, generator, device)[0])).ToList();
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var (ids, attention, labels) = Rollouts.Collate(rollouts, device);
            using var r = new DistillationLoss(new DistillationOptions { Divergence = TokenDivergence.ReverseKl() }).Compute(
                DistillationStudent.FromHead(student.forward(ids, attention), student.Head.weight!), DistillationTeacher.FromHead(teacher.forward(ids, attention), teacher.Head.weight!),
                labels, null, LabelAlignment.ShiftByOne);
            return r.Loss.ToDouble();
        }

        void Supervise(TinyTransformer m, int steps, double lr, string what)
        {
            var optimizer = optim.AdamW(m.parameters(), lr: lr);
            m.train();
            for (int step = 1; step <= steps; step++)
            {
                using var scope = NewDisposeScope();
                using var b = collator.Collate(Batch(options.BatchSize), device);
                using var logps = FusedLinearLogProbs.Compute(m.forward(b.InputIds, b.AttentionMask), m.Head.weight!, null, b.Labels, null, LabelAlignment.ShiftByOne);
                var nll = -logps.Sum.sum() / logps.TokenCounts.sum();
                optimizer.zero_grad();
                nll.backward();
                optimizer.step();
            }
            Console.WriteLine($"{what}: {steps} supervised steps ({clock.Elapsed.TotalSeconds:F0} s)");
        }
    }

    private static long Parameters(TinyTransformer m) => m.parameters().Sum(p => p.numel());
}
