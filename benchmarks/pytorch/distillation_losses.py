"""PyTorch peer of the distillation losses, written the way TRL, Liger and NeMo-RL write them (spec section 13).

  python3 benchmarks/pytorch/distillation_losses.py --dump FILE          # float64 values and gradients for the cross-check
  python3 benchmarks/pytorch/distillation_losses.py --timing --tokens 512 --hidden 256 --vocab 16384 --out peer.json
  python3 benchmarks/pytorch/distillation_losses.py --memory materialised --tokens 512 --hidden 256 --vocab 16384

Cases of --dump (each a function of the student logits; labels use -100 for skipped positions):
  trl_jsd_b{0,0.3,1}_t{1,0.8}: TRL's generalized_jsd_loss (kl_div with log targets, the beta endpoints special-cased,
                               mask labels != -100, "batchmean" = sum / valid tokens)
  liger_jsd: 0.5 * CE(student) + 0.5 * JSD(0.5), both over the valid tokens (LigerFusedLinearJSDLoss's defaults)
  tvd: 0.5 * sum |p - q| over the valid tokens (Liger's TVD)
  nemo_forward_top4, nemo_reverse_top4_tail: NeMo-RL's top-k distillation (teacher renormalised over its top-k;
                               without the tail the student too; with zero_outside_topk the student's full log-probs and
                               the rest term with log-infinitesimal -100)
The timing (1 thread unless PEER_THREADS says otherwise): TRL's path with materialised logits, student = h W^T (with
grad), teacher = h_t W_t^T (no grad), JSD, backward ("jsd_materialised"); and the loss alone from given logits
("jsd_from_logits").
"""
import argparse
import json
import os
import resource
import time

import torch
import torch.nn.functional as F


def jsd_trl(student_logits, teacher_logits, labels, beta, temperature=1.0):
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        per = F.kl_div(s, t, reduction="none", log_target=True)          # KL(T || S)
    elif beta == 1:
        per = F.kl_div(t, s, reduction="none", log_target=True)          # KL(S || T)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mix = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        per = b * F.kl_div(mix, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(mix, s, reduction="none", log_target=True)
    keep = labels != -100
    return per[keep].sum() / keep.sum().clamp_min(1)


def ce(student_logits, labels):
    keep = labels != -100
    return F.cross_entropy(student_logits[keep], labels[keep], reduction="sum") / keep.sum().clamp_min(1)


def tvd(student_logits, teacher_logits, labels):
    keep = labels != -100
    diff = (student_logits.softmax(-1) - teacher_logits.softmax(-1)).abs().sum(-1) * 0.5
    return diff[keep].sum() / keep.sum().clamp_min(1)


def nemo_topk(student_logits, teacher_logits, labels, k, kind, tail):
    top_logits, top_ids = teacher_logits.topk(k, dim=-1)
    t = F.log_softmax(top_logits, dim=-1)
    if tail:
        full = F.log_softmax(student_logits, dim=-1)
        s = full.gather(-1, top_ids)
    else:
        s = F.log_softmax(student_logits.gather(-1, top_ids), dim=-1)
    sp, tp = s.exp(), t.exp()
    if kind == "forward":
        per = (tp * (t - s)).sum(-1)
    else:
        per = (sp * (s - t)).sum(-1)
        if tail:
            neg_entropy_all = (full.exp() * full).sum(-1)
            rest_neg_entropy = neg_entropy_all - (sp * s).sum(-1)
            rest_mass = 1 - sp.sum(-1)
            per = per + rest_neg_entropy + 100.0 * rest_mass          # sum over the rest of S (log S - (-100))
    keep = labels != -100
    return per[keep].sum() / keep.sum().clamp_min(1)


def cases(student, teacher, labels):
    out = {}
    for beta in (0.0, 0.3, 1.0):
        for temperature in (1.0, 0.8):
            out[f"trl_jsd_b{beta:g}_t{temperature:g}"] = lambda s, b=beta, tau=temperature: jsd_trl(s, teacher, labels, b, tau)
    out["liger_jsd"] = lambda s: 0.5 * ce(s, labels) + 0.5 * jsd_trl(s, teacher, labels, 0.5)
    out["tvd"] = lambda s: tvd(s, teacher, labels)
    out["nemo_forward_top4"] = lambda s: nemo_topk(s, teacher, labels, 4, "forward", False)
    out["nemo_reverse_top4_tail"] = lambda s: nemo_topk(s, teacher, labels, 4, "reverse", True)
    return out


def dump(path, n=3, t=6, v=11):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, t, v, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(n, t, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[0, :2] = -100
    labels[2, 5] = -100
    losses = {}
    for name, fn in cases(student, teacher, labels).items():
        x = student.clone().requires_grad_(True)
        value = fn(x)
        value.backward()
        losses[name] = dict(value=value.item(), grad=x.grad.flatten().tolist())
    inputs = dict(student=student.flatten().tolist(), teacher=teacher.flatten().tolist(), labels=labels.flatten().tolist())
    with open(path, "w") as f:
        json.dump(dict(torch=torch.__version__, n=n, t=t, v=v, inputs=inputs, losses=losses), f)


def make(tokens, hidden, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).requires_grad_(True)
    ht = torch.randn(tokens, 2 * hidden, generator=g) * 0.5
    wt = torch.randn(vocab, 2 * hidden, generator=g) / (2 * hidden) ** 0.5
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    return h, w, ht, wt, labels


def step(h, w, ht, wt, labels):
    student = h @ w.t()
    with torch.no_grad():
        teacher = ht @ wt.t()
    loss = jsd_trl(student, teacher, labels, 0.5)
    loss.backward()
    h.grad = None
    w.grad = None
    return loss.item()


def rss_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dump", metavar="FILE")
    p.add_argument("--timing", action="store_true")
    p.add_argument("--memory", choices=["materialised"])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="pytorch-distillation-results.json")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("PEER_THREADS", "1")))
    if a.dump:
        dump(a.dump)
        return
    x = make(a.tokens, a.hidden, a.vocab)
    if a.memory:
        step(*x)                                       # warm-up; large buffers are returned to the OS (MALLOC_MMAP_THRESHOLD_)
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident set to the current one
            f.write("5")
        before = rss_mib("VmRSS")
        step(*x)
        print(json.dumps(dict(path="pytorch_materialised", extra_mib=rss_mib("VmHWM") - before)))
        return
    h, w, ht, wt, labels = x
    with torch.no_grad():
        student_logits = (h @ w.t()).detach().requires_grad_(True)
        teacher_logits = ht @ wt.t()

    def from_logits():
        loss = jsd_trl(student_logits, teacher_logits, labels, 0.5)
        loss.backward()
        student_logits.grad = None
        return loss.item()

    records = []
    for name, call in (("jsd_materialised", lambda: step(*x)), ("jsd_from_logits", from_logits)):
        for _ in range(3):
            call()
        samples = []
        for _ in range(a.repeats):
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1e6)
        samples.sort()
        mid = len(samples) // 2
        median = samples[mid] if len(samples) % 2 else (samples[mid - 1] + samples[mid]) / 2
        rec = dict(suite="Distillation", loss=name, B=a.tokens, dtype="float32", device="cpu", method="ForwardBackward",
                   median_us=median, hidden=a.hidden, vocab=a.vocab, threads=torch.get_num_threads())
        records.append(rec)
        print(json.dumps(rec), flush=True)
    with open(a.out, "w") as f:
        json.dump(dict(torch=torch.__version__, device="cpu", records=records), f, indent=2)


if __name__ == "__main__":
    main()
