namespace Alignment.Losses;

/// <summary>
/// Base of the losses on unpaired binary feedback (KTO, apo_zero_unpaired, BCO) and of yours: accepts
/// <see cref="PreferenceLogps.Unpaired(TorchSharp.torch.Tensor, TorchSharp.torch.Tensor)"/> batches with one side possibly
/// empty (and paired ones, read as unpaired), and requires reference log-probs.
/// </summary>
/// <typeparam name="TOptions">The loss's options record.</typeparam>
public abstract class UnpairedPreferenceLoss<TOptions> : PreferenceLoss<TOptions> where TOptions : PreferenceLossOptions
{
    /// <summary>Creates the loss with its options.</summary>
    protected UnpairedPreferenceLoss(TOptions options) : base(options) { }

    /// <inheritdoc />
    protected sealed override bool SupportsUnpaired => true;

    /// <inheritdoc />
    protected sealed override bool SupportsEmptySide => true;

    /// <inheritdoc />
    protected override ReferenceUse ReferenceUse => ReferenceUse.Required;
}
