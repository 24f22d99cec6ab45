using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>How GRPO scales the centred rewards (TRL scale_rewards).</summary>
public enum RewardScaling
{
    /// <summary>Divide by the group's standard deviation (TRL default "group"; the GRPO paper).</summary>
    Group,

    /// <summary>Divide by the whole batch's standard deviation (TRL "batch"; Liu et al.'s robust variant).</summary>
    Batch,

    /// <summary>No scaling: A = r - mean (TRL "none"; Dr. GRPO).</summary>
    None,
}

/// <summary>What a group with a single scorable completion gets.</summary>
public enum SingletonGroup
{
    /// <summary>A = 0: no relative signal (TRL: the undefined std gives NaN, then 0).</summary>
    Zero,

    /// <summary>mean 0, std 1, so A = r / (1 + eps) (verl).</summary>
    RawReward,
}

/// <summary>
/// Options of <see cref="Advantages.Grpo"/>. Defaults are TRL's: eps 1e-4, Bessel-corrected std, group scaling, group
/// mean baseline, a singleton group gets 0. verl: eps 1e-6, <see cref="SingletonGroup.RawReward"/>; OpenRLHF eps 1e-9;
/// NeMo-RL: <see cref="LeaveOneOut"/> with eps 1e-6.
/// </summary>
public sealed record GrpoAdvantageOptions
{
    private double _epsilon = 1e-4;
    private RewardScaling _scaling = RewardScaling.Group;
    private SingletonGroup _singleton = SingletonGroup.Zero;

    /// <summary>eps in A = (r - mean) / (std + eps). Default 1e-4 (TRL).</summary>
    public double Epsilon
    {
        get => _epsilon;
        init => _epsilon = value > 0 && double.IsFinite(value) ? value : throw new ArgumentOutOfRangeException(nameof(Epsilon), value, "eps must be positive and finite.");
    }

    /// <summary>Whether the std is Bessel-corrected (divides by n - 1). Default true (TRL, verl: torch.std).</summary>
    public bool BesselCorrection { get; init; } = true;

    /// <summary>The scaling. Default <see cref="RewardScaling.Group"/>.</summary>
    public RewardScaling Scaling { get => _scaling; init => _scaling = Guard.Defined(value, nameof(Scaling)); }

    /// <summary>
    /// NeMo-RL's leave-one-out statistics: completion i's baseline is the mean of its group's other rewards, and (with group
    /// scaling) its std the others' std. [1, 0, 0, 1] gives ±1.154699 (eps 1e-6). Default false. A completion with fewer
    /// than two scorable siblings has no leave-one-out std and gets 0 under group scaling.
    /// </summary>
    public bool LeaveOneOut { get; init; }

    /// <summary>A group with one scorable completion. Default <see cref="SingletonGroup.Zero"/> (TRL).</summary>
    public SingletonGroup SingletonGroup { get => _singleton; init => _singleton = Guard.Defined(value, nameof(SingletonGroup)); }
}

/// <summary>Options of <see cref="Advantages.ReinforcePlusPlus"/>.</summary>
public sealed record ReinforcePlusPlusOptions
{
    private double _gamma = 1.0;

    /// <summary>gamma, the discount of the returns G_t = r_t + gamma G_{t+1}. Default 1.</summary>
    public double Gamma { get => _gamma; init => _gamma = Guard.InClosedRange(value, 0, 1, nameof(Gamma)); }

    /// <summary>REINFORCE++-baseline: subtract each group's mean sequence reward first (null: plain REINFORCE++).</summary>
    public GroupIds? Baseline { get; init; }

    /// <summary>Per-token rewards [N, T] added to the sequence reward at the last token (e.g. -beta * KL_t, OpenRLHF's); null: none.</summary>
    public Tensor? TokenRewards { get; init; }
}

/// <summary>Options of <see cref="Advantages.Gae"/>: gamma, lambda and the whitening (verl's defaults 1.0, 1.0, on).</summary>
public sealed record GaeOptions
{
    private double _gamma = 1.0, _lambda = 1.0;

    /// <summary>gamma, the discount. Default 1 (verl).</summary>
    public double Gamma { get => _gamma; init => _gamma = Guard.InClosedRange(value, 0, 1, nameof(Gamma)); }

    /// <summary>lambda, the GAE trace decay. Default 1 (verl; PPO papers often use 0.95).</summary>
    public double Lambda { get => _lambda; init => _lambda = Guard.InClosedRange(value, 0, 1, nameof(Lambda)); }

