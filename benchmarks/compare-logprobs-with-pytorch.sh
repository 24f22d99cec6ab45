#!/usr/bin/env bash
# The CPU log-prob step (sequence log-probs from fp32 logits, forward and forward + backward, a fresh gradient per call)
# against its PyTorch-eager peer (benchmarks/pytorch/logprob_step.py: naive log_softmax + gather, and the same chunked
# algorithm in eager PyTorch), same machine, same run, both sides on THREADS threads; next to the memory floor measured
# in the same run (one read of the logits; a fresh buffer of their size written once, with and without huge pages).
#
#   benchmarks/compare-logprobs-with-pytorch.sh [SHAPES] [REPEATS] [THREADS] [HEADS]
#   benchmarks/compare-logprobs-with-pytorch.sh 8x512x32000,4x1024x128256 5 1          # the defaults (about 8 min here)
#   benchmarks/compare-logprobs-with-pytorch.sh '' 3 1 256x1024x32000                 # the LM head only (TOKENSxHxV)
# HEADS (none by default): the fused LM head against materialised logits, h W^T + log_softmax + gather + backward.
set -euo pipefail
cd "$(dirname "$0")/.."
shapes=${1-8x512x32000,4x1024x128256}   # an empty SHAPES runs none (heads only)
repeats=${2:-5}
threads=${3:-1}
heads=${4:-}
source benchmarks/peer-python.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dotnet build -c Release benchmarks/Alignment.Losses.Benchmarks -v q -nologo >/dev/null
dotnet run -c Release --no-build --project benchmarks/Alignment.Losses.Benchmarks -- --logprob-timing --shapes "$shapes" --repeats "$repeats" \
  --threads "$threads" --heads "$heads" --out "$work/ours.json" >/dev/null
PEER_THREADS=$threads "$python" benchmarks/pytorch/logprob_step.py --shapes "$shapes" --repeats "$repeats" --heads "$heads" --out "$work/peer.json" >/dev/null
: > "$work/peer-memory.jsonl"
[ -z "$heads" ] || PEER_THREADS=$threads MALLOC_MMAP_THRESHOLD_=65536 "$python" benchmarks/pytorch/logprob_step.py --shapes '' --heads "$heads" --head-memory \
  --out "$work/unused.json" > "$work/peer-memory.jsonl"
"$python" - "$work" <<'PY'
import json, sys
work = sys.argv[1]
peer = json.load(open(f"{work}/peer.json"))
recs = json.load(open(f"{work}/ours.json"))["records"] + peer["records"]
at = {(r["B"], r["loss"], r["method"]): r["median_us"] / 1000 for r in recs}
shapes = [b for b in dict.fromkeys(r["B"] for r in recs) if not b.startswith("head")]
print(f"PyTorch {peer['torch']}, {recs[0]['threads']} thread(s) per side; ms, median; fp32 logits, fresh gradient per call")
for shape in shapes:
    n, t, v = (int(k) for k in shape.split("x"))
    gb = n * t * v * 4 / 1e9
    read, write, huge = (at[(shape, k, "Forward")] for k in ("floor_read", "floor_fresh_write", "floor_fresh_write_huge"))
    floor_f, floor_b = read, 2 * read + huge
    print(f"\n{shape} ({gb:.2f} GB of logits). Floor: read {gb / read * 1e3:.1f} GB/s ({read:.0f} ms), fresh write {gb / write * 1e3:.1f} GB/s "
          f"({write:.0f} ms), with huge pages {gb / huge * 1e3:.1f} GB/s ({huge:.0f} ms); forward floor {floor_f:.0f} ms (one read), "
          f"forward + backward {floor_b:.0f} ms (two reads and a fresh write)")
    print("| path | forward | ÷ naive | ÷ chunked | ÷ floor | forward + backward | ÷ naive | ÷ chunked | ÷ floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    nf, nb = at[(shape, "pytorch_naive", "Forward")], at[(shape, "pytorch_naive", "ForwardBackward")]
    cf, cb = at[(shape, "pytorch_chunked", "Forward")], at[(shape, "pytorch_chunked", "ForwardBackward")]
    for key, label in (("ours_kernel", "ours, kernel (default)"), ("ours_kernel_no_huge_pages", "ours, kernel, no huge pages"),
                       ("ours_chunked", "ours, chunked libtorch (FusedCpu = false)"), ("torchsharp_naive", "TorchSharp log_softmax + gather"),
                       ("pytorch_naive", "PyTorch eager log_softmax + gather"), ("pytorch_chunked", "PyTorch eager chunked, same algorithm")):
        f, b = at.get((shape, key, "Forward")), at[(shape, key, "ForwardBackward")]
        fs = f"{f:.0f} | {f / nf:.2f} | {f / cf:.2f} | {f / floor_f:.2f}" if f else "- | - | - | -"
        print(f"| {label} | {fs} | {b:.0f} | {b / nb:.2f} | {b / cb:.2f} | {b / floor_b:.2f} |")
mem = {(r["B"], r["loss"]): r["extra_mib"] for r in recs if "extra_mib" in r}
for line in open(f"{work}/peer-memory.jsonl"):
    if line.startswith("{"):
        r = json.loads(line)
        mem[(r["B"], r["path"])] = r["extra_mib"]
for head in [b for b in dict.fromkeys(r["B"] for r in recs) if b.startswith("head")]:
    print(f"\nLM {head} (tokens x H x V), forward + backward: time (ms, median) and the extra resident memory of a step beyond")
    print("the gradients of h and W (MiB, a child process each, malloc's mmap threshold 64 KiB on both sides)")
    print("| path | time | ÷ PyTorch materialised | ÷ TorchSharp materialised | extra memory | ÷ PyTorch materialised |")
    print("|---|---|---|---|---|---|")
    p, t = at[(head, "head_pytorch_materialised", "ForwardBackward")], at[(head, "head_torchsharp_materialised", "ForwardBackward")]
    pm = mem[(head, "head_pytorch_materialised")]
    for key, label in (("head_ours_fused", "ours, fused head (default)"), ("head_ours_fused_libtorch", "ours, fused head, FusedCpu = false"),
                       ("head_ours_retained", "ours, fused head, RetainHeadLogits"),
                       ("head_torchsharp_materialised", "TorchSharp materialised"), ("head_pytorch_materialised", "PyTorch eager materialised")):
        b, m = at[(head, key, "ForwardBackward")], mem[(head, key)]
        print(f"| {label} | {b:.0f} | {b / p:.2f} | {b / t:.2f} | {m:.0f} | {m / pm:.2f} |")
PY
