using Alignment.Losses.Internal;
using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>
/// Value checks on device tensors (win-rates in [0, 1], positive score gaps, token counts, finiteness...) whose verdicts
/// are read back together, so that a valid call pays one host-device synchronisation however many checks it has.
/// </summary>
/// <remarks>
/// <para>Each check contributes a 0-d bool tensor that is true when its values are valid, computed on the device without a
/// synchronisation, and a factory for the precise error. The loss reads all verdicts at once after its formula has run;
/// only when one is false does the factory run (it may synchronise as often as it likes to name the offending rows).
/// Checks are reported in the order they were added, so input checks registered before the formula runs take precedence
/// over a non-finite result they caused.</para>
/// <para>A loss of your own (derived from <see cref="PreferenceLoss{TOptions}"/>) receives an instance in
/// <c>Validate</c> and through <see cref="PreferenceTerms.Checks"/>.</para>
/// </remarks>
public sealed class ValueChecks
{
    private readonly List<(Tensor? Ok, bool Verdict, Func<Exception> Error)> _checks = new();

    internal ValueChecks() { }

    /// <summary>The number of registered checks.</summary>
    public int Count => _checks.Count;

    /// <summary>Registers a check, read back with the call's other checks after the formula has run.</summary>
    /// <param name="ok">A 0-d (or one-element) bool tensor, true when the values are valid, e.g. <c>(p &gt;= 0).all()</c>. It
    /// stays owned by the current dispose scope (the loss call's).</param>
    /// <param name="error">Builds the exception to throw when <paramref name="ok"/> is false (it may also throw directly).</param>
    /// <exception cref="ArgumentException"><paramref name="ok"/> is not a one-element bool tensor.</exception>
    public void Add(Tensor ok, Func<Exception> error)
    {
        ArgumentNullException.ThrowIfNull(ok);
        ArgumentNullException.ThrowIfNull(error);
        Guard.Usable(ok, nameof(ok));
        if (ok.dtype != ScalarType.Bool || ok.numel() != 1)
            throw new ArgumentException($"ok must be a one-element bool tensor such as (x >= 0).all(); got {ok.dtype} {Guard.Shape(ok)}.", nameof(ok));
        _checks.Add((ok.detach().reshape(Array.Empty<long>()), false, error));
    }

    /// <summary>
    /// Registers a check whose verdict is already known on the host (the library's CPU paths read the memory directly),
    /// reported in the same order as the tensor checks around it.
    /// </summary>
    internal void AddVerdict(bool ok, Func<Exception> error) => _checks.Add((null, ok, error));

    /// <summary>Reads every verdict with one synchronisation and throws the first failing check's error. A no-op without checks.</summary>
    internal void Verify()
    {
        if (_checks.Count == 0) return;
        var tensors = _checks.Where(c => c.Ok is not null).Select(c => c.Ok!).ToArray();
        bool[] read = Array.Empty<bool>();
        using (no_grad())
        {
            if (tensors.Length == 1)
                read = new[] { tensors[0].item<bool>() };
            else if (tensors.Length > 1)
            {
                using var all = stack(tensors);
                using var host = all.cpu();
                read = host.data<bool>().ToArray();
            }
        }
        int next = 0;
        foreach (var (ok, verdict, error) in _checks)
            if (!(ok is null ? verdict : read[next++])) throw error();
    }
}
