#!/usr/bin/env bash
# Reproduces the GPU numbers in docs/benchmarks.md on a CUDA machine that has a pip PyTorch and no .NET SDK.
#
#   benchmarks/gpu/run.sh prepare              # here, with the .NET SDK: builds .gpu-bundle/ (apps + .NET runtime, ~45 MB)
#   benchmarks/gpu/run.sh lottery [DIR]        # there: the one short run for a lent device (at most 8 minutes, below)
#   benchmarks/gpu/run.sh rehearse [DIR]       # here: the same run with the CPU standing in for the GPU (plumbing check)
#   benchmarks/gpu/run.sh run [STAGE] [DIR]    # there: the long stages, one per call, for a session with more device time
#
# lottery: what a 15-minute device lease (start-up included) can afford, correctness first. Each step has its own time
# limit and the whole run stops starting steps at LOTTERY_BUDGET_S (default 420 s), so it ends inside 8 minutes:
#   tests     the CUDA test classes of Alignment.Losses.Tests (CudaTests, CudaKernelPlumbingTests) through the bundled
#             xunit runner (no SDK there): every catalogued loss on CUDA against its float64 oracle, the NVRTC kernels
#   check     --cuda-check: every benchmarked loss on CUDA vs float64 CPU, the fused log-prob kernels vs the chunked
#             path (fp32/bf16/fp16), log-probs from bf16 logits 8 x 1024 x 128256 timed against a copy of them
#             and the distillation losses fused from both heads (every divergence, top-k with the tail) vs float64 CPU, and
#             JSD at 4096 tokens x H 1024 x V 128256 timed fused vs materialised
#   cross     the PyTorch peer and the library compute the same functions (float64, values and gradients)
#   timing    DPO and RPO (and every name in LOTTERY_LOSSES) at B = 64 and 4096, forward and forward+backward,
#             ours (--quick-timing) and the peer's, the same method, same run
#   logprobs  the peer's log-probs (fp32 log_softmax + gather, and chunked) and copy at 8 x 1024 x 128256
#   memory    fused LM-head log-probs vs materialised logits, peak GPU memory (N=16, T=1024, H=4096, V=128256)
# Output, in DIR (default $OUT, else ./gpu-results): summary.md (the tables), lottery.log (every step's output) and
# lottery-results.tar.gz (each step's files): three files, within the device tool's limit of eight.
#
# Long stages (`run`; default all, in this order; each fits in a 10-minute command on an H100):
#   check   correctness on CUDA: every loss vs float64 CPU, fused log-prob kernels vs the chunked path, log-prob timing
#   memory  peak GPU memory per case (fresh child processes, cuMemGetInfo) and the largest RPO batch that fits
#   cuda    BenchmarkDotNet LossBenchmarks + RpoScalingBenchmarks, CUDA rows (in-process, short job, 100 ms iterations)
#   cpu     BenchmarkDotNet LossBenchmarks, CPU rows, on the GPU machine's CPU
#   peer    the PyTorch-eager peer: cross-check of its values with the library's, then timings on CUDA and on the CPU
#   report  the ratio tables (ours / PyTorch eager) from the files the stages left in DIR
# `report` also runs anywhere with python3 over collected files.
set -euo pipefail
cd "$(dirname "$0")/../.."
bundle=.gpu-bundle

apps=

