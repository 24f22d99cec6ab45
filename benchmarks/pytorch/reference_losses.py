"""PyTorch-eager peer of the Alignment.Losses benchmark suite.

Implements the same formulas the way TRL's DPOTrainer and the papers' reference code write them (one eager op per
line), on the same random inputs recipe as benchmarks/Alignment.Losses.Benchmarks/BenchInputs.cs, and times them the
same way: each measured call computes the loss (and the backward pass) and then reads one value back to the host, so
GPU work is included. Prints and writes JSON records {suite, loss, B, dtype, device, method, median_us}.

Usage: python3 reference_losses.py [--device cpu|cuda] [--out results.json] [--repeats 200] [--losses a,b] [--skip rpo@4096]
                                  [--sizes 8,64,1024,4096] [--dtypes float32,bfloat16]
       python3 reference_losses.py --logprobs 8x1024x128256 [--device cuda]  # log-probs from bf16 logits and a copy of them
       python3 reference_losses.py --device cuda --memory   # peak memory (torch.cuda statistics) and the largest RPO batch
       python3 reference_losses.py --dump peer-values.json  # inputs, values and gradients for the app's --crosscheck
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

BETA = 0.1


def make_inputs(b, dtype, device, d=768):
    torch.manual_seed(0)
    logps = lambda: (torch.rand(b) * -200 - 1).to(dtype).to(device)
    x = dict(pc=logps().requires_grad_(True), pr=logps().requires_grad_(True), rc=logps(), rr=logps())
    x["counts"] = torch.randint(1, 300, (b,)).float().to(device)
    x["emb"] = torch.randn(b, d).to(dtype).to(device)
    sl = torch.rand(b) + 0.05
    x["sl"], x["sw"] = sl.to(device), (sl + torch.rand(b) + 0.01).to(device)
    x["pw"], x["pl"] = torch.rand(b).to(device), torch.rand(b).to(device)
    # ORPO's prompt tokens (TRL's NLL runs over prompt and completion): summed log-probs and counts of each chosen prompt
    x["pp"], x["pn"] = (torch.rand(b) * -50 - 1).to(dtype).to(device), torch.randint(1, 100, (b,)).float().to(device)
    return x


def up(t):
    """Half precision is computed in float32, as TRL upcasts; float32 stays as it is, float64 (the --dump cross-check) too."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def logratios(x):
    pc, pr = up(x["pc"]), up(x["pr"])
    return pc - up(x["rc"]), pr - up(x["rr"]), pc, pr


def dpo(x):
    uw, ul, _, _ = logratios(x)
    return -F.logsigmoid(BETA * (uw - ul)).mean()


def cdpo(x, eps=0.1):
    uw, ul, _, _ = logratios(x)
    z = BETA * (uw - ul)
    return (-F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps).mean()


def robust_dpo(x, eps=0.1):
    uw, ul, _, _ = logratios(x)
    z = BETA * (uw - ul)
    return ((-F.logsigmoid(z) * (1 - eps) + F.logsigmoid(-z) * eps) / (1 - 2 * eps)).mean()


def ipo(x):
    uw, ul, _, _ = logratios(x)
    return ((uw - ul) - 1 / (2 * BETA)).pow(2).mean()


def hinge(x):
    uw, ul, _, _ = logratios(x)
    return torch.relu(1 - BETA * (uw - ul)).mean()


def dpo_nll(x, alpha=1.0):
    uw, ul, pc, _ = logratios(x)
    return (-F.logsigmoid(BETA * (uw - ul)) + alpha * (-pc / x["counts"])).mean()


def rpo(x, tau=0.5):
    # the authors' trainer: normalise embeddings, cosine distance, softmax over the rejected axis, contrast matrix,
    # weight inside the sigmoid, mean over all entries
    uw, ul, _, _ = logratios(x)
    with torch.no_grad():
        e = F.normalize(up(x["emb"]), dim=-1)
        dist = 1 - e @ e.T
        w = torch.softmax(-dist / tau, dim=-1)
    a = uw[:, None] - ul[None, :]
    return -F.logsigmoid(BETA * w * a).mean()