    /// <summary>Whiten the advantages over the batch's valid tokens, (A - mu) / sqrt(var_unbiased + 1e-8). Default true (verl).</summary>
    public bool Whiten { get; init; } = true;
}

/// <summary>
/// The advantage estimators of the policy-gradient family, as pure functions of rewards and group ids (and masks): no
/// gradient, NaN rewards (unscorable completions) excluded from every statistic and given advantage 0.
/// </summary>
/// <remarks>
/// <para>The statistics are computed in float64 on the host (rewards are one number per completion); the advantages come
/// back on the rewards' device in float32 (float64 for float64 rewards), owned by the returned <see cref="AdvantageResult"/>.
/// Anchors' test values, rewards [1, 0, 0, 1] in one group: GRPO ±0.865875 (eps 1e-4), ±0.866024 (1e-6), ±0.866025
/// (1e-9); leave-one-out ±1.154699; Dr. GRPO ±0.5; RLOO ±0.666667.</para>
/// </remarks>
public static class Advantages
{
    /// <summary>
    /// GRPO (Shao et al. 2024, arXiv 2402.03300): A_i = (r_i - mean_g) / (std_g + eps), with TRL's scale_rewards and the
    /// anchors' conventions as options.
    /// </summary>
    /// <param name="rewards">r [N] (NaN = unscorable).</param>
    /// <param name="groups">Which completions share a prompt.</param>
    /// <param name="options">Conventions (TRL's by default).</param>
    public static AdvantageResult Grpo(Tensor rewards, GroupIds groups, GrpoAdvantageOptions? options = null)
    {
        options ??= new GrpoAdvantageOptions();
        var (r, device, dtype) = ReadRewards(rewards, nameof(rewards));
        ArgumentNullException.ThrowIfNull(groups);
        var (group, count) = groups.Resolve(r.Length, nameof(rewards));
        var members = Members(group, count, r);
        var a = new double[r.Length];
        double batchStd = Std(r.Where(x => !double.IsNaN(x)).ToArray(), options.BesselCorrection);
        foreach (var rows in members)
        {
            int n = rows.Length;
            if (n == 0) continue;
            if (n == 1)
            {
                int i = rows[0];
                a[i] = options.SingletonGroup == SingletonGroup.Zero ? 0
                    : options.Scaling == RewardScaling.None ? r[i] : r[i] / (1 + options.Epsilon);
                continue;
            }
            var values = rows.Select(i => r[i]).ToArray();
            double sum = values.Sum(), mean = sum / n, std = Std(values, options.BesselCorrection);
            foreach (int i in rows)
            {
                double baseline = options.LeaveOneOut ? (sum - r[i]) / (n - 1) : mean;
                double centred = r[i] - baseline;
                double scale = options.Scaling switch
                {
                    RewardScaling.None => double.NaN,
                    RewardScaling.Batch => batchStd,
                    _ => options.LeaveOneOut ? Std(rows.Where(j => j != i).Select(j => r[j]).ToArray(), options.BesselCorrection) : std,
                };
                a[i] = options.Scaling == RewardScaling.None ? centred
                    : double.IsNaN(scale) ? 0 : centred / (scale + options.Epsilon);
            }
        }
        return Result(a, r, members, options.Scaling == RewardScaling.Batch ? batchStd : null, device, dtype);
    }

    /// <summary>Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): A_i = r_i - mean_g, no std scaling. [1, 0, 0, 1] → ±0.5.</summary>
    public static AdvantageResult DrGrpo(Tensor rewards, GroupIds groups) =>
        Grpo(rewards, groups, new GrpoAdvantageOptions { Scaling = RewardScaling.None });

