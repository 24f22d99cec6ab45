using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>
/// The fused hidden-states path equals the materialised path (head matmul + log_softmax + gather + the same loss) in value
/// and in the gradients of the hidden states, the head weight and the bias, for every loss, batch-coupled RPO included.
/// </summary>
public class FusedLinearTests
{
    const int N = 4, T = 5, H = 6, V = 13;   // N rows = 2 chosen + 2 rejected

    sealed record Setup(Tensor Hidden, Tensor Weight, Tensor Bias, Tensor Labels, Tensor Mask);

    static Setup Make(ScalarType dtype)
    {
        manual_seed(11);
        var mask = ones(N, T, dtype: ScalarType.Bool);
        mask[0, 0] = tensor(false);
        mask[3, 1] = tensor(false);
        return new Setup(
            randn(N, T, H, dtype: ScalarType.Float64).to_type(dtype).requires_grad_(true),
            (randn(V, H, dtype: ScalarType.Float64) * 0.5).to_type(dtype).requires_grad_(true),
            (randn(V, dtype: ScalarType.Float64) * 0.1).to_type(dtype).requires_grad_(true),
            randint(0, V, new long[] { N, T }),
            mask);
    }

    static PreferenceBatch SideInputs(ScalarType dtype, PreferenceLogps policy) => new(policy,
        new PreferenceLogps(tensor(new[] { -20.0, -25 }, dtype: dtype), tensor(new[] { -22.0, -21 }, dtype: dtype)))
    {
        PromptEmbeddings = PromptEmbeddings.Paired(tensor(new[] { 1.0, 0.2, 0.3, 1.0 }, dtype: dtype).reshape(2, 2)),
        Scores = new ResponseScores(tensor(new[] { 2.0, 1.5 }, dtype: dtype), tensor(new[] { 1.0, 0.5 }, dtype: dtype)),
        WinRates = SppoWinRates.Individual(tensor(new[] { 0.7, 0.6 }, dtype: dtype), tensor(new[] { 0.3, 0.2 }, dtype: dtype)),
    };

    /// <summary>The materialised reference: full logits, log_softmax, gather, mask, sum.</summary>
    static PreferenceLogps Materialised(Setup s, LabelAlignment alignment)
    {
        var logits = s.Hidden.matmul(s.Weight.t()) + s.Bias;
        Tensor lp = nn.functional.log_softmax(logits, 2), y = s.Labels, m = s.Mask;
        if (alignment == LabelAlignment.ShiftByOne) { lp = lp.narrow(1, 0, T - 1); y = y.narrow(1, 1, T - 1); m = m.narrow(1, 1, T - 1); }
        var token = lp.gather(2, y.unsqueeze(2)).squeeze(2) * m.to_type(lp.dtype);
        var sum = token.sum(1);
        var counts = m.to_type(lp.dtype).sum(1);
        return new PreferenceLogps(sum.narrow(0, 0, 2), sum.narrow(0, 2, 2), counts.narrow(0, 0, 2), counts.narrow(0, 2, 2));
    }

    static (double Loss, double[] Grads) Run(IPreferenceLoss loss, Setup s, Func<PreferenceLogps, PreferenceBatch> side, bool fused, LabelAlignment alignment, long chunk)
    {
        foreach (var p in new[] { s.Hidden, s.Weight, s.Bias }) p.grad?.zero_();
        PreferenceLossResult r = fused
            ? FusedLinearLogProbs.ComputeLoss(loss, side, s.Hidden, s.Weight, s.Bias, s.Labels, s.Mask, alignment, new SequenceLogProbsOptions { ChunkTokens = chunk })
            : loss.Compute(side(Materialised(s, alignment)));
        using (r)
        {
            r.Loss.backward();
            var grads = new[] { s.Hidden, s.Weight, s.Bias }.SelectMany(p => TensorUtil.Values(p.grad!.flatten())).ToArray();
            return (r.Loss.ToDouble(), grads);
        }
    }

    public static IEnumerable<object[]> Losses => new[]
        {
            "dpo", "cdpo", "robust_dpo", "ipo", "ipo_per_token", "hinge", "dpo_nll", "rpo", "rpo_diagonal", "spo", "odpo", "sppo",
            "exo_pair", "nca_pair_js", "bco_pair", "apo_down", "aot", "discopop", "sigmoid_norm", "sft", "mpo",
        }
        .Select(n => new object[] { n });

