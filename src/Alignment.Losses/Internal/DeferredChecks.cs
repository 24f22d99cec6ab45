using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Internal;

/// <summary>
/// Value checks on device tensors (win-rates in [0, 1], positive score gaps, token counts, finiteness...) whose verdicts
/// are read back together, so that a valid call pays one host-device synchronisation however many checks it has.
/// </summary>
/// <remarks>
/// Each check contributes a 0-d bool tensor that is true when its values are valid, computed on the device without a
/// synchronisation, and a factory for the precise error. <see cref="Verify"/> copies all verdicts to the host at once;
/// only when one is false does the factory run (it may synchronise as often as it likes to name the offending rows).
/// Checks are reported in the order they were added, so input checks registered before the formula runs take precedence
/// over a non-finite result they caused.
/// </remarks>
internal sealed class DeferredChecks
{
    private readonly List<(Tensor Ok, Func<Exception> Error)> _checks = new();

    internal bool IsEmpty => _checks.Count == 0;

    /// <summary>Registers a check. <paramref name="ok"/> must be a 0-d bool tensor (no grad) owned by the caller's dispose scope.</summary>
    /// <param name="ok">True when the values are valid.</param>
    /// <param name="error">Builds the exception to throw when <paramref name="ok"/> is false (it may also throw directly).</param>
    internal void Add(Tensor ok, Func<Exception> error) => _checks.Add((ok, error));

    /// <summary>Reads every verdict with one synchronisation and throws the first failing check's error. A no-op without checks.</summary>
    internal void Verify()
    {
        if (_checks.Count == 0) return;
        bool[] verdicts;
        using (no_grad())
        {
            if (_checks.Count == 1)
            {
                verdicts = new[] { _checks[0].Ok.item<bool>() };
            }
            else
            {
                using var all = stack(_checks.Select(c => c.Ok).ToArray());
                using var host = all.cpu();
                verdicts = host.data<bool>().ToArray();
            }
        }
        for (int i = 0; i < verdicts.Length; i++)
            if (!verdicts[i]) throw _checks[i].Error();
    }
}