def spo(x, alpha=1.0):
    pc, pr = up(x["pc"]), up(x["pr"])
    return (-F.logsigmoid(alpha * (pc - pr)) / alpha).mean()


def odpo(x, alpha=1.0):
    uw, ul, _, _ = logratios(x)
    offset = alpha * torch.log(x["sw"] - x["sl"])
    return -F.logsigmoid(BETA * (uw - ul) - offset).mean()


def sppo(x, beta=0.001):
    uw, ul, _, _ = logratios(x)
    eta = 1 / beta
    return (0.5 * ((uw - eta * (x["pw"] - 0.5)) ** 2 + (ul - eta * (x["pl"] - 0.5)) ** 2)).mean()


# TRL DPOTrainer loss types, written as TRL writes them (reverse-KL scores unless named)
def exo_pair(x, eps=1e-3):
    uw, ul, _, _ = logratios(x)
    z = BETA * (uw - ul)
    qw, ql = torch.sigmoid(z), torch.sigmoid(-z)
    return (qw * (F.logsigmoid(z) - math.log1p(-eps)) + ql * (F.logsigmoid(-z) - math.log(eps))).mean()


def nca_pair(x):
    uw, ul, _, _ = logratios(x)
    rw, rl = BETA * uw, BETA * ul
    return (-F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)).mean()


def bco_pair(x):
    uw, ul, _, _ = logratios(x)
    return (-F.logsigmoid(BETA * uw) - F.logsigmoid(-BETA * ul)).mean()


def apo_zero(x):
    uw, ul, _, _ = logratios(x)
    return ((1 - torch.sigmoid(BETA * uw)) + torch.sigmoid(BETA * ul)).mean()


def apo_down(x):
    uw, ul, _, _ = logratios(x)
    return (torch.sigmoid(BETA * uw) + (1 - torch.sigmoid(BETA * (uw - ul)))).mean()


def aot(x, eps=0.0):
    pc, pr = up(x["pc"]), up(x["pr"])
    d = torch.sort(pc - pr, dim=0)[0] - torch.sort(up(x["rc"]) - up(x["rr"]), dim=0)[0]
    return (-F.logsigmoid(BETA * d) * (1 - eps) - F.logsigmoid(-BETA * d) * eps).mean()


def discopop(x, tau=0.05):
    uw, ul, _, _ = logratios(x)
    z = BETA * (uw - ul)
    m = torch.sigmoid(z / tau)
    return (-F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m).mean()


def sigmoid_norm(x):
    uw, ul, _, _ = logratios(x)
    return -F.logsigmoid(BETA * (uw / x["counts"] - ul / x["counts"])).mean()


def sft(x):
    return -up(x["pc"]).sum() / x["counts"].sum()


def mpo(x):
    return 0.8 * dpo(x) + 0.2 * bco_pair(x) + sft(x)


def dpo_js(x):
    uw, ul, _, _ = logratios(x)
    return -F.logsigmoid(BETA * (F.logsigmoid(uw) - F.logsigmoid(ul))).mean()


# reference-free objectives (TRL's CPOTrainer / ORPOTrainer, defaults beta 0.1, simpo_gamma 0.5, cpo_alpha 1, alpha 0.25):
# no reference log-probs; SimPO, AlphaPO and ORPO use per-token means, the NLL is the chosen tokens' mean
def nll(x):
    return sft(x)


def cpo(x, cpo_alpha=1.0):
    logits = up(x["pc"]) - up(x["pr"])
    return -F.logsigmoid(BETA * logits).mean() + cpo_alpha * nll(x)


def simpo(x, gamma=0.5):
    logits = up(x["pc"]) / x["counts"] - up(x["pr"]) / x["counts"]
    return -F.logsigmoid(BETA * (logits - gamma / BETA)).mean()