# The .NET runtime and the apps unpacked into a temporary folder; libtorch from the machine's pip PyTorch, or from
# LIBTORCH_LIB (the rehearsal points it at TorchSharp-cpu's libtorch, which is the version TorchSharp was built for).
setup_runtime() {
  [ -f "$bundle/dotnet-rt.tar.xz" ] && [ -f "$bundle/apps.tar.xz" ] || { echo "no $bundle/: run '$0 prepare' first (and carry $bundle)" >&2; exit 2; }
  dn=$(mktemp -d)
  tar -C "$dn" -xJf "$bundle/dotnet-rt.tar.xz"
  apps=$(mktemp -d)
  tar -C "$apps" -xJf "$bundle/apps.tar.xz"
  export DOTNET_ROOT=$dn PATH=$dn:$PATH DOTNET_SYSTEM_GLOBALIZATION_INVARIANT=1 DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
  local torch_lib=${LIBTORCH_LIB:-}
  [ -n "$torch_lib" ] || torch_lib=$($python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
  export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}

bench() { dotnet "$apps/bench/Alignment.Losses.Benchmarks.dll" "$@"; }
python=${PEER_PYTHON:-python3}

stage() {
  local name=$1 out=$2
  case "$name" in
    check)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/machine.txt"
      $python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/machine.txt"
      bench --cuda-check 2>&1 | tee "$out/cuda-check.log" || true ;;
    memory)
      bench --cuda-memory 2>&1 | tee "$out/cuda-memory.log" || true ;;
    cuda|cpu)
      local suites=("*LossBenchmarks*")
      [ "$name" = cuda ] && suites+=("*RpoScalingBenchmarks*")
      BENCH_DEVICES=$name BENCH_ARTIFACTS="$out/bdn-$name" bench --filter "${suites[@]}" --job short --iterationTime 100 \
        2>&1 | tee "$out/bdn-$name.log" | grep -E '^\|' || true ;;
    peer)
      # first that the peer computes the same functions as the library (float64, every loss, values and gradients)
      $python benchmarks/pytorch/reference_losses.py --dump "$out/peer-values.json"
      bench --crosscheck "$out/peer-values.json" 2>&1 | tee "$out/peer-crosscheck.log" || true
      $python benchmarks/pytorch/reference_losses.py --device cuda --out "$out/pytorch-cuda.json" > "$out/pytorch-cuda.log"
      $python benchmarks/pytorch/reference_losses.py --device cpu --repeats 50 --out "$out/pytorch-cpu.json" > "$out/pytorch-cpu.log"
      $python benchmarks/pytorch/reference_losses.py --device cuda --memory > "$out/pytorch-memory.log" || true ;;
    report)
      for dev in cuda cpu; do
        report=$(ls "$out"/bdn-$dev/results/*LossBenchmarks*-report-full.json 2>/dev/null | head -1 || true)
        if [ -n "$report" ] && [ -f "$out/pytorch-$dev.json" ]; then
          python3 benchmarks/compare.py "$report" "$out/pytorch-$dev.json" --device $dev | tee "$out/ratio-$dev.md"
        else
          echo "report: no $dev results in $out (run the '$dev' and 'peer' stages first)"
        fi
      done ;;
    *) echo "unknown stage $name" >&2; exit 2 ;;
  esac
}

# One step of the lottery: its own time limit, capped by what is left of the run's budget; output to WORK/NAME.log and a
# row in WORK/steps.tsv (name, exit status, seconds). A step that is not started for want of time says so.
lottery_step() {
  local name=$1 limit=$2; shift 2
  local left=$((deadline - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    printf '%s\tnot-run\t0\n' "$name" >> "$work/steps.tsv"
    echo "== $name: not started, $left s left of the run's budget" | tee -a "$work/lottery.log"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*" | tee -a "$work/lottery.log"
  local t0=$(date +%s) rc=0
  timeout --kill-after=10 "$limit" "$@" > "$work/$name.log" 2>&1 || rc=$?
  local took=$(( $(date +%s) - t0 ))
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "(timed out after ${limit} s)" >> "$work/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >> "$work/steps.tsv"
  tail -n 40 "$work/$name.log" | tee -a "$work/lottery.log"
  echo "== $name: exit $rc, ${took} s" | tee -a "$work/lottery.log"
}

lottery() {
  local out=$1 mode=$2
  work=$(mktemp -d)
  deadline=$(( $(date +%s) + ${LOTTERY_BUDGET_S:-420} ))
  : > "$work/steps.tsv"
  local dev=cuda rehearse= shape=8x1024x128256 repeats=100 sizes=64,4096
  # the rehearsal's CPU takes 0.6 s per RPO call at B = 4096: smaller sizes, fewer repeats
  if [ "$mode" = rehearse ]; then dev=cpu rehearse=--rehearse shape=2x128x32000 repeats=30 sizes=64,512; fi
  local losses=${LOTTERY_LOSSES:-dpo,rpo}
  {
    echo "mode $mode, started $(date -u +%FT%TZ)"
    if [ "$mode" = rehearse ]; then echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
    else nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
    $python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    echo "libtorch for TorchSharp: ${LD_LIBRARY_PATH%%:*}"
  } > "$work/machine.txt" 2>&1
  cat "$work/machine.txt" | tee -a "$work/lottery.log"
  # 1. correctness first
  lottery_step tests 150 dotnet "$apps/tests/Alignment.Losses.TestRunner.dll" --class Alignment.Losses.Tests.CudaTests --class Alignment.Losses.Tests.CudaKernelPlumbingTests
  lottery_step check 120 dotnet "$apps/bench/Alignment.Losses.Benchmarks.dll" --cuda-check $rehearse
  lottery_step cross 60 bash -c "$python benchmarks/pytorch/reference_losses.py --dump '$work/peer-values.json' && dotnet '$apps/bench/Alignment.Losses.Benchmarks.dll' --crosscheck '$work/peer-values.json'"
  # 2. then the numbers
  lottery_step timing-ours 60 dotnet "$apps/bench/Alignment.Losses.Benchmarks.dll" --quick-timing --device $dev --losses "$losses" --sizes $sizes --dtypes float32 --repeats $repeats --out "$work/timing-ours.json"
  lottery_step timing-peer 60 $python benchmarks/pytorch/reference_losses.py --device $dev --losses "$losses" --sizes $sizes --dtypes float32 --repeats $repeats --out "$work/timing-peer.json"
  lottery_step logprobs 60 $python benchmarks/pytorch/reference_losses.py --logprobs $shape --device $dev
  if [ "$mode" = rehearse ]; then
    printf 'memory\tnot-run\t0\n' >> "$work/steps.tsv"
    echo "== memory: not run in a rehearsal (it reads the GPU's free memory)" | tee -a "$work/lottery.log"
  else
    lottery_step memory 90 dotnet "$apps/bench/Alignment.Losses.Benchmarks.dll" --cuda-memory --sections linear --linear-t 1024
  fi
  $python benchmarks/gpu/summarize.py "$work" > "$out/summary.md" 2>> "$work/lottery.log" || echo "summary failed (see lottery.log)" >> "$out/summary.md"
  cp "$work/lottery.log" "$out/lottery.log"
  tar -C "$work" -czf "$out/lottery-results.tar.gz" .
  rm -rf "$work"
  cat "$out/summary.md"
}

case "${1:-}" in
  prepare)
    rm -rf "$bundle" && mkdir -p "$bundle/apps"
    # managed TorchSharp only (no TorchSharp-cpu): libtorch comes from the machine's pip PyTorch
    for app in benchmarks/Alignment.Losses.Benchmarks:bench tests/Alignment.Losses.TestRunner:tests; do
      dotnet publish "${app%%:*}" -c Release -r linux-x64 --self-contained false \
        -p:TorchBackend=python -p:TorchSharpWeakenGlibcxx=true -o "$bundle/apps/${app##*:}"
    done
    tar -C "$bundle/apps" -cJf "$bundle/apps.tar.xz" bench tests
    rm -rf "$bundle/apps"
    sdk_root=$(dirname "$(readlink -f "$(command -v dotnet)")")
    runtime=$(ls "$sdk_root/shared/Microsoft.NETCore.App" | sort -V | tail -1)
    tar -C "$sdk_root" -cJf "$bundle/dotnet-rt.tar.xz" dotnet host "shared/Microsoft.NETCore.App/$runtime"
    du -sh "$bundle"
    echo "bundle ready: carry $bundle/ to the GPU machine and run: benchmarks/gpu/run.sh lottery"
    ;;
  lottery|rehearse)
    out=${2:-${OUT:-gpu-results}}
    if [ "$1" = rehearse ]; then
      # TorchSharp-cpu's libtorch (the version TorchSharp 0.107 was built for) and a python3 with torch for the peer
      export LIBTORCH_LIB=${LIBTORCH_LIB:-$(ls -d "${NUGET_PACKAGES:-$HOME/.nuget/packages}"/libtorch-cpu-linux-x64/*/runtimes/linux-x64/native | sort -V | tail -1)}
      for p in "$python" /usr/bin/python3; do "$p" -c "import torch" 2>/dev/null && { python=$p; break; }; done
      out=${2:-gpu-results-rehearsal}
    fi
    mkdir -p "$out"
    setup_runtime
    lottery "$out" "$1"
    ;;
  run)
    which=${2:-all}
    out=${3:-${OUT:-gpu-results}}
    mkdir -p "$out"
    [ "$which" = report ] || setup_runtime
    if [ "$which" = all ]; then
      for s in check memory cuda cpu peer report; do stage $s "$out"; done
    else
      stage "$which" "$out"
    fi
    ;;
  *)
    echo "usage: $0 prepare | lottery [output-dir] | rehearse [output-dir] | run [check|memory|cuda|cpu|peer|report|all] [output-dir]" >&2
    exit 2
    ;;
esac
