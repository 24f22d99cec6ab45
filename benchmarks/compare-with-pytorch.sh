#!/usr/bin/env bash
# One command: the library against the PyTorch-eager peer (benchmarks/pytorch/reference_losses.py), same machine, same
# run, same timing method (warm-up calls, median of N calls, each reading a value back to the host).
#
#   benchmarks/compare-with-pytorch.sh [LOSSES] [SIZES] [DEVICE] [REPEATS] [SKIP]
#   benchmarks/compare-with-pytorch.sh dpo,kto 64,1024 cpu 100          # defaults: dpo, 64, cpu, 100, rpo@1024,rpo@4096
#   benchmarks/compare-with-pytorch.sh all 8,64,1024,4096 cpu 200        # every loss (6.5 minutes on a 2-core VM)
#
# First the cross-check (both sides compute every loss in float64 on the peer's inputs: values and gradients must agree
# to 1e-9, ours and the plain TorchSharp formulas, or the timings mean nothing), then four timings, float32, one after
# the other: ours (the fused CPU pass where a loss has one), the peer, ours op by op (FusedCpu = false), and the peer's
# formulas in bare TorchSharp ops; then the ratio table. SKIP (NAME@B,...) leaves cases out on every side: by default
# RPO at 1024 and 4096, where this PyTorch build's matmul makes the peer's call take most of a second.
# Needs a python3 with PyTorch (Debian: apt-get install python3-torch; PEER_PYTHON=... picks another).
set -euo pipefail
cd "$(dirname "$0")/.."
losses=${1:-dpo}
sizes=${2:-64}
device=${3:-cpu}
repeats=${4:-100}
skip=${5-rpo@1024,rpo@4096}
source benchmarks/peer-python.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dotnet build -c Release benchmarks/Alignment.Losses.Benchmarks -v q -nologo >/dev/null
app=(dotnet run -c Release --no-build --project benchmarks/Alignment.Losses.Benchmarks --)
peer_losses=()
[ "$losses" = all ] || peer_losses=(--losses "$losses")
common=(--device "$device" --sizes "$sizes" --dtypes float32 --repeats "$repeats" --skip "$skip")
"$python" benchmarks/pytorch/reference_losses.py --dump "$work/peer-values.json" >/dev/null
"${app[@]}" --crosscheck "$work/peer-values.json" | tail -1
"${app[@]}" --quick-timing --losses "$losses" "${common[@]}" --out "$work/ours.json" >/dev/null
"$python" benchmarks/pytorch/reference_losses.py "${peer_losses[@]}" "${common[@]}" --out "$work/peer.json" >/dev/null
"${app[@]}" --quick-timing --op-by-op --losses "$losses" "${common[@]}" --out "$work/opbyop.json" >/dev/null
"${app[@]}" --quick-timing --plain --losses "$losses" "${common[@]}" --out "$work/bare.json" >/dev/null
"$python" benchmarks/compare.py "$work/ours.json" "$work/peer.json" --device "$device" --op-by-op "$work/opbyop.json" --plain "$work/bare.json"