    /// <summary>
    /// RLOO (Ahmadian et al. 2024, arXiv 2402.14740): A_i = r_i - (sum_g r - r_i) / (n_g - 1) = n/(n-1) (r_i - mean_g) over the
    /// group's scorable completions (0 for a group of one). [1, 0, 0, 1] → ±0.666667. TRL's RLOOTrainer subtracts
    /// beta * sum_t (l_old - l_ref) from each reward first: pass that as <paramref name="sequenceKl"/> with <paramref name="beta"/>.
    /// </summary>
    /// <param name="rewards">r [N] (NaN = unscorable).</param>
    /// <param name="groups">Which completions share a prompt.</param>
    /// <param name="normalize">TRL normalize_advantages: (A - mean A) / (std A + 1e-4) over the batch. Default false.</param>
    /// <param name="sequenceKl">Optional [N] per-sequence KL estimate sum_t m (l_old - l_ref) (k1), subtracted as beta * KL.</param>
    /// <param name="beta">The KL coefficient (TRL RLOO default 0.05); used with <paramref name="sequenceKl"/>.</param>
    public static AdvantageResult Rloo(Tensor rewards, GroupIds groups, bool normalize = false, Tensor? sequenceKl = null, double beta = 0.05)
    {
        var (r, device, dtype) = ReadRewards(rewards, nameof(rewards));
        ArgumentNullException.ThrowIfNull(groups);
        if (sequenceKl is not null)
        {
            if (!(beta >= 0 && double.IsFinite(beta))) throw new ArgumentOutOfRangeException(nameof(beta), beta, "beta must be finite and >= 0.");
            var (kl, _, _) = ReadRewards(sequenceKl, nameof(sequenceKl));
            if (kl.Length != r.Length)
                throw new ArgumentException($"sequenceKl has {kl.Length} entries but rewards has {r.Length}; give one KL per completion.", nameof(sequenceKl));
            if (kl.Any(double.IsNaN)) throw new ArgumentException("sequenceKl holds NaN; the KL estimate of every completion must be finite.", nameof(sequenceKl));
            for (int i = 0; i < r.Length; i++) r[i] -= beta * kl[i];
        }
        var (group, count) = groups.Resolve(r.Length, nameof(rewards));
        var members = Members(group, count, r);
        var a = new double[r.Length];
        var scorable = new List<int>();
        foreach (var rows in members)
        {
            int n = rows.Length;
            double sum = rows.Sum(i => r[i]);
            foreach (int i in rows)
            {
                a[i] = n > 1 ? r[i] - (sum - r[i]) / (n - 1) : 0;
                if (n > 1) scorable.Add(i);
            }
        }
        if (normalize)
        {
            var values = scorable.Select(i => a[i]).ToArray();
            double mean = values.Length > 0 ? values.Average() : 0, std = Std(values, bessel: true);
            foreach (int i in scorable) a[i] = double.IsNaN(std) ? 0 : (a[i] - mean) / (std + 1e-4);
        }
        return Result(a, r, members, null, device, dtype);
    }

    /// <summary>
    /// REINFORCE++ (Hu 2025, arXiv 2501.03262) and REINFORCE++-baseline: per-token returns G_t = r_t + gamma G_{t+1}, with the
    /// sequence reward at the sequence's last valid token (and optional per-token rewards), whitened over every valid token
    /// of the batch: (G - mu) / sqrt(var_unbiased + 1e-8). The baseline variant subtracts each group's mean reward first.
    /// </summary>
    /// <param name="rewards">r [N] sequence rewards (NaN = unscorable: its tokens get 0 and stay out of the statistics).</param>
    /// <param name="mask">m [N, T] (padded layout): nonzero where a token counts.</param>
    /// <param name="options">gamma, the baseline groups, token rewards.</param>
    /// <returns>Token advantages [N, T] (0 where no token counts).</returns>
    public static AdvantageResult ReinforcePlusPlus(Tensor rewards, Tensor mask, ReinforcePlusPlusOptions? options = null)
    {
        options ??= new ReinforcePlusPlusOptions();
        var (r, device, dtype) = ReadRewards(rewards, nameof(rewards));
        Guard.Usable(mask, nameof(mask));
        if (mask.dim() != 2 || mask.shape[0] != r.Length)
            throw new ArgumentException($"mask must be [{r.Length}, T] (one row per completion); got {Guard.Shape(mask)}.", nameof(mask));
        long t = mask.shape[1];
        bool[] valid;
        using (var scope = NewDisposeScope()) valid = (mask != 0).cpu().data<bool>().ToArray();
        double[]? tokenRewards = null;
        if (options.TokenRewards is { } tr)
        {
            Guard.Usable(tr, "options.TokenRewards");
            if (!tr.shape.SequenceEqual(mask.shape))
                throw new ArgumentException($"options.TokenRewards must have the mask's shape {Guard.Shape(mask)}; got {Guard.Shape(tr)}.", "options.TokenRewards");
            tokenRewards = HostDoubles(tr);
        }
        var seq = (double[])r.Clone();
        List<int[]>? members = null;
        if (options.Baseline is { } baseline)
        {
            var (group, count) = baseline.Resolve(r.Length, nameof(rewards));
            members = Members(group, count, r);
            foreach (var rows in members)
            {
                if (rows.Length == 0) continue;
                double mean = rows.Average(i => r[i]);
                foreach (int i in rows) seq[i] = r[i] - mean;
            }
        }
        var g = new double[r.Length * t];
        for (int i = 0; i < r.Length; i++)
        {
            if (double.IsNaN(r[i])) continue;
            long last = -1;
            for (long k = t - 1; k >= 0; k--) if (valid[i * t + k]) { last = k; break; }
            if (last < 0) continue;
            double running = 0;
            for (long k = last; k >= 0; k--)
            {
                long at = i * t + k;
                double reward = (valid[at] && tokenRewards is not null ? tokenRewards[at] : 0) + (k == last ? seq[i] : 0);
                running = reward + options.Gamma * running;
                if (valid[at]) g[at] = running;
            }
        }
        var used = Enumerable.Range(0, g.Length).Where(k => valid[k] && !double.IsNaN(r[k / t])).ToArray();
        if (tokenRewards is not null && used.Any(k => !double.IsFinite(tokenRewards[k])))
            throw new ArgumentException("options.TokenRewards holds NaN or Inf at valid tokens.", "options.TokenRewards");
        double mu = used.Length > 0 ? used.Average(k => g[k]) : 0;
        double variance = used.Length > 1 ? used.Sum(k => (g[k] - mu) * (g[k] - mu)) / (used.Length - 1) : 0;
        var a = new double[g.Length];
        foreach (int k in used) a[k] = (g[k] - mu) / Math.Sqrt(variance + 1e-8);
        members ??= Members(new int[r.Length], 1, r);
        return Result(a, r, members, null, device, dtype, new[] { (long)r.Length, t });
    }