def alphapo(x, gamma=0.5, alpha=0.25):
    pw, pl = torch.exp(up(x["pc"]) / x["counts"]), torch.exp(up(x["pr"]) / x["counts"])
    logits = (1 - pw.pow(-alpha)) / alpha - (1 - pl.pow(-alpha)) / alpha
    return -F.logsigmoid(BETA * (logits - gamma / BETA)).mean()


def orpo(x):
    # TRL's ORPOTrainer: the log-odds from completion means, the NLL a cross-entropy over prompt and completion tokens
    aw, al = up(x["pc"]) / x["counts"], up(x["pr"]) / x["counts"]
    log_odds = (aw - al) - (torch.log1p(-torch.exp(aw)) - torch.log1p(-torch.exp(al)))
    nll_all = -(up(x["pc"]) + up(x["pp"])).sum() / (x["counts"] + x["pn"]).sum()
    return nll_all - BETA * F.logsigmoid(log_odds).mean()


# unpaired objectives (TRL's KTOTrainer / BCOTrainer): the B chosen are desirable, the B rejected undesirable
def kto(x):
    uw, ul, _, _ = logratios(x)
    with torch.no_grad():
        kl = (up(x["pc"]).roll(1) - up(x["rc"]).roll(1)).mean().clamp(min=0)
    return torch.cat((1 - torch.sigmoid(BETA * (uw - kl)), 1 - torch.sigmoid(BETA * (kl - ul))), 0).mean()


def apo_zero_unpaired(x):
    uw, ul, _, _ = logratios(x)
    return torch.cat((1 - torch.sigmoid(BETA * uw), torch.sigmoid(BETA * ul)), 0).mean()


class RunningMean:
    """TRL's RunningMoments mean: updated with each training batch's detached rewards, read back to the host."""

    def __init__(self):
        self.mean, self.count = 0.0, 1e-24

    def update(self, xs):
        total = self.count + xs.numel()
        self.mean += ((up(xs).mean() - self.mean) * xs.numel() / total).item()
        self.count = total


BCO_RUNNING = RunningMean()


def bco(x):
    uw, ul, _, _ = logratios(x)
    rw, rl = BETA * uw, BETA * ul
    BCO_RUNNING.update(torch.cat((rw, rl), 0).detach())
    delta = torch.as_tensor(BCO_RUNNING.mean, dtype=rw.dtype, device=rw.device)   # TRL: float32, the rewards' dtype
    return torch.cat((-F.logsigmoid(rw - delta), -F.logsigmoid(-(rl - delta))), 0).mean()


def bradley_terry(x):
    # TRL's RewardTrainer: the log-prob slots stand for the reward head's outputs
    return -F.logsigmoid(up(x["pc"]) - up(x["pr"])).mean()


LOSSES = dict(dpo=dpo, cdpo=cdpo, robust_dpo=robust_dpo, ipo=ipo, hinge=hinge, dpo_nll=dpo_nll, rpo=rpo, spo=spo, odpo=odpo, sppo=sppo,
              exo_pair=exo_pair, nca_pair=nca_pair, bco_pair=bco_pair, apo_zero=apo_zero, apo_down=apo_down, aot=aot,
              discopop=discopop, sigmoid_norm=sigmoid_norm, sft=sft, mpo=mpo, dpo_js=dpo_js,
              cpo=cpo, simpo=simpo, alphapo=alphapo, orpo=orpo, kto=kto, apo_zero_unpaired=apo_zero_unpaired, bco=bco,
              bradley_terry=bradley_terry)


def time_call(fn, repeats, warmup=20):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def save(path, device, records):
    with open(path, "w") as f:
        json.dump(dict(torch=torch.__version__, device=device,
                       gpu=torch.cuda.get_device_name() if device == "cuda" else None, records=records), f, indent=1)


