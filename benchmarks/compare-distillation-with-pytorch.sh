#!/usr/bin/env bash
# Distillation (JSD 0.5, a student head with grad and a twice-wider frozen teacher head) against its PyTorch-eager peer
# (benchmarks/pytorch/distillation_losses.py: TRL's formula on materialised logits), same machine, same run:
# time per forward + backward (median, both sides on 1 thread) and the extra resident memory of one step (a child process each, malloc's mmap
# threshold fixed so freed buffers go back to the OS on both sides, the peak reset after a warm-up step).
#
#   benchmarks/compare-distillation-with-pytorch.sh [TOKENS] [HIDDEN] [VOCAB] [REPEATS]
#   benchmarks/compare-distillation-with-pytorch.sh 512 256 16384 10                      # the defaults
#
# First the float64 cross-check of all 10 cases (TRL, Liger, NeMo-RL formulas; values and gradients to 1e-9).
set -euo pipefail
cd "$(dirname "$0")/.."
tokens=${1:-512}
hidden=${2:-256}
vocab=${3:-16384}
repeats=${4:-10}
source benchmarks/peer-python.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dotnet build -c Release benchmarks/Alignment.Losses.Benchmarks -v q -nologo >/dev/null
app=(dotnet run -c Release --no-build --project benchmarks/Alignment.Losses.Benchmarks --)
"$python" benchmarks/pytorch/distillation_losses.py --dump "$work/peer-values.json"
"${app[@]}" --distill-crosscheck "$work/peer-values.json" | tail -1
"${app[@]}" --distill-timing --tokens "$tokens" --hidden "$hidden" --vocab "$vocab" --repeats "$repeats" --out "$work/ours.json" >/dev/null
"$python" benchmarks/pytorch/distillation_losses.py --timing --tokens "$tokens" --hidden "$hidden" --vocab "$vocab" --repeats "$repeats" --out "$work/peer.json" >/dev/null
MALLOC_MMAP_THRESHOLD_=65536 "$python" benchmarks/pytorch/distillation_losses.py --memory materialised --tokens "$tokens" --hidden "$hidden" --vocab "$vocab" > "$work/peer-memory.json"
"$python" - "$work" "$tokens" "$hidden" "$vocab" <<'PY'
import json, sys
work, tokens, hidden, vocab = sys.argv[1:5]
ours = {r["loss"]: r for r in json.load(open(f"{work}/ours.json"))["records"]}
peer = json.load(open(f"{work}/peer.json"))
theirs = {r["loss"]: r for r in peer["records"]}
p = theirs["jsd_materialised"]
mem = json.loads(open(f"{work}/peer-memory.json").read().strip().splitlines()[-1])["extra_mib"]
logits_mib = int(tokens) * int(vocab) * 4 / 2**20
print(f"PyTorch {peer['torch']}, {p['threads']} threads; {tokens} tokens, H {hidden} (teacher {2 * int(hidden)}), V {vocab}; one [tokens, V] fp32 = {logits_mib:.0f} MiB")
print("| path | forward + backward (ms) | ratio to PyTorch | extra memory (MiB) | ratio to PyTorch |")
print("|---|---|---|---|---|")
for name, label in (("jsd_fused_heads", "ours, fused heads"), ("jsd_materialised", "ours, materialised logits")):
    r = ours[name]
    print(f"| {label} | {r['median_us'] / 1000:.1f} | {r['median_us'] / p['median_us']:.2f} | {r['extra_mib']:.0f} | {r['extra_mib'] / mem:.2f} |")
print(f"| PyTorch eager, materialised (TRL) | {p['median_us'] / 1000:.1f} | 1.00 | {mem:.0f} | 1.00 |")
q, r = theirs["jsd_from_logits"], ours["jsd_from_logits"]
print(f"\nthe loss alone, from given logits (no matrix product): ours {r['median_us'] / 1000:.1f} ms, PyTorch {q['median_us'] / 1000:.1f} ms, "
      f"ratio {r['median_us'] / q['median_us']:.2f}")
PY
