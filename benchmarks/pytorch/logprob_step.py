"""PyTorch peer of the CPU log-prob step: sequence log-probs from fp32 logits [N, T, V], forward and forward + backward
(a fresh gradient each call: logits.grad = None), the two ways PyTorch code computes them:

  naive:   log_softmax(logits).gather(labels).sum(-1)                     (TRL's selective_log_softmax for fp32 logits)
  chunked: per block of CHUNK tokens (torch.split), z.gather(labels) - logsumexp(z)   (the library's algorithm, eager)

  python3 benchmarks/pytorch/logprob_step.py --shapes 8x512x32000,4x1024x128256 --repeats 5 --chunk 1024 --out peer.json
  python3 benchmarks/pytorch/logprob_step.py --shapes '' --heads 256x1024x32000 --out peer.json     # the LM head (materialised)
  MALLOC_MMAP_THRESHOLD_=65536 python3 benchmarks/pytorch/logprob_step.py --shapes '' --heads 256x1024x32000 --head-memory

Median of REPEATS calls after 2 warm-ups, 1 thread unless PEER_THREADS says otherwise (the app's --logprob-timing times
its side the same way).
"""
import argparse
import json
import os
import time

import torch


def rss_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def median_us(call, repeats):
    for _ in range(2):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    mid = len(samples) // 2
    return samples[mid] if len(samples) % 2 else (samples[mid - 1] + samples[mid]) / 2


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8x512x32000,4x1024x128256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=1024, help="tokens per block of the chunked path")
    p.add_argument("--heads", default="", help="TOKENSxHxV cases of the LM head: h W^T, log_softmax, gather, backward")
    p.add_argument("--head-memory", action="store_true", help="print each head's extra resident memory of a step (beyond the gradients) instead of timing it")
    p.add_argument("--out", default="pytorch-logprob-results.json")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("PEER_THREADS", "1")))
    records = []
    for shape in filter(None, a.shapes.split(",")):
        n, t, v = (int(k) for k in shape.split("x"))
        torch.manual_seed(0)
        logits = torch.randn(n, t, v, requires_grad=True)
        labels = torch.randint(0, v, (n, t))

        def naive():
            return torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1).sum(-1)

        def chunked():
            # torch.split, not a loop of slices: the slices' backward would each allocate a zero gradient of the whole
            # logits (measured 4.4x naive here), split's backward assembles the chunks' gradients in one buffer
            out = [z.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
                   for z, y in zip(logits.view(-1, v).split(a.chunk), labels.view(-1).split(a.chunk))]
            return torch.cat(out).view(n, t).sum(-1)

        for name, fn in (("pytorch_naive", naive), ("pytorch_chunked", chunked)):
            def forward():
                with torch.no_grad():
                    return fn()[0].item()

            def both():
                fn().sum().backward()
                x = logits.grad[0, 0, 0].item()
                logits.grad = None
                return x

            for method, call in (("Forward", forward), ("ForwardBackward", both)):
                us = median_us(call, a.repeats)
                rec = dict(suite="LogProbs", loss=name, B=shape, dtype="float32", device="cpu", method=method, median_us=us,
                           threads=torch.get_num_threads(), gb_per_s=n * t * v * 4 / (us * 1e3))
                records.append(rec)
                print(json.dumps(rec), flush=True)
        del logits, labels
    for head in filter(None, a.heads.split(",")):
        tokens, hidden, vocab = (int(k) for k in head.split("x"))
        torch.manual_seed(0)
        h = (torch.randn(tokens, hidden) * 0.5).requires_grad_(True)
        w = (torch.randn(vocab, hidden) / hidden ** 0.5).requires_grad_(True)
        labels = torch.randint(0, vocab, (tokens,))

        def step():
            torch.log_softmax(h @ w.t(), -1).gather(-1, labels[:, None]).sum().backward()
            x = w.grad[0, 0].item()
            h.grad = w.grad = None
            return x

        if a.head_memory:
            # run with MALLOC_MMAP_THRESHOLD_=65536 (as the app's child processes are), so that freed buffers go back to the OS
            step()
            with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident set to the current one
                f.write("5")
            before = rss_mib("VmRSS")
            step()
            grads = (tokens * hidden + vocab * hidden) * 4 / 2**20      # h.grad and W.grad, which every path makes
            print(json.dumps(dict(path="head_pytorch_materialised", B=f"head {head}", extra_mib=rss_mib("VmHWM") - before - grads)), flush=True)
            continue
        us = median_us(step, a.repeats)
        rec = dict(suite="LogProbs", loss="head_pytorch_materialised", B=f"head {head}", dtype="float32", device="cpu",
                   method="ForwardBackward", median_us=us, threads=torch.get_num_threads())
        records.append(rec)
        print(json.dumps(rec), flush=True)
    with open(a.out, "w") as f:
        json.dump(dict(torch=torch.__version__, device="cpu", records=records), f, indent=2)


if __name__ == "__main__":
    main()
