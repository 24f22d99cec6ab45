using FsCheck;
using FsCheck.Fluent;

namespace Alignment.Losses.Tests;

/// <summary>
/// Every loss against the independent float64 oracle (<see cref="Oracle"/>), values and gradients, on random batches:
/// 1e-10 in float64; 1e-5 relative in float32; bf16 inputs: the oracle evaluated on the bf16-rounded inputs agrees to
/// float32 precision for the value (the library upcasts before computing) and to bf16 precision for the gradient
/// (which is returned in the input's dtype).
/// </summary>
public class OracleTests
{
    public static IEnumerable<object[]> Names => LossCatalog.Names;

    internal static void AssertMatchesOracle(LossCase c, Inputs raw, ScalarType dtype, double valueTol, double gradTol, Device? device = null)
    {
        var x = raw.RoundedTo(dtype);
        using var scope = NewDisposeScope();
        var t = new BatchTensors(x, dtype, device);
        var expected = c.Expected(x);
        using var result = c.Make(x).Compute(c.Batch(t));
        result.Loss.backward();

        double value = result.Loss.ToDouble();
        Assert.True(Math.Abs(value - expected.Loss) <= valueTol * Math.Max(1, Math.Abs(expected.Loss)),
            $"{c.Name} [{dtype}] loss {value:R} vs oracle {expected.Loss:R}\n{x}");
        Assert.Equal(result.Loss.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32, result.Loss.dtype);
        Assert.Equal(dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32, result.Loss.dtype);

        double scale = expected.GradChosen.Concat(expected.GradRejected).Max(Math.Abs) + 1e-300;
        // gradients come back in the input's dtype, whose subnormals quantise tiny values (or round them to 0):
        // allow a few units of the smallest subnormal (float16 6e-8, bfloat16 9e-41, float32 1.4e-45)
        double floor = dtype switch { ScalarType.Float16 => 6e-8, ScalarType.BFloat16 => 4e-40, ScalarType.Float32 => 1e-44, _ => 0 };
        Compare("chosen", Grad(t.PolicyChosen), expected.GradChosen);
        Compare("rejected", Grad(t.PolicyRejected), expected.GradRejected);   // none flows where the loss ignores a side (sft)
        Assert.Equal(dtype, t.PolicyChosen.grad!.dtype);

        static double[] Grad(Tensor leaf) => leaf.grad is { } g ? TensorUtil.Values(g) : new double[leaf.shape[0]];

        void Compare(string side, double[] actual, double[] want)
        {
            for (int i = 0; i < actual.Length; i++)
            {
                double w = i < want.Length ? want[i] : 0; // unpaired RPO uses a prefix of the rejected rows
                Assert.True(Math.Abs(actual[i] - w) <= gradTol * scale + floor,
                    $"{c.Name} [{dtype}] d/d {side}[{i}] = {actual[i]:R} vs oracle {w:R} (scale {scale:G3})\n{x}");
            }
        }
    }

    static void Property(string name, ScalarType dtype, double valueTol, double gradTol, int maxTest)
    {
        var c = LossCatalog.Get(name);
        var prop = Prop.ForAll(Generators.Arb(minB: 2, maxB: 16), x => AssertMatchesOracle(c, x, dtype, valueTol, gradTol));
        Check.One(PropertyConfig.Quick(maxTest), prop);
    }

    [Theory, MemberData(nameof(Names))]
    public void Float64_value_and_gradient_equal_the_oracle_to_1e10(string loss) => Property(loss, ScalarType.Float64, 1e-10, 1e-10, 60);

    [Theory, MemberData(nameof(Names))]
    public void Float32_value_and_gradient_equal_the_oracle_to_1e5_relative(string loss) => Property(loss, ScalarType.Float32, 1e-5, 1e-5, 40);

    [Theory, MemberData(nameof(Names))]
    public void BFloat16_inputs_are_upcast_and_match_the_oracle_on_the_rounded_inputs(string loss) => Property(loss, ScalarType.BFloat16, 1e-5, 8e-3, 20);

    [Theory, MemberData(nameof(Names))]
    public void Float16_inputs_are_upcast_and_match_the_oracle_on_the_rounded_inputs(string loss) => Property(loss, ScalarType.Float16, 1e-5, 2e-3, 10);
}
