using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>
/// Wherever a loss is finite its gradient is finite too, at the points where formulas switch branches or saturate:
/// margins exactly 0, per-token means a hair below 0 (ORPO's log1mexp, AlphaPO's shape), hinge exactly at its margin,
/// saturated margins of ±1e4, log-probs of exactly 0. A `where` over two branches whose unselected side is infinite
/// gives a finite value and a NaN gradient; this is the test that catches it (issue #24, finding 1), for every loss in
/// the catalogue, in float64, float32 and bfloat16.
/// </summary>
public class BranchPointTests
{
    /// <summary>Inputs at one branch point, from a base batch of 4 pairs.</summary>
    static Inputs At(string point, Inputs x) => point switch
    {
        "equal" => x with { Rc = x.Pc, Rr = x.Pr },
        "near_zero_means" => x with { Pc = x.Nw.Select(n => -5e-8 * n / 5).ToArray(), Pr = x.Nl.Select(n => -3e-8 * n / 5).ToArray() },
        "near_zero_chosen" => x with { Pc = new[] { -5e-8, -30.4, -2e-40, -1e-20 }, Pr = new[] { -14, -29.9, -1e-30, -3.0 } },
        "exact_zero_chosen" => x with { Pc = new[] { 0.0, -30.4, -1, -2 }, Rc = new[] { 0.0, -30, -1, -2 } },
        "hinge_margin" => x with { Rc = x.Pc.Select((p, i) => p - 1 / x.Beta).ToArray(), Rr = x.Pr },
        "saturated_up" => x with { Pc = new[] { -1.0, -2, -3, -4 }, Pr = new[] { -5000.0, -6000, -7000, -8000 }, Rc = new[] { -5000.0, -6000, -7000, -8000 }, Rr = new[] { -1.0, -2, -3, -4 } },
        "saturated_down" => x with { Pc = new[] { -5000.0, -6000, -7000, -8000 }, Pr = new[] { -1.0, -2, -3, -4 }, Rc = new[] { -1.0, -2, -3, -4 }, Rr = new[] { -5000.0, -6000, -7000, -8000 } },
        "tiny_margin" => x with { Rc = x.Pc.Select(p => p - 1e-6).ToArray(), Rr = x.Pr },
        _ => throw new ArgumentException(point),
    };

    static readonly string[] Points = { "equal", "near_zero_means", "near_zero_chosen", "exact_zero_chosen", "hinge_margin", "saturated_up", "saturated_down", "tiny_margin" };

    public static IEnumerable<object[]> Cases =>
        from c in LossCatalog.All from p in Points select new object[] { c.Name, p };

    [Theory, MemberData(nameof(Cases))]
    public void Where_the_loss_is_finite_its_gradient_is_finite(string loss, string point)
    {
        var c = LossCatalog.Get(loss);
        var x = At(point, Generators.One(4, 4) with { Kl = 0.5 });
        foreach (var dtype in new[] { ScalarType.Float64, ScalarType.Float32, ScalarType.BFloat16 })
        {
            using var scope = NewDisposeScope();
            var t = new BatchTensors(x, dtype);
            PreferenceLossResult r;
            try { r = c.Make(x).Compute(c.Batch(t)); }
            catch (Exception e) when (e is ArgumentException or ArithmeticException) { continue; }   // refused with a clear error: fine
            using (r)
            {
                double value = r.Loss.ToDouble();
                if (!double.IsFinite(value)) continue;    // cannot happen (the losses check), but the claim is conditional
                r.Backward();
                foreach (var (grad, side) in new[] { (t.PolicyChosen.grad, "chosen"), (t.PolicyRejected.grad, "rejected") })
                    if (grad is not null)
                        Assert.True(isfinite(grad).all().item<bool>(),
                            $"{loss} at {point} ({dtype}): loss {value:R} but d/d{side} = [{string.Join(", ", TensorUtil.Values(grad))}]");
            }
        }
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float64)]
    public void Orpo_gradient_is_finite_for_a_memorised_answer_the_campaigns_repro(ScalarType dtype)
    {
        // chosen [-5e-8, -30.4] with 5 and 12 tokens: a = -1e-8 (float32 gave loss 1.81 and chosen.grad [NaN, -0.0605])
        using var scope = NewDisposeScope();
        var chosen = tensor(new[] { -5e-8, -30.4 }, dtype: ScalarType.Float64).to_type(dtype).requires_grad_(true);
        var rejected = tensor(new[] { -14.0, -29.9 }, dtype: ScalarType.Float64).to_type(dtype).requires_grad_(true);
        var policy = new PreferenceLogps(chosen, rejected, tensor(new[] { 5.0, 12 }), tensor(new[] { 6.0, 10 }));
        using var r = new OrpoLoss(new OrpoOptions { NllTokens = OrpoNllTokens.Completion }).Compute(new PreferenceBatch(policy));
        r.Backward();
        var g = TensorUtil.Values(chosen.grad!);
        Assert.All(g, v => Assert.True(double.IsFinite(v), $"chosen.grad = [{string.Join(", ", g)}]"));
        Assert.All(TensorUtil.Values(rejected.grad!), v => Assert.True(double.IsFinite(v)));
        Assert.True(g[0] < 0 && g[1] < 0);                        // both chosen responses pushed up
        // and the value at a ~ -2e-40 is log1mexp's, not a clamp's: log(1 - e^a) = log(-a) there
        Assert.Equal(Math.Log(2e-40), OrpoLoss.Log1mExp(tensor(new[] { -2e-40 })).ToDouble(), 9);
    }

    [Fact]
    public void Log_probs_from_saturated_logits_have_finite_gradients()
    {
        // one-hot logits of ±1e4 (a model that is certain), float32: log_softmax saturates at 0 and -2e4
        using var scope = NewDisposeScope();
        var logits = (nn.functional.one_hot(tensor(new long[] { 1, 2, 0, 3, 1, 2 }), 5).to_type(ScalarType.Float32) * 2e4 - 1e4).reshape(2, 3, 5).requires_grad_(true);
        var labels = tensor(new long[] { 1, 2, 0, 0, 0, 0 }).reshape(2, 3);
        using var r = SequenceLogProbs.Compute(logits, labels, null, LabelAlignment.Aligned, new SequenceLogProbsOptions { StepStatistics = true });
        using var total = r.Sum.sum();
        total.backward();
        Assert.True(isfinite(logits.grad!).all().item<bool>());
        Assert.True(isfinite(r.Sum).all().item<bool>());
        var hidden = (randn(2, 3, 4) * 1e3).requires_grad_(true);
        var weight = (randn(5, 4) * 1e3).requires_grad_(true);
        using var f = FusedLinearLogProbs.Compute(hidden, weight, null, labels, null, LabelAlignment.Aligned);
        using var fusedTotal = f.Sum.sum();
        fusedTotal.backward();
        Assert.True(isfinite(hidden.grad!).all().item<bool>() && isfinite(weight.grad!).all().item<bool>());
    }
}
