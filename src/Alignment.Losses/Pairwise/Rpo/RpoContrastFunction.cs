using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// RPO's per-row losses with the analytic gradient computed during the forward pass, so that backward is one
/// matrix-vector product instead of autograd replaying every [M, N] operation.
/// </summary>
/// <remarks>
/// With A_ij = u_w,i - u_l,j and a constant weight matrix W:
/// inside the sigmoid, L_i = (1/N) sum_j softplus(-beta W_ij A_ij); outside, L_i = sum_j W_ij softplus(-beta A_ij).
/// Both have dL_i/dA_ij = -c S_ij with S = W ∘ sigmoid(-beta W^p A) (p = 1 inside, 0 outside) and c = beta/N inside,
/// beta outside. So for upstream gradients g [M]: grad u_w = -c g ∘ rowsum(S), grad u_l = c S^T g.
/// Forward makes about 7 passes over [M, N] and keeps S; backward reads S once. At most three [M, N] matrices are alive
/// at a time (W, S and one temporary).
/// </remarks>
internal sealed class RpoContrastFunction : LibraryFunction<RpoContrastFunction>
{
    public override string Name => "AlignmentLosses.RpoContrast";

    /// <summary>Per-row losses [M] from u_w [M], u_l [N], weights [M, N] (constant).</summary>
    internal static Tensor Apply(Tensor chosenLogRatio, Tensor rejectedLogRatio, Tensor weights, double beta, bool inside) =>
        apply(chosenLogRatio, rejectedLogRatio, weights, beta, inside);

    protected override Tensor Forward(autograd.AutogradContext ctx, object[] vars)
    {
        var uw = (Tensor)vars[0];
        var ul = (Tensor)vars[1];
        var w = (Tensor)vars[2];
        var beta = (double)vars[3];
        var inside = (bool)vars[4];
        long n = ul.shape[0];
        var z = uw.unsqueeze(1) - ul.unsqueeze(0);                 // A
        if (inside) z.mul_(w);                                     // W ∘ A
        z.mul_(-beta);                                             // z = -beta W^p A
        Tensor perRow;
        using (var loss = PreferenceMath.Softplus(z))                   // the one temporary [M, N]: freed at once, not with the scope
            perRow = inside ? loss.sum(1).div_(n) : loss.mul_(w).sum(1);
        var s = z.sigmoid_().mul_(w);                              // S = W ∘ sigmoid(z), in z's storage
        ctx.save_for_backward(new List<Tensor> { s, s.sum(1) });
        ctx.save_data("scale", inside ? beta / n : beta);
        return perRow;
    }

    protected override Tensor?[] Backward(autograd.AutogradContext ctx, IReadOnlyList<Tensor> saved, Tensor grad_output)
    {
        Tensor s = saved[0], rowSums = saved[1];
        var c = (double)ctx.get_data("scale")!;
        var g = grad_output.to_type(s.dtype);
        var gradChosen = g.mul(rowSums).mul_(-c);
        var gradRejected = s.t().mv(g).mul_(c);
        return new Tensor?[] { gradChosen, gradRejected, null, null, null };
    }
}
