#!/usr/bin/env bash
# One command: the library against the PyTorch-eager peer (benchmarks/pytorch/reference_losses.py), same machine, same
# run, same timing method (20 warm-ups, median of N calls, each reading a value back to the host).
#
#   benchmarks/compare-with-pytorch.sh [LOSSES] [SIZES] [DEVICE] [REPEATS]
#   benchmarks/compare-with-pytorch.sh dpo,kto 64,1024 cpu 100       # defaults: dpo, 64, cpu, 100
#
# First the cross-check (both sides compute every loss in float64 on the peer's inputs: values and gradients must
# agree to 1e-9, or the timings mean nothing), then our timings (--quick-timing), the peer's, and the ratio table.
# Needs a python3 with PyTorch (Debian: apt-get install python3-torch; PEER_PYTHON=... picks another).
set -euo pipefail
cd "$(dirname "$0")/.."
losses=${1:-dpo}
sizes=${2:-64}
device=${3:-cpu}
repeats=${4:-100}
source benchmarks/peer-python.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dotnet build -c Release benchmarks/Alignment.Losses.Benchmarks -v q -nologo >/dev/null
app=(dotnet run -c Release --no-build --project benchmarks/Alignment.Losses.Benchmarks --)
"$python" benchmarks/pytorch/reference_losses.py --dump "$work/peer-values.json" >/dev/null
"${app[@]}" --crosscheck "$work/peer-values.json" | tail -1
"${app[@]}" --quick-timing --device "$device" --losses "$losses" --sizes "$sizes" --dtypes float32 --repeats "$repeats" --out "$work/ours.json" >/dev/null
"$python" benchmarks/pytorch/reference_losses.py --device "$device" --losses "$losses" --sizes "$sizes" --dtypes float32 --repeats "$repeats" --out "$work/peer.json" >/dev/null
"$python" benchmarks/compare.py "$work/ours.json" "$work/peer.json" --device "$device"
