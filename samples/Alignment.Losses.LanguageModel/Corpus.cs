using System.Text.Json;
using Alignment.Losses.Data;
using Microsoft.ML.Tokenizers;

namespace Alignment.Losses.LanguageModel;

/// <summary>One preference example as text.</summary>
internal sealed record TextExample(string Prompt, string Chosen, string Rejected);

/// <summary>
/// The polite-vs-rude customer-service dataset, tokenised with a real tokenizer (tiktoken cl100k_base through
/// Microsoft.ML.Tokenizers) and remapped to a compact vocabulary for a tiny model: ids 0-2 are PAD, BOS and EOS, then every
/// cl100k token the dataset uses.
/// </summary>
internal sealed class Corpus
{
    public const int Pad = 0, Bos = 1, Eos = 2;

    private readonly Tokenizer _tokenizer = TiktokenTokenizer.CreateForEncoding("cl100k_base");
    private readonly Dictionary<int, int> _toCompact = new();
    private readonly List<int> _toTiktoken = new() { -1, -1, -1 };

    public Corpus(string dataFolder)
    {
        Train = Load(Path.Combine(dataFolder, "polite-train.jsonl"));
        HeldOut = Load(Path.Combine(dataFolder, "polite-heldout.jsonl"));
        foreach (var e in Train.Concat(HeldOut))
            foreach (var text in new[] { e.Prompt, e.Chosen, e.Rejected })
                foreach (var id in _tokenizer.EncodeToIds(text))
                    if (!_toCompact.ContainsKey(id)) { _toCompact[id] = _toTiktoken.Count; _toTiktoken.Add(id); }
    }

    public IReadOnlyList<TextExample> Train { get; }
    public IReadOnlyList<TextExample> HeldOut { get; }

    /// <summary>Vocabulary size of the compact id space.</summary>
    public int VocabularySize => _toTiktoken.Count;

    /// <summary>BOS + prompt tokens.</summary>
    public int[] EncodePrompt(string prompt) => new[] { Bos }.Concat(Encode(prompt)).ToArray();

    /// <summary>Completion tokens + EOS.</summary>
    public int[] EncodeCompletion(string completion) => Encode(completion).Append(Eos).ToArray();

    public PreferenceExample Tokenise(TextExample e) => new(EncodePrompt(e.Prompt), EncodeCompletion(e.Chosen), EncodeCompletion(e.Rejected));

    public string Decode(IEnumerable<int> ids) => _tokenizer.Decode(ids.Where(i => i > Eos).Select(i => _toTiktoken[i]));

    private IEnumerable<int> Encode(string text) => _tokenizer.EncodeToIds(text).Select(id => _toCompact.TryGetValue(id, out var c)
        ? c : throw new InvalidOperationException($"token {id} of \"{text}\" is outside the compact vocabulary"));

    private static List<TextExample> Load(string path) =>
        File.ReadLines(path).Where(l => l.Length > 0).Select(l =>
        {
            using var doc = JsonDocument.Parse(l);
            var root = doc.RootElement;
            return new TextExample(root.GetProperty("prompt").GetString()!, root.GetProperty("chosen").GetString()!, root.GetProperty("rejected").GetString()!);
        }).ToList();

    /// <summary>A transparent judge for win-rates: polite markers minus rude markers in a reply.</summary>
    public static int Politeness(string reply)
    {
        var words = reply.ToLowerInvariant().Split(new[] { ' ', ',', '.', '!', '?' }, StringSplitOptions.RemoveEmptyEntries);
        string[] polite = { "happy", "glad", "thank", "certainly", "absolutely", "sure", "please", "course", "patience" };
        string[] rude = { "ugh", "care", "problem", "bothering", "whatever", "yourself", "away", "nobody", "business", "alone" };
        return words.Count(polite.Contains) - words.Count(rude.Contains);
    }
}
