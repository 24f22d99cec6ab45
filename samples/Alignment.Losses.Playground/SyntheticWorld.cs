using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.Playground;

/// <summary>
/// Built-in synthetic preference data: prompts grouped into topics (so their embeddings have real similarity
/// structure), K candidate responses per prompt with hidden Bradley-Terry rewards, and preference pairs sampled from
/// them (optionally with label noise).
/// </summary>
internal sealed class SyntheticWorld
{
    public SyntheticWorld(int seed, int topics = 4, int promptsPerTopic = 6, int candidates = 4, int embeddingDim = 16, double labelNoise = 0.0)
    {
        var rng = new Random(seed);
        double Normal() => Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble());
        Prompts = topics * promptsPerTopic;
        Candidates = candidates;
        LabelNoise = labelNoise;
        Rewards = new double[Prompts, candidates];
        Embeddings = new float[Prompts, embeddingDim];
        Topic = new int[Prompts];
        TokenCounts = new int[Prompts, candidates];
        var centers = Enumerable.Range(0, topics).Select(_ => Enumerable.Range(0, embeddingDim).Select(_ => Normal()).ToArray()).ToArray();
        for (int p = 0; p < Prompts; p++)
        {
            Topic[p] = p / promptsPerTopic;
            for (int d = 0; d < embeddingDim; d++) Embeddings[p, d] = (float)(centers[Topic[p]][d] + 0.3 * Normal());
            // Rewards share a topic-level preference ordering plus prompt-specific noise.
            for (int k = 0; k < candidates; k++)
            {
                Rewards[p, k] = 1.5 * Math.Sin(Topic[p] + 1.7 * k) + 0.4 * Normal();
                TokenCounts[p, k] = 20 + rng.Next(60);
            }
        }
        _rng = rng;
    }

    private readonly Random _rng;
    public int Prompts { get; }
    public int Candidates { get; }
    public double LabelNoise { get; }
    public double[,] Rewards { get; }
    public float[,] Embeddings { get; }
    public int[] Topic { get; }
    public int[,] TokenCounts { get; }

    /// <summary>Positive quality scores for ODPO (a monotone transform of the hidden reward).</summary>
    public double Score(int prompt, int k) => Math.Exp(Rewards[prompt, k]);

    public static double Sigmoid(double x) => 1 / (1 + Math.Exp(-x));

    /// <summary>Samples a preference pair: two distinct candidates of a random prompt, labelled by Bradley-Terry (then flipped with the noise rate).</summary>
    public (int Prompt, int Chosen, int Rejected) SamplePair()
    {
        int p = _rng.Next(Prompts), a = _rng.Next(Candidates), b = _rng.Next(Candidates - 1);
        if (b >= a) b++;
        bool aWins = _rng.NextDouble() < Sigmoid(Rewards[p, a] - Rewards[p, b]);
        if (_rng.NextDouble() < LabelNoise) aWins = !aWins;
        return aWins ? (p, a, b) : (p, b, a);
    }

    /// <summary>The rewards as a [prompts, K] tensor.</summary>
    public Tensor RewardTensor() => tensor(Flatten(Rewards), dtype: ScalarType.Float32).reshape(Prompts, Candidates);

    private static float[] Flatten(double[,] a)
    {
        var r = new float[a.Length];
        int i = 0;
        foreach (var v in a) r[i++] = (float)v;
        return r;
    }
}