    /// <summary>
    /// GDPO (arXiv 2601.05242; TRL multi_objective_aggregation "normalize_then_sum"): each of K rewards is normalised within
    /// its group ((r - mean) / (std + 1e-4), Bessel), the weighted sum is taken, and that is normalised over the batch.
    /// </summary>
    /// <param name="rewards">[N, K] one column per reward function (NaN = that function could not score it).</param>
    /// <param name="groups">Which completions share a prompt.</param>
    /// <param name="weights">One weight per reward function (TRL reward_weights); null: 1 each.</param>
    public static AdvantageResult Gdpo(Tensor rewards, GroupIds groups, IReadOnlyList<double>? weights = null)
    {
        Guard.Usable(rewards, nameof(rewards));
        if (rewards.dim() != 2 || rewards.shape[1] < 1)
            throw new ArgumentException($"rewards must be [N, K] (one column per reward function); got {Guard.Shape(rewards)}.", nameof(rewards));
        ArgumentNullException.ThrowIfNull(groups);
        Guard.Floating(rewards, nameof(rewards));
        long n = rewards.shape[0], k = rewards.shape[1];
        if (weights is not null && weights.Count != k)
            throw new ArgumentException($"weights has {weights.Count} entries but rewards has {k} reward functions.", nameof(weights));
        if (weights is not null && weights.Any(w => !double.IsFinite(w)))
            throw new ArgumentException("weights must be finite.", nameof(weights));
        double[] all;
        all = HostDoubles(rewards);
        if (all.Any(double.IsInfinity)) throw new ArgumentException("rewards holds Inf; a reward is finite (NaN marks an unscorable completion).", nameof(rewards));
        var (group, count) = groups.Resolve(n, nameof(rewards));
        var sum = new double[n];
        for (long j = 0; j < k; j++)
        {
            var column = Enumerable.Range(0, (int)n).Select(i => all[i * k + j]).ToArray();
            foreach (var rows in Members(group, count, column))
            {
                var values = rows.Select(i => column[i]).ToArray();
                double mean = values.Length > 0 ? values.Average() : double.NaN, std = Std(values, bessel: true);
                foreach (int i in rows)
                {
                    double z = (column[i] - mean) / (std + 1e-4);
                    if (double.IsNaN(z)) continue;
                    sum[i] += (weights?[(int)j] ?? 1) * z;
                }
            }
        }
        var unscorable = Enumerable.Range(0, (int)n).Select(i => Enumerable.Range(0, (int)k).All(j => double.IsNaN(all[i * k + j]))).ToArray();
        var r = Enumerable.Range(0, (int)n).Select(i => unscorable[i] ? double.NaN : sum[i]).ToArray();
        var scored = r.Where(x => !double.IsNaN(x)).ToArray();
        double mu = scored.Length > 0 ? scored.Average() : 0, sigma = Std(scored, bessel: true);
        var a = r.Select(x => double.IsNaN(x) || double.IsNaN(sigma) ? 0 : (x - mu) / (sigma + 1e-4)).ToArray();
        var dtype = rewards.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        return Result(a, r, Members(group, count, r), sigma, rewards.device, dtype);
    }

