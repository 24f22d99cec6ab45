#:project ../../src/Alignment.Losses/Alignment.Losses.csproj
#:package TorchSharp-cpu@0.107.0
#:property PublishAot=false
#:property RuntimeIdentifier=$(NETCoreSdkRuntimeIdentifier)

// Computes every loss of Alignment.Losses on one small batch and prints the loss with two metrics.
// Run from the repository root: dotnet run samples/scripts/compute-losses.cs
// (#:project builds the library from source; outside the repository use #:package Alignment.Losses@<version>
// from a local feed, see the README. RuntimeIdentifier keeps one platform's libtorch, not all of them.)
using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

var policy = new PreferenceLogps(
    chosen: tensor(new[] { -12.1f, -30.4f, -8.8f, -21.0f }, requires_grad: true),
    rejected: tensor(new[] { -14.0f, -29.9f, -9.5f, -25.2f }, requires_grad: true),
    chosenTokenCounts: tensor(new[] { 12f, 31f, 9f, 20f }),
    rejectedTokenCounts: tensor(new[] { 15f, 28f, 10f, 26f }));
var reference = new PreferenceLogps(tensor(new[] { -12.5f, -30.0f, -9.0f, -22.0f }), tensor(new[] { -13.2f, -30.1f, -9.4f, -24.0f }));

var batch = new PreferenceBatch(policy, reference)
{
    PromptEmbeddings = PromptEmbeddings.Paired(randn(4, 384)),                             // RPO
    Scores = new ResponseScores(tensor(new[] { 0.9f, 1.4f, 0.7f, 1.8f }), tensor(new[] { 0.3f, 1.1f, 0.2f, 0.4f })),   // ODPO
    WinRates = SppoWinRates.Individual(tensor(new[] { 0.8f, 0.6f, 0.7f, 0.9f }), tensor(new[] { 0.3f, 0.4f, 0.2f, 0.1f })),  // SPPO
};

IPreferenceLoss[] losses =
{
    new DpoLoss(), new ConservativeDpoLoss(), new RobustDpoLoss(), new IpoLoss(), new HingeLoss(), new DpoNllLoss(),
    new RpoLoss(), new SpoLoss(new SpoOptions { KlWeight = 0 }), new OdpoLoss(), new SppoLoss(),
    new ExoPairLoss(), new NcaPairLoss(), new BcoPairLoss(), new ApoLoss(), new ApoLoss(new ApoOptions { Anchor = ApoAnchor.Down }),
    new AotLoss(), new DiscoPopLoss(), new SigmoidNormLoss(), new SftLoss(),
    new DpoLoss(new DpoOptions { ScoreMap = ScoreMap.JensenShannon }),
    TrlLosses.Create(new TrlDpoConfig { LossType = new[] { "sigmoid", "bco_pair", "sft" }, LossWeights = new[] { 0.8, 0.2, 1.0 } }),   // MPO
};
Console.WriteLine($"{"loss",-26} {"value",12} {"accuracy",9} {"margin",9}");
foreach (var loss in losses)
{
    using var scope = NewDisposeScope();
    using var result = loss.Compute(batch);
    Console.WriteLine($"{loss.Name,-26} {result.Loss.ToSingle(),12:G6} {result[MetricNames.RewardsAccuracies],9:F2} {result[MetricNames.RewardsMargins],9:F4}");
}
