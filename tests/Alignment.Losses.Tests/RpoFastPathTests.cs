using Alignment.Losses;

namespace Alignment.Losses.Tests;

/// <summary>The fused RPO contrast (analytic gradient in the forward pass) equals the plain autograd formulation.</summary>
public class RpoFastPathTests
{
    [Theory]
    [InlineData(true, 6, 6, ScalarType.Float32, 1e-6)]
    [InlineData(false, 6, 6, ScalarType.Float32, 1e-6)]
    [InlineData(true, 7, 3, ScalarType.Float32, 1e-6)]
    [InlineData(false, 3, 9, ScalarType.Float32, 1e-6)]
    [InlineData(true, 64, 64, ScalarType.Float64, 1e-13)]
    [InlineData(false, 5, 11, ScalarType.Float64, 1e-13)]
    public void Fused_contrast_equals_plain_autograd_in_value_and_gradient(bool inside, int m, int n, ScalarType dtype, double tol)
    {
        using var scope = NewDisposeScope();
        manual_seed(m * 100 + n);
        var uw = (randn(m, dtype: ScalarType.Float64) * 5).to_type(dtype);
        var ul = (randn(n, dtype: ScalarType.Float64) * 5).to_type(dtype);
        var w = nn.functional.softmax(randn(m, n, dtype: ScalarType.Float64), 1).to_type(dtype);
        var upstream = randn(m, dtype: ScalarType.Float64).to_type(dtype);    // non-uniform per-row weights

        (Tensor Value, Tensor Gw, Tensor Gl) Run(Func<Tensor, Tensor, Tensor> perRow)
        {
            var a = uw.detach().clone().requires_grad_(true);
            var b = ul.detach().clone().requires_grad_(true);
            var rows = perRow(a, b);
            (rows * upstream).sum().backward();
            return (rows.detach(), a.grad!, b.grad!);
        }
        var fused = Run((a, b) => RpoContrastFunction.Apply(a, b, w, 0.3, inside));
        var plain = Run((a, b) => RpoLoss.PlainPerRow(a, b, w, 0.3, inside));
        foreach (var (x, y) in new[] { (fused.Value, plain.Value), (fused.Gw, plain.Gw), (fused.Gl, plain.Gl) })
        {
            double scale = y.abs().max().ToDouble();
            Assert.True((x - y).abs().max().ToDouble() <= tol * Math.Max(scale, 1e-30),
                $"max diff {(x - y).abs().max().ToDouble():G3} vs scale {scale:G3}");
        }
    }
}