    /// <summary>
    /// GAE, generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438), for PPO with a critic, as verl
    /// computes it: delta_t = r_t + gamma V_next - V_t, A_t = delta_t + gamma lambda A_next, where positions that do not
    /// count (tool output, padding) carry V_next and A_next through unchanged; returns G = A + V (before whitening).
    /// </summary>
    /// <param name="tokenRewards">r [N, T] per-token rewards (typically the sequence reward at the last token, minus a KL penalty).</param>
    /// <param name="values">V [N, T] the critic's values (detached).</param>
    /// <param name="mask">m [N, T]: nonzero where a token counts.</param>
    /// <param name="options">gamma, lambda, whitening.</param>
    /// <returns>Token advantages [N, T] (0 where no token counts) and <see cref="AdvantageResult.Returns"/>.</returns>
    public static AdvantageResult Gae(Tensor tokenRewards, Tensor values, Tensor mask, GaeOptions? options = null)
    {
        options ??= new GaeOptions();
        Guard.Usable(tokenRewards, nameof(tokenRewards));
        Guard.Usable(values, nameof(values));
        Guard.Usable(mask, nameof(mask));
        if (tokenRewards.dim() != 2)
            throw new ArgumentException($"tokenRewards must be [N, T]; got {Guard.Shape(tokenRewards)}.", nameof(tokenRewards));
        Guard.Floating(tokenRewards, nameof(tokenRewards));
        Guard.Floating(values, nameof(values));
        if (!values.shape.SequenceEqual(tokenRewards.shape))
            throw new ArgumentException($"values must have tokenRewards' shape {Guard.Shape(tokenRewards)}; got {Guard.Shape(values)}.", nameof(values));
        if (!mask.shape.SequenceEqual(tokenRewards.shape))
            throw new ArgumentException($"mask must have tokenRewards' shape {Guard.Shape(tokenRewards)}; got {Guard.Shape(mask)}.", nameof(mask));
        int n = (int)tokenRewards.shape[0], t = (int)tokenRewards.shape[1];
        var r = HostDoubles(tokenRewards);
        var v = HostDoubles(values);
        bool[] valid;
        using (var scope = NewDisposeScope()) valid = (mask != 0).cpu().data<bool>().ToArray();
        for (int k = 0; k < r.Length; k++)
            if (valid[k] && !(double.IsFinite(r[k]) && double.IsFinite(v[k])))
                throw new ArgumentException($"tokenRewards or values hold NaN or Inf at valid token {k / t}, {k % t}.", double.IsFinite(r[k]) ? nameof(values) : nameof(tokenRewards));
        var a = new double[r.Length];
        var returns = new double[r.Length];
        for (int i = 0; i < n; i++)
        {
            double next = 0, last = 0;
            for (int k = t - 1; k >= 0; k--)
            {
                int at = i * t + k;
                if (!valid[at]) continue;                                     // carried through unchanged
                double delta = r[at] + options.Gamma * next - v[at];
                last = delta + options.Gamma * options.Lambda * last;
                next = v[at];
                a[at] = last;
                returns[at] = last + v[at];
            }
        }
        if (options.Whiten)
        {
            var used = Enumerable.Range(0, a.Length).Where(k => valid[k]).ToArray();
            double mu = used.Length > 0 ? used.Average(k => a[k]) : 0;
            double variance = used.Length > 1 ? used.Sum(k => (a[k] - mu) * (a[k] - mu)) / (used.Length - 1) : 0;
            foreach (int k in used) a[k] = (a[k] - mu) / Math.Sqrt(variance + 1e-8);
        }
        var dtype = tokenRewards.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        var shape = new long[] { n, t };
        using var advantages = tensor(a, shape, dtype: ScalarType.Float64);
        using var targets = tensor(returns, shape, dtype: ScalarType.Float64);
        return new AdvantageResult(advantages.to(dtype, tokenRewards.device), new Dictionary<string, double>())
        {
            Returns = targets.to(dtype, tokenRewards.device),
        };
    }

