"""PyTorch-eager peer of the policy-gradient objectives, written the way TRL's GRPOTrainer computes them (per-token
log-probs [N, T], a completion mask, sequence advantages [N], a k3 KL with beta 0.04), for the same-run timing
comparison and the float64 cross-check of benchmarks/compare-policy-with-pytorch.sh.

  python3 benchmarks/pytorch/policy_losses.py --dump FILE                      # inputs, values, gradients (float64)
  python3 benchmarks/pytorch/policy_losses.py --losses grpo,dapo --sizes 64,512 --tokens 256 --out peer.json
"""
import argparse
import json
import torch

from reference_losses import time_call   # the same timing method as the pair losses' peer

BETA = 0.04


def make_inputs(n, t, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    logp = (-0.02 - 3 * torch.rand(n, t, generator=g, dtype=torch.float64))
    old = (logp + 0.05 * torch.randn(n, t, generator=g, dtype=torch.float64)).clamp(max=-1e-4)
    ref = (logp + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)).clamp(max=-1e-4)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    cast = lambda x: x.to(dtype).to(device)
    return dict(l=cast(logp).requires_grad_(True), old=cast(old), ref=cast(ref), adv=cast(adv), mask=mask)


def up(t):
    """Compute in float32 (as the library does) unless the input is float64 (the cross-check)."""
    return t if t.dtype == torch.float64 else t.float()


def kl_k3(x, l):
    u = up(x["ref"]) - l
    return torch.exp(u) - u - 1


def ratio(x, level="token"):
    l, m = up(x["l"]), up(x["mask"])
    lr = l - up(x["old"])
    if level == "sequence":
        lr = ((lr * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return l, m, torch.exp(lr)


def clipped(x, eps_low=0.2, eps_high=0.2, level="token"):
    l, m, coef_1 = ratio(x, level)
    a = up(x["adv"]).unsqueeze(1)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * a, coef_2 * a) + BETA * kl_k3(x, l)
    return per_token, m


def seq_mean(per_token, m):
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()


def token_mean(per_token, m):
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def grpo(x):
    return seq_mean(*clipped(x))


def dapo(x):
    return token_mean(*clipped(x, eps_high=0.28))


def dr_grpo(x):
    per_token, m = clipped(x)
    return (per_token * m).sum() / (per_token.size(0) * per_token.size(1))


def bnpo(x):
    return token_mean(*clipped(x))


def gspo(x):
    return seq_mean(*clipped(x, 3e-4, 4e-4, level="sequence"))


def cispo(x):
    l, m, coef_1 = ratio(x)
    a = up(x["adv"]).unsqueeze(1)
    per_token = -torch.clamp(coef_1, max=5.0).detach() * a * l + BETA * kl_k3(x, l)
    return token_mean(per_token, m)


def sapo(x):
    l, m, coef_1 = ratio(x)
    a = up(x["adv"]).unsqueeze(1)
    tau = torch.where(a > 0, torch.full_like(a, 1.0), torch.full_like(a, 1.05))
    per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * a + BETA * kl_k3(x, l)
    return seq_mean(per_token, m)


LOSSES = dict(grpo=grpo, dapo=dapo, dr_grpo=dr_grpo, bnpo=bnpo, gspo=gspo, cispo=cispo, sapo=sapo)


def dump(path, n=8, t=16):
    x = make_inputs(n, t, torch.float64, "cpu", seed=3)
    losses = {}
    for name, fn in LOSSES.items():
        x["l"].grad = None
        value = fn(x)
        value.backward()
        losses[name] = dict(value=value.item(), grad=x["l"].grad.flatten().tolist())
    inputs = {k: v.detach().double().flatten().tolist() for k, v in x.items()}
    with open(path, "w") as f:
        json.dump(dict(torch=torch.__version__, n=n, t=t, inputs=inputs, losses=losses), f)
    print(f"wrote {len(losses)} policy losses on N = {n}, T = {t} to {path}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--sizes", default="64,512")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--out", default="pytorch-policy-results.json")
    p.add_argument("--dump", metavar="FILE")
    args = p.parse_args()
    if args.dump:
        dump(args.dump)
        raise SystemExit(0)
    records = []
    for name in args.losses.split(","):
        fn = LOSSES[name]
        for n in (int(s) for s in args.sizes.split(",")):
            x = make_inputs(n, args.tokens, torch.float32, args.device)

            def forward():
                return fn(x).item()

            def forward_backward():
                fn(x).backward()
                v = x["l"].grad[0, 0].item()
                x["l"].grad = None
                return v

            for method, call in (("Forward", forward), ("ForwardBackward", forward_backward)):
                rec = dict(suite="PolicyGradientBenchmarks", loss=name, B=n, dtype="float32", device=args.device, method=method,
                           median_us=time_call(call, args.repeats))
                records.append(rec)
                print(json.dumps(rec), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(torch=torch.__version__, device=args.device, records=records), f, indent=1)
