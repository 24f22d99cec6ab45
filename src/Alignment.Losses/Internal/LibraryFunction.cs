using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// Base of the library's custom autograd functions. It owns what TorchSharp leaves to each backward pass:
/// <list type="bullet">
/// <item>Native memory. Everything the backward pass creates (the saved tensors it unpacks, chunk temporaries, the
/// upstream gradient handle TorchSharp hands over) is disposed when it returns, with or without a caller's dispose scope.
/// The gradients it returns must outlive the callback (libtorch copies them after it returns): they go to the caller's
/// scope when there is one, and otherwise to <see cref="BackwardLeftovers"/>, released at the next library call on the
/// thread or when the result is disposed.</item>
/// <item>Failures. An exception escaping a backward callback would cross native frames and abort the process. It is
/// caught, recorded in <see cref="BackwardFailures"/> and traced, and the callback returns empty gradients, which the
/// autograd engine rejects with an exception thrown from <c>backward()</c>.</item>
/// </list>
/// </summary>
internal abstract class LibraryFunction<T> : autograd.SingleTensorFunction<T> where T : LibraryFunction<T>, new()
{
    private const string TensorSlots = "alignment-losses:tensor-slots";

    public sealed override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        ctx.save_data(TensorSlots, vars.Select(v => v is Tensor).ToArray());
        return Forward(ctx, vars);
    }

    /// <summary>The forward pass (runs without autograd; temporaries die with the calling loss's scope).</summary>
    protected abstract Tensor Forward(autograd.AutogradContext ctx, object[] vars);

    /// <summary>The gradients, one per forward argument (null for non-tensor arguments and for tensors that get none).</summary>
    protected abstract Tensor?[] Backward(autograd.AutogradContext ctx, IReadOnlyList<Tensor> saved, Tensor gradOutput);

    public sealed override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad_output)
    {
        BackwardLeftovers.Release();                           // earlier callbacks' gradients: libtorch has copied them
        bool callerScope = BackwardLeftovers.InScope();
        Tensor?[] grads;
        using (var scope = NewDisposeScope())
        {
            try
            {
                if (Interlocked.Exchange(ref LibraryFunctionTesting.FailNextBackward, null) is { } inject) throw inject();
                grads = Backward(ctx, ctx.get_saved_variables(), grad_output);
            }
            catch (Exception e)
            {
                BackwardFailures.Record(Name, e);
                var slots = (bool[])ctx.get_data(TensorSlots)!;
                grads = slots.Select(isTensor => isTensor ? empty(0) : null).ToArray();
            }
            var keep = grads.OfType<Tensor>().ToArray();
            if (callerScope) scope.MoveToOuter(keep);
            else
            {
                scope.Detach(keep);
                BackwardLeftovers.Defer(keep);
            }
        }
        grad_output.Dispose();                                 // TorchSharp hands the handle over and never frees it
        return grads.ToList()!;
    }
}

/// <summary>
/// Gradients returned by backward passes that ran without a dispose scope: they must outlive the callback that returned
/// them, so they are released at the next opportunity on the same thread (the next library call or backward callback,
/// or disposing a result). Per thread, so a release can never race with another thread's callback.
/// </summary>
internal static class BackwardLeftovers
{
    [ThreadStatic] private static List<Tensor>? _pending;

    internal static void Defer(IEnumerable<Tensor> tensors) => (_pending ??= new()).AddRange(tensors);

    internal static void Release()
    {
        if (_pending is not { Count: > 0 } pending) return;
        var items = pending.ToArray();
        pending.Clear();
        foreach (var t in items) t.Dispose();
    }

    /// <summary>Whether the calling thread has a dispose scope (TorchSharp does not expose it: a probe tensor tells).</summary>
    internal static bool InScope()
    {
        var stats = DisposeScopeManager.Statistics;
        long before = stats.CreatedInScopeCount;
        using (empty(0)) { }
        return stats.CreatedInScopeCount != before;
    }
}

/// <summary>A hook for the tests of the failure path (an exception injected into the next backward pass).</summary>
internal static class LibraryFunctionTesting
{
    internal static Func<Exception>? FailNextBackward;
}