def run(device, repeats, sizes=(8, 64, 1024, 4096), dtypes=("float32", "bfloat16"), names=None, skip=(), out=None):
    """Times every chosen case; with `out`, rewrites that file after each record (a run stopped early keeps its results)."""
    sizes, dtypes = sizes or (8, 64, 1024, 4096), dtypes or ("float32", "bfloat16")
    records = []
    for name, loss in LOSSES.items():
        if names and name not in names:
            continue
        for b in sizes:
            if f"{name}@{b}" in skip:
                continue
            for dt in dtypes:
                x = make_inputs(b, getattr(torch, dt), device)

                def forward():
                    return loss(x).item()

                def forward_backward():
                    loss(x).backward()
                    v = x["pc"].grad[0].item()
                    x["pc"].grad = None
                    x["pr"].grad = None
                    return v

                for method, fn in (("Forward", forward), ("ForwardBackward", forward_backward)):
                    us = time_call(fn, repeats)
                    rec = dict(suite="LossBenchmarks", loss=name, B=b, dtype=dt, device=device, method=method, median_us=us)
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
                    if out:
                        save(out, device, records)
    return records


def logprobs_report(shape, device):
    """Sequence log-probs from bf16 logits N x T x V the TRL way (fp32 log_softmax + gather) and chunked (1024 tokens at
    a time, logsumexp), forward and forward+backward, next to a copy of the logits (bytes read + written: the ceiling).
    Median of 10 calls after 3 warm-ups, synchronised, as the app's --cuda-check times its own path."""
    n, t, v = shape
    logits = torch.randn(n, t, v, dtype=torch.bfloat16, device=device, requires_grad=True)
    labels = torch.randint(0, v, (n, t), device=device)
    nbytes = logits.numel() * 2
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):
        for _ in range(3):
            fn()
        sync()
        samples = []
        for _ in range(10):
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    def naive():
        return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1).sum(-1)

    def chunked():
        flat, lab, out = logits.view(-1, v), labels.view(-1), []
        for i in range(0, flat.shape[0], 1024):
            z = flat[i:i + 1024].float()
            out.append(z.gather(-1, lab[i:i + 1024, None]).squeeze(-1) - torch.logsumexp(z, -1))
        return torch.cat(out).view(n, t).sum(-1)

    def backward(fn):
        def both():
            fn().sum().backward()
            logits.grad = None
        return both

    label = f"bf16 {n}x{t}x{v}"
    copy = timed(lambda: logits.detach().clone())
    print(f"INFO pytorch copy {label}: {copy:.2f} ms ({2 * nbytes / copy / 1e6:.0f} GB/s read + written)", flush=True)
    for name, fn in (("naive", naive), ("chunked", chunked)):
        with torch.no_grad():
            fwd = timed(fn)
        both = timed(backward(fn))
        print(f"INFO pytorch sequence log-probs {label}, {name}: forward {fwd:.2f} ms ({nbytes / fwd / 1e6:.0f} GB/s of logits read, "
              f"{fwd / (copy / 2):.2f}x the time to read them once at the copy's rate), forward+backward {both:.2f} ms", flush=True)


