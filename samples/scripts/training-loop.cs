#:project ../../src/Alignment.Losses/Alignment.Losses.csproj
#:package TorchSharp-cpu@0.107.0
#:property PublishAot=false
#:property RuntimeIdentifier=$(NETCoreSdkRuntimeIdentifier)

// A loss in a TorchSharp training loop: a tiny "policy" scores 4 candidate responses per prompt; DPO aligns it to
// preferences sampled from hidden rewards. Each step runs in a dispose scope so native memory stays flat.
// Run from the repository root: dotnet run samples/scripts/training-loop.cs
// (#:project builds the library from source; outside the repository use #:package Alignment.Losses@<version>
// from a local feed, see the README. RuntimeIdentifier keeps one platform's libtorch, not all of them.)
using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

manual_seed(1);
const int prompts = 16, candidates = 4, features = 8;
var responseFeatures = randn(prompts, candidates, features);
var hiddenReward = responseFeatures.sum(2);                         // what the annotators prefer
var policy = nn.Linear(features, 1);
var reference = nn.Linear(features, 1);
reference.load_state_dict(policy.state_dict());                    // the reference is the initial policy
var optimizer = optim.Adam(policy.parameters(), lr: 0.02);
IPreferenceLoss loss = new DpoLoss(new DpoOptions { Beta = 0.5 });

Tensor LogProbs(nn.Module<Tensor, Tensor> model) => nn.functional.log_softmax(model.call(responseFeatures).squeeze(-1), 1);

for (int step = 1; step <= 200; step++)
{
    using var scope = NewDisposeScope();
    var prompt = randint(0, prompts, new long[] { 64 });
    var a = randint(0, candidates, new long[] { 64 });
    var b = (a + randint(1, candidates, new long[] { 64 })) % candidates;
    var aWins = hiddenReward[prompt, a] > hiddenReward[prompt, b];
    var chosen = where(aWins, a, b);
    var rejected = where(aWins, b, a);

    var logp = LogProbs(policy);
    Tensor refLogp;
    using (no_grad()) refLogp = LogProbs(reference);
    var batch = new PreferenceBatch(
        new PreferenceLogps(logp[prompt, chosen], logp[prompt, rejected]),
        new PreferenceLogps(refLogp[prompt, chosen], refLogp[prompt, rejected]));

    using var result = loss.Compute(batch);
    optimizer.zero_grad();
    result.Loss.backward();
    optimizer.step();
    if (step % 50 == 0)
        Console.WriteLine($"step {step,3}: loss {result.Loss.ToSingle():F4}, accuracy {result[MetricNames.RewardsAccuracies]:F2}, margin {result[MetricNames.RewardsMargins]:F3}");
}
