using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace Alignment.Losses.LanguageModel;

/// <summary>A small causal transformer (pre-norm blocks of causal self-attention and an MLP) built from TorchSharp modules.</summary>
internal sealed class TinyTransformer : Module<Tensor, Tensor, Tensor>
{
    private readonly Embedding _tokens, _positions;
    private readonly ModuleList<Block> _blocks;
    private readonly LayerNorm _norm;

    public TinyTransformer(int vocab, int width, int layers, int heads, int maxLength) : base(nameof(TinyTransformer))
    {
        _tokens = Embedding(vocab, width);
        _positions = Embedding(maxLength, width);
        _blocks = new ModuleList<Block>(Enumerable.Range(0, layers).Select(_ => new Block(width, heads)).ToArray());
        _norm = LayerNorm(width);
        Head = Linear(width, vocab, hasBias: false);
        MaxLength = maxLength;
        RegisterComponents();
    }

    /// <summary>The language-model head: logits = hidden W^T.</summary>
    public Linear Head { get; }

    public int MaxLength { get; }

    /// <summary>Last hidden states [N, T, width] for ids [N, T] and a bool padding mask [N, T] (keys that may be attended to).</summary>
    public override Tensor forward(Tensor ids, Tensor attention)
    {
        long n = ids.shape[0], t = ids.shape[1];
        using var positions = arange(t, device: ids.device).unsqueeze(0).expand(n, t);
        var x = _tokens.forward(ids) + _positions.forward(positions);
        using var causal = ones(t, t, dtype: ScalarType.Bool, device: ids.device).tril();
        using var mask = causal.unsqueeze(0) & attention.unsqueeze(1);        // [N, T(query), T(key)]
        foreach (var block in _blocks) x = block.forward(x, mask);
        return _norm.forward(x);
    }

    /// <summary>Logits of the next token after each position (for generation).</summary>
    public Tensor Logits(Tensor ids, Tensor attention) => Head.forward(forward(ids, attention));

    private sealed class Block : Module<Tensor, Tensor, Tensor>
    {
        private readonly LayerNorm _norm1, _norm2;
        private readonly Linear _qkv, _out, _up, _down;
        private readonly int _heads;

        public Block(int width, int heads) : base(nameof(Block))
        {
            _heads = heads;
            _norm1 = LayerNorm(width);
            _norm2 = LayerNorm(width);
            _qkv = Linear(width, 3 * width);
            _out = Linear(width, width);
            _up = Linear(width, 4 * width);
            _down = Linear(4 * width, width);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x, Tensor mask)
        {
            long n = x.shape[0], t = x.shape[1], width = x.shape[2], headWidth = width / _heads;
            var qkv = _qkv.forward(_norm1.forward(x)).view(n, t, 3, _heads, headWidth).permute(2, 0, 3, 1, 4);   // [3, N, H, T, d]
            var scores = qkv[0].matmul(qkv[1].transpose(-2, -1)) / Math.Sqrt(headWidth);
            scores = scores.masked_fill(mask.unsqueeze(1).logical_not(), float.NegativeInfinity);
            var attended = scores.softmax(-1).nan_to_num(0).matmul(qkv[2]).transpose(1, 2).reshape(n, t, width);
            x = x + _out.forward(attended);
            return x + _down.forward(functional.gelu(_up.forward(_norm2.forward(x))));
        }
    }
}