    /// <summary>
    /// On-policy distillation as a policy gradient (spec §13): on completions sampled from the student, the per-token
    /// advantage A_t = sg(l_teacher(y_t) - l_student(y_t)), or MiniLLM's discounted form A_t = sum_{s &gt;= t} gamma^(s - t)
    /// (l_T - l_S)_s over the sequence's valid tokens. Feed it to <see cref="ReinforceLoss"/> (or any objective) as token
    /// advantages: minimising -A_t l_t then lowers the student's reverse KL to the teacher.
    /// </summary>
    /// <param name="studentLogProbs">l_S [N, T] of the sampled tokens under the student (detached here).</param>
    /// <param name="teacherLogProbs">l_T [N, T] of the same tokens under the teacher.</param>
    /// <param name="mask">m [N, T] (padded layout): nonzero where a token counts.</param>
    /// <param name="gamma">null (default): the per-token form; a value in [0, 1]: MiniLLM's discounted sum.</param>
    /// <returns>Token advantages [N, T] (0 where no token counts).</returns>
    public static AdvantageResult OnPolicyDistillation(Tensor studentLogProbs, Tensor teacherLogProbs, Tensor mask, double? gamma = null)
    {
        Guard.Usable(studentLogProbs, nameof(studentLogProbs));
        Guard.Usable(teacherLogProbs, nameof(teacherLogProbs));
        Guard.Usable(mask, nameof(mask));
        if (studentLogProbs.dim() != 2)
            throw new ArgumentException($"studentLogProbs must be [N, T]; got {Guard.Shape(studentLogProbs)}.", nameof(studentLogProbs));
        Guard.Floating(studentLogProbs, nameof(studentLogProbs));
        Guard.Floating(teacherLogProbs, nameof(teacherLogProbs));
        if (!teacherLogProbs.shape.SequenceEqual(studentLogProbs.shape))
            throw new ArgumentException($"teacherLogProbs must have studentLogProbs' shape {Guard.Shape(studentLogProbs)} (the same sampled tokens); got {Guard.Shape(teacherLogProbs)}.", nameof(teacherLogProbs));
        if (!mask.shape.SequenceEqual(studentLogProbs.shape))
            throw new ArgumentException($"mask must have studentLogProbs' shape {Guard.Shape(studentLogProbs)}; got {Guard.Shape(mask)}.", nameof(mask));
        if (gamma is { } g && !(g >= 0 && g <= 1))
            throw new ArgumentOutOfRangeException(nameof(gamma), g, "gamma must be in [0, 1] (or null for the per-token form).");
        int n = (int)studentLogProbs.shape[0], t = (int)studentLogProbs.shape[1];
        var student = HostDoubles(studentLogProbs);
        var teacher = HostDoubles(teacherLogProbs);
        bool[] valid;
        using (var scope = NewDisposeScope()) valid = (mask != 0).cpu().data<bool>().ToArray();
        var a = new double[student.Length];
        for (int i = 0; i < n; i++)
        {
            double running = 0;
            for (int k = t - 1; k >= 0; k--)
            {
                int at = i * t + k;
                if (!valid[at]) continue;
                double gap = teacher[at] - student[at];
                if (!double.IsFinite(gap))
                    throw new ArgumentException($"studentLogProbs or teacherLogProbs hold NaN or Inf at valid token {i}, {k}.",
                        double.IsFinite(student[at]) ? nameof(teacherLogProbs) : nameof(studentLogProbs));
                running = gamma is { } d ? gap + d * running : gap;
                a[at] = running;
            }
        }
        var dtype = studentLogProbs.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        using var values = tensor(a, new long[] { n, t }, dtype: ScalarType.Float64);
        return new AdvantageResult(values.to(dtype, studentLogProbs.device), new Dictionary<string, double>());
    }

    /// <summary>The rewards as host doubles (NaN allowed, Inf refused), with the device and result dtype.</summary>
    private static (double[] Values, Device Device, ScalarType DType) ReadRewards(Tensor rewards, string name)
    {
        Guard.Usable(rewards, name);
        if (rewards.dim() != 1)
            throw new ArgumentException($"{name} must be a 1-D tensor [N] (one reward per completion); got {Guard.Shape(rewards)}.", name);
        Guard.Floating(rewards, name);
        if (rewards.shape[0] == 0) throw new ArgumentException($"{name} is empty; an estimator needs at least one completion.", name);
        var values = HostDoubles(rewards);
        if (values.Any(double.IsInfinity))
            throw new ArgumentException($"{name} holds Inf; a reward is finite (NaN marks an unscorable completion, which gets advantage 0).", name);
        return (values, rewards.device, rewards.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32);
    }