    static IPreferenceLoss Create(string name) => name switch
    {
        "dpo" => new DpoLoss(new() { Beta = 0.5 }),
        "cdpo" => new ConservativeDpoLoss(),
        "robust_dpo" => new RobustDpoLoss(),
        "ipo" => new IpoLoss(new() { Beta = 0.5 }),
        "ipo_per_token" => new IpoLoss(new() { Beta = 0.5, LogRatio = IpoLogRatio.PerTokenMean }),
        "hinge" => new HingeLoss(new() { Beta = 0.05 }),
        "dpo_nll" => new DpoNllLoss(),
        "rpo" => new RpoLoss(new() { Beta = 0.5 }),
        "rpo_diagonal" => new RpoLoss(new() { Beta = 0.5, Variant = RpoVariant.Diagonal }),
        "spo" => new SpoLoss(new() { Alpha = 0.7, KlWeight = 0 }),
        "odpo" => new OdpoLoss(new() { Beta = 0.5 }),
        "sppo" => new SppoLoss(new() { Beta = 0.1 }),
        "exo_pair" => new ExoPairLoss(new() { Beta = 0.5, LabelSmoothing = 0.1 }),
        "nca_pair_js" => new NcaPairLoss(new() { Beta = 0.5, ScoreMap = ScoreMap.JensenShannon }),
        "bco_pair" => new BcoPairLoss(new() { Beta = 0.5 }),
        "apo_down" => new ApoLoss(new() { Beta = 0.5, Anchor = ApoAnchor.Down }),
        "aot" => new AotLoss(new() { Beta = 0.5, LabelSmoothing = 0.1 }),
        "discopop" => new DiscoPopLoss(new() { Beta = 0.5 }),
        "sigmoid_norm" => new SigmoidNormLoss(new() { Beta = 0.5 }),
        "sft" => new SftLoss(),
        "mpo" => new WeightedLoss((new DpoLoss(), 0.8), (new BcoPairLoss(), 0.2), (new SftLoss(), 1.0)),
        _ => throw new ArgumentException(name),
    };

    [Theory, MemberData(nameof(Losses))]
    public void Fused_path_equals_the_materialised_path_in_value_and_gradients(string name)
    {
        using var scope = NewDisposeScope();
        var s = Make(ScalarType.Float64);
        var loss = Create(name);
        Func<PreferenceLogps, PreferenceBatch> side = name == "rpo_diagonal" ? p => SideInputs(ScalarType.Float64, p) with { PromptEmbeddings = null } : p => SideInputs(ScalarType.Float64, p);
        foreach (var (alignment, chunk) in new[] { (LabelAlignment.Aligned, 1024L), (LabelAlignment.ShiftByOne, 3L), (LabelAlignment.Aligned, 1L) })
        {
            var expected = Run(loss, s, side, fused: false, alignment, chunk);
            var actual = Run(loss, s, side, fused: true, alignment, chunk);
            Assert.Equal(expected.Loss, actual.Loss, 10);
            double scale = expected.Grads.Max(Math.Abs);
            for (int i = 0; i < expected.Grads.Length; i++)
                Assert.True(Math.Abs(expected.Grads[i] - actual.Grads[i]) <= 1e-10 * scale,
                    $"{name} {alignment} chunk {chunk}: grad[{i}] {actual.Grads[i]:R} vs materialised {expected.Grads[i]:R}");
        }
    }

    [Fact]
    public void Bf16_hidden_and_weight_get_bf16_gradients_close_to_the_float64_path()
    {
        using var scope = NewDisposeScope();
        var s64 = Make(ScalarType.Float64);
        var s16 = new Setup(s64.Hidden.detach().to_type(ScalarType.BFloat16).requires_grad_(true), s64.Weight.detach().to_type(ScalarType.BFloat16).requires_grad_(true),
            s64.Bias.detach().to_type(ScalarType.BFloat16).requires_grad_(true), s64.Labels, s64.Mask);
        var exact = new Setup(s16.Hidden.detach().to_type(ScalarType.Float64).requires_grad_(true), s16.Weight.detach().to_type(ScalarType.Float64).requires_grad_(true),
            s16.Bias.detach().to_type(ScalarType.Float64).requires_grad_(true), s64.Labels, s64.Mask);
        var loss = new DpoLoss(new() { Beta = 0.5 });
        var want = Run(loss, exact, p => SideInputs(ScalarType.Float64, p), fused: false, LabelAlignment.Aligned, 2);
        var got = Run(loss, s16, p => SideInputs(ScalarType.Float32, p), fused: true, LabelAlignment.Aligned, 2);
        Assert.Equal(ScalarType.BFloat16, s16.Weight.grad!.dtype);
        Assert.Equal(want.Loss, got.Loss, 4);
        double scale = want.Grads.Max(Math.Abs);
        for (int i = 0; i < want.Grads.Length; i++) Assert.True(Math.Abs(want.Grads[i] - got.Grads[i]) <= 1e-2 * scale, $"grad[{i}] {got.Grads[i]} vs {want.Grads[i]}");
    }

    [Fact]
    public void Bad_shapes_are_clear_errors()
    {
        using var scope = NewDisposeScope();
        var s = Make(ScalarType.Float32);
        Assert.Equal("weight", Assert.Throws<ArgumentException>(() => FusedLinearLogProbs.Compute(s.Hidden, randn(V, H + 1), null, s.Labels, null, LabelAlignment.Aligned)).ParamName);
        Assert.Equal("bias", Assert.Throws<ArgumentException>(() => FusedLinearLogProbs.Compute(s.Hidden, s.Weight.detach(), randn(V + 1), s.Labels, null, LabelAlignment.Aligned)).ParamName);
        Assert.Equal("labels", Assert.Throws<ArgumentException>(() => FusedLinearLogProbs.Compute(s.Hidden, s.Weight.detach(), null, s.Labels.narrow(1, 0, 2), null, LabelAlignment.Aligned)).ParamName);
        Assert.Equal("labels", Assert.Throws<ArgumentException>(() => FusedLinearLogProbs.Compute(s.Hidden, s.Weight.detach(), null, s.Labels + V, null, LabelAlignment.Aligned)).ParamName);
    }
}
