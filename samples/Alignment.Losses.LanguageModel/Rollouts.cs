using TorchSharp;
using static TorchSharp.torch;

namespace Alignment.Losses.LanguageModel;

/// <summary>Sampling replies from a model and collating (prompt, reply) rows: the online runs' rollouts.</summary>
internal static class Rollouts
{
    /// <summary>The longest reply sampled.</summary>
    public const int ReplyTokens = 24;

    /// <summary>G replies to one prompt, sampled together (one row each) until EOS or <see cref="ReplyTokens"/> tokens; each
    /// reply ends with its EOS if it has one.</summary>
    public static List<int[]> Sample(TinyTransformer m, IReadOnlyList<int> prompt, int count, Generator generator, Device device)
    {
        m.eval();
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var rows = Enumerable.Range(0, count).Select(_ => new List<int>()).ToArray();
        var done = new bool[count];
        var ids = tensor(prompt.Select(i => (long)i).ToArray(), device: device).unsqueeze(0).repeat(count, 1);
        for (int t = 0; t < ReplyTokens && ids.shape[1] < m.MaxLength && !done.All(d => d); t++)
        {
            var logits = m.Logits(ids, ones_like(ids, dtype: ScalarType.Bool)).select(1, -1);
            var next = multinomial(logits.softmax(1), 1, generator: generator);
            var host = next.cpu().data<long>().ToArray();
            for (int i = 0; i < count; i++)
            {
                if (done[i]) continue;
                rows[i].Add((int)host[i]);
                done[i] = host[i] == Corpus.Eos;
            }
            ids = cat(new[] { ids, next }, 1);
        }
        return rows.Select(r => r.ToArray()).ToList();
    }

    /// <summary>prompt + reply rows, right-padded; labels score the reply tokens only (EOS included), -100 elsewhere.</summary>
    public static (Tensor Ids, Tensor Attention, Tensor Labels) Collate(List<(int[] Prompt, int[] Reply)> rollouts, Device device)
    {
        int length = rollouts.Max(r => r.Prompt.Length + r.Reply.Length);
        var ids = new long[rollouts.Count * length];
        var attention = new bool[ids.Length];
        var labels = Enumerable.Repeat(-100L, ids.Length).ToArray();
        for (int i = 0; i < rollouts.Count; i++)
        {
            var (p, r) = rollouts[i];
            for (int t = 0; t < length; t++)
            {
                int at = i * length + t;
                bool inPrompt = t < p.Length, inReply = !inPrompt && t < p.Length + r.Length;
                ids[at] = inPrompt ? p[t] : inReply ? r[t - p.Length] : Corpus.Pad;
                attention[at] = inPrompt || inReply;
                if (inReply) labels[at] = ids[at];
            }
        }
        var shape = new long[] { rollouts.Count, length };
        return (tensor(ids, shape).to(device), tensor(attention, shape).to(device), tensor(labels, shape).to(device));
    }
}