def memory_report():
    """The peer's side of the memory comparison: torch.cuda peak statistics for the same cases as `--cuda-memory`."""
    dev = "cuda"
    mib = lambda b: f"{b / 2**20:.0f} MiB"

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    # sequence log-probs from bf16 logits 8 x 1024 x 128256: fp32 log_softmax + gather (the TRL way)
    logits = torch.randn(8, 1024, 128256, dtype=torch.bfloat16, device=dev, requires_grad=True)
    labels = torch.randint(0, 128256, (8, 1024), device=dev)
    naive = lambda: torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1).sum(-1)
    print(f"INFO memory pytorch log-probs naive forward: +{mib(peak(naive))} peak allocated", flush=True)
    def both():
        naive().sum().backward()
    grad_bytes = logits.numel() * 2
    print(f"INFO memory pytorch log-probs naive forward+backward: +{mib(peak(both) - grad_bytes)} peak allocated beyond the logits' gradient", flush=True)
    del logits, labels
    torch.cuda.empty_cache()

    # the largest RPO batch (D = 768, fp32) whose forward + backward fits: doubling, then bisection to 1024
    def fits(b):
        try:
            x = make_inputs(b, torch.float32, dev)
            used = peak(lambda: rpo(x).backward())
            print(f"INFO memory pytorch rpo B={b}: +{mib(used)} peak allocated", flush=True)
            return True
        except torch.cuda.OutOfMemoryError:
            print(f"INFO memory pytorch rpo B={b}: does not fit", flush=True)
            return False
        finally:
            torch.cuda.empty_cache()

    good, bad, b = 0, 0, 4096
    while b <= 1 << 20:
        if fits(b):
            good, b = b, b * 2
        else:
            bad = b
            break
    while good and bad - good > 1024:
        mid = (good + bad) // 2 // 1024 * 1024
        if fits(mid):
            good = mid
        else:
            bad = mid
    print(f"INFO largest pytorch RPO batch (D=768, fp32, forward+backward): {good}" + (f" (fails at {bad})" if bad else ""), flush=True)


def dump(path, b=16, d=8):
    """Inputs and each loss's value and gradients (float64, CPU) for the benchmark app's --crosscheck: the peer and the
    library must compute the same numbers before their timings mean anything."""
    x = make_inputs(b, torch.float64, "cpu", d=d)
    for k in ("sl", "sw", "pw", "pl", "pn"):         # the side inputs too, so that both sides compute in float64 throughout
        x[k] = x[k].double()
    losses = {}
    for name, loss in LOSSES.items():
        BCO_RUNNING.__init__()                       # a fresh running mean, as a fresh BcoLoss has
        x["pc"].grad = x["pr"].grad = None
        value = loss(x)
        value.backward()
        grad = lambda t: (t.grad if t.grad is not None else torch.zeros_like(t)).tolist()
        losses[name] = dict(value=value.item(), grad_chosen=grad(x["pc"]), grad_rejected=grad(x["pr"]))
    inputs = {k: v.detach().double().flatten().tolist() for k, v in x.items()}
    with open(path, "w") as f:
        json.dump(dict(torch=torch.__version__, embedding_dim=d, inputs=inputs, losses=losses), f)
    print(f"wrote {len(losses)} losses on B = {b} to {path}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="pytorch-results.json")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--memory", action="store_true", help="peak memory and the largest RPO batch instead of timings")
    p.add_argument("--losses", help="comma-separated loss names (default: all)")
    p.add_argument("--skip", default="", help="comma-separated NAME@B cases to leave out, e.g. rpo@4096")
    p.add_argument("--dump", metavar="FILE", help="write inputs, values and gradients (float64, CPU) for the app's --crosscheck")
    p.add_argument("--sizes", help="comma-separated batch sizes (default 8,64,1024,4096)")
    p.add_argument("--dtypes", help="comma-separated input dtypes (default float32,bfloat16)")
    p.add_argument("--logprobs", metavar="NxTxV", help="time sequence log-probs from bf16 logits of this shape instead of the losses")
    args = p.parse_args()
    if args.logprobs:
        logprobs_report(tuple(int(k) for k in args.logprobs.split("x")), args.device)
        raise SystemExit(0)
    if args.dump:
        dump(args.dump)
        raise SystemExit(0)
    if args.memory:
        memory_report()
        raise SystemExit(0)
    unknown = [n for n in (args.losses or "").split(",") if n and n not in LOSSES]
    if unknown:
        raise SystemExit(f"unknown loss(es) {unknown}; known: {', '.join(LOSSES)}")
    recs = run(args.device, args.repeats, names=set(args.losses.split(",")) if args.losses else None, skip=set(args.skip.split(",")),
               sizes=tuple(int(b) for b in args.sizes.split(",")) if args.sizes else None,
               dtypes=tuple(args.dtypes.split(",")) if args.dtypes else None, out=args.out)
    save(args.out, args.device, recs)
