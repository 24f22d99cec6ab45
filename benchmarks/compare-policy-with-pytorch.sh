#!/usr/bin/env bash
# The policy-gradient objectives against their PyTorch-eager peer (benchmarks/pytorch/policy_losses.py, TRL-style
# formulas), same machine, same run, same timing method (20 warm-ups, median of N calls, each reading a value back).
#
#   benchmarks/compare-policy-with-pytorch.sh [LOSSES] [SIZES] [TOKENS] [DEVICE] [REPEATS]
#   benchmarks/compare-policy-with-pytorch.sh grpo,dapo 64,512 256 cpu 100        # defaults: all 7, 64,512, 256, cpu, 100
#
# First the float64 cross-check (values and gradients must agree to 1e-9; ours and the plain TorchSharp formulas), then
# the timings (ours on the fused CPU pass, the peer, ours op by op with FusedCpu = false, the bare formula in TorchSharp
# ops) and the ratio table.
set -euo pipefail
cd "$(dirname "$0")/.."
losses=${1:-grpo,dapo,dr_grpo,bnpo,gspo,cispo,sapo}
sizes=${2:-64,512}
tokens=${3:-256}
device=${4:-cpu}
repeats=${5:-100}
source benchmarks/peer-python.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dotnet build -c Release benchmarks/Alignment.Losses.Benchmarks -v q -nologo >/dev/null
app=(dotnet run -c Release --no-build --project benchmarks/Alignment.Losses.Benchmarks --)
"$python" benchmarks/pytorch/policy_losses.py --dump "$work/peer-values.json" >/dev/null
"${app[@]}" --pg-crosscheck "$work/peer-values.json" | tail -1
"${app[@]}" --pg-timing --device "$device" --losses "$losses" --sizes "$sizes" --tokens "$tokens" --repeats "$repeats" --out "$work/ours.json" >/dev/null
"$python" benchmarks/pytorch/policy_losses.py --device "$device" --losses "$losses" --sizes "$sizes" --tokens "$tokens" --repeats "$repeats" --out "$work/peer.json" >/dev/null
"${app[@]}" --pg-timing --op-by-op --device "$device" --losses "$losses" --sizes "$sizes" --tokens "$tokens" --repeats "$repeats" --out "$work/opbyop.json" >/dev/null
"${app[@]}" --pg-timing --plain --device "$device" --losses "$losses" --sizes "$sizes" --tokens "$tokens" --repeats "$repeats" --out "$work/bare.json" >/dev/null
"$python" benchmarks/compare.py "$work/ours.json" "$work/peer.json" --device "$device" --op-by-op "$work/opbyop.json" --plain "$work/bare.json"