    /// <summary>A tensor's values as host doubles, every temporary disposed (with or without a caller's scope).</summary>
    private static double[] HostDoubles(Tensor t)
    {
        using var scope = NewDisposeScope();
        return t.detach().to(ScalarType.Float64, CPU).data<double>().ToArray();
    }

    /// <summary>The scorable (non-NaN) members of each group.</summary>
    private static List<int[]> Members(int[] group, int count, double[] r)
    {
        var lists = Enumerable.Range(0, count).Select(_ => new List<int>()).ToArray();
        for (int i = 0; i < group.Length; i++) if (!double.IsNaN(r[i])) lists[group[i]].Add(i);
        return lists.Select(l => l.ToArray()).ToList();
    }

    /// <summary>The standard deviation (NaN when undefined: fewer than 2 values with Bessel, none without).</summary>
    private static double Std(double[] values, bool bessel)
    {
        int n = values.Length;
        if (n == 0 || (bessel && n < 2)) return double.NaN;
        double mean = values.Average();
        return Math.Sqrt(values.Sum(v => (v - mean) * (v - mean)) / (bessel ? n - 1 : n));
    }

    private static AdvantageResult Result(double[] a, double[] r, List<int[]> members, double? batchStd, Device device, ScalarType dtype, long[]? shape = null)
    {
        // TRL's logging: reward = mean of scorable rewards; reward_std = mean over completions of their group's std;
        // frac_reward_zero_std = fraction of completions whose group's std is 0 (batch std under batch scaling)
        var scored = r.Where(x => !double.IsNaN(x)).ToArray();
        double stdSum = 0, zero = 0;
        int counted = 0;
        foreach (var rows in members)
        {
            double std = batchStd ?? Std(rows.Select(i => r[i]).ToArray(), bessel: true);
            if (double.IsNaN(std)) std = 0;
            stdSum += std * rows.Length;
            if (Math.Abs(std) <= 1e-8) zero += rows.Length;
            counted += rows.Length;
        }
        var metrics = new Dictionary<string, double>
        {
            [MetricNames.Reward] = scored.Length > 0 ? scored.Average() : 0,
            [MetricNames.RewardStd] = counted > 0 ? stdSum / counted : 0,
            [MetricNames.FracRewardZeroStd] = counted > 0 ? zero / counted : 0,
        };
        var values = tensor(a, shape ?? new[] { (long)a.Length }, dtype: ScalarType.Float64);
        Tensor result;
        using (values) result = values.to(dtype, device);
        return new AdvantageResult(result, metrics);
    }
}

/// <summary>Advantages (detached, owned by this result) and the reward statistics TRL logs (reward, reward_std, frac_reward_zero_std).</summary>
public sealed class AdvantageResult : IDisposable
{
    private readonly Tensor _advantages;
    private bool _disposed;

    internal AdvantageResult(Tensor advantages, IReadOnlyDictionary<string, double> metrics)
    {
        _advantages = advantages;
        Metrics = metrics;
    }

    /// <summary>A [N] per sequence (or [N, T] per token for REINFORCE++), float32 (float64 for float64 rewards), on the rewards' device.</summary>
    /// <exception cref="ObjectDisposedException">The result (or the dispose scope it was created in) has been disposed.</exception>
    public Tensor Values => _disposed || _advantages.IsInvalid
        ? throw new ObjectDisposedException(nameof(AdvantageResult), "These advantages have been disposed, by Dispose() or by the end of the dispose scope they were created in.")
        : _advantages;

    /// <summary>G = A + V [N, T], the critic's targets, for <see cref="Advantages.Gae"/> (before whitening); null otherwise. Owned by this result.</summary>
    public Tensor? Returns { get; internal init; }

    /// <summary>The reward statistics, as plain numbers (available after disposal).</summary>
    public IReadOnlyDictionary<string, double> Metrics { get; }

    /// <summary>Releases the advantages' native memory.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _advantages.Dispose();
        Returns?.Dispose();
    }
}
