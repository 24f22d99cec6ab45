using Alignment.Losses.Internal;
using static TorchSharp.torch;

namespace Alignment.Losses;

/// <summary>Options of <see cref="SapoLoss"/>: the gate temperatures (TRL's defaults 1.0 and 1.05) and the reduction.</summary>
public sealed record SapoOptions : PolicyGradientOptions
{
    private double _tauPositive = 1.0, _tauNegative = 1.05;
    private ImportanceRatio _ratio = ImportanceRatio.Token;

    /// <summary>tau for A &gt; 0 (TRL sapo_temperature_pos). Default 1.0.</summary>
    public double TemperaturePositive { get => _tauPositive; init => _tauPositive = Guard.Scale(value, nameof(TemperaturePositive)); }

    /// <summary>tau for A &lt;= 0 (TRL sapo_temperature_neg). Default 1.05.</summary>
    public double TemperatureNegative { get => _tauNegative; init => _tauNegative = Guard.Scale(value, nameof(TemperatureNegative)); }

    /// <summary>The importance ratio (token by default).</summary>
    public ImportanceRatio Ratio { get => _ratio; init => _ratio = Guard.Defined(value, nameof(Ratio)); }

    /// <inheritdoc />
    protected override TokenReduction DefaultReduction => TokenReduction.SequenceMeanTokenMean;
}

/// <summary>SAPO, soft adaptive policy optimisation (arXiv 2511.20347); TRL loss_type "sapo".</summary>
/// <remarks>
/// Per token: L_t = -g_t A_t, g = sigmoid(tau (rho - 1)) * 4 / tau, tau = tau_pos for A &gt; 0 and tau_neg otherwise: a
/// smooth gate in place of the hard clip (g = 2 / tau and dg/drho = 1 at rho = 1, as the unclipped objective). Example at
/// rho = e^0.3: g = 2.3463334 (tau 1), 2.2507387 (tau 1.05).
/// </remarks>
public sealed class SapoLoss : PolicyGradientLoss<SapoOptions>
{
    /// <summary>Creates the loss (TRL's defaults without options).</summary>
    public SapoLoss(SapoOptions? options = null) : base(options ?? new())
    {
        RefuseTokenSumming(Options.Ratio, Options.Reduction, Name);
    }

    /// <inheritdoc />
    public override string Name => "sapo";

    /// <inheritdoc />
    private protected override (TokenLink Link, ImportanceRatio Ratio)? Fused =>
        (new SapoLink(Options.TemperaturePositive, Options.TemperatureNegative), Options.Ratio);

    /// <inheritdoc />
    protected override (Tensor PerToken, bool SequenceLevel) PolicyTerm(TokenTerms terms, Tensor logRatio, List<(string Name, Tensor Value)> metrics)
    {
        ArgumentNullException.ThrowIfNull(terms);
        var a = terms.Advantages!;
        var rho = Ratio(terms, logRatio, Options.Ratio);
        Tensor tau;
        using (no_grad())
            tau = full_like(a, Options.TemperatureNegative).where(a <= 0, full_like(a, Options.TemperaturePositive));
        var gate = ((rho - 1) * tau).sigmoid() * 4 / tau;
        return (-gate * a, IsSequenceLevel(Options.Ratio));
    }
}
