#:project ../../src/Alignment.Losses/Alignment.Losses.csproj
#:package TorchSharp-cpu@0.107.0
#:property PublishAot=false
#:property RuntimeIdentifier=$(NETCoreSdkRuntimeIdentifier)

// RPO with prompt embeddings: paired (one embedding per pair) and unpaired (M chosen, N rejected, own prompts).
// Run from the repository root: dotnet run samples/scripts/rpo-embeddings.cs
// (#:project builds the library from source; outside the repository use #:package Alignment.Losses@<version>
// from a local feed, see the README. RuntimeIdentifier keeps one platform's libtorch, not all of them.)
using Alignment.Losses;
using TorchSharp;
using static TorchSharp.torch;

manual_seed(0);
// Paired: 6 pairs; prompts 0-2 are about one topic, 3-5 about another (their embeddings are close).
var topicA = randn(1, 384); var topicB = randn(1, 384);
var promptEmbeddings = cat(new[] { topicA.expand(3, 384) + 0.1 * randn(3, 384), topicB.expand(3, 384) + 0.1 * randn(3, 384) });
var policyLogps = new PreferenceLogps(randn(6, requires_grad: true) - 20, randn(6, requires_grad: true) - 22);
var refLogps = new PreferenceLogps(randn(6) - 20, randn(6) - 21);

using (var paired = RpoLoss.Compute(policyLogps, refLogps, promptEmbeddings))
{
    paired.Loss.backward();
    Console.WriteLine($"paired RPO: loss {paired.Loss.ToSingle():F4}, diagonal weight {paired[MetricNames.RpoDiagonalWeight]:F3}, " +
                      $"row entropy {paired[MetricNames.RpoRowEntropy]:F3} (uniform would be {Math.Log(6):F3})");
}

// Unpaired: 5 chosen and 3 rejected examples, each with its own prompt.
var unpaired = PreferenceLogps.Unpaired(randn(5, requires_grad: true) - 20, randn(3, requires_grad: true) - 20);
var unpairedRef = PreferenceLogps.Unpaired(randn(5) - 20, randn(3) - 20);
var embeddings = PromptEmbeddings.Unpaired(randn(5, 384), randn(3, 384));
using var result = RpoLoss.Compute(unpaired, unpairedRef, embeddings, new RpoOptions { Beta = 0.1, Temperature = 0.25 });
result.Loss.backward();
Console.WriteLine($"unpaired RPO (5 x 3): loss {result.Loss.ToSingle():F4}, per chosen row {string.Join(", ", result.PerExample.data<float>().ToArray().Select(v => v.ToString("F3")))}");
