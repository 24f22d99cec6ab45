#!/usr/bin/env bash
# Reproduces the GPU benchmark numbers in docs/benchmarks.md on a CUDA machine that has a pip PyTorch and no .NET SDK.
#
#   benchmarks/gpu/run.sh prepare              # here, with the .NET SDK: builds .gpu-bundle/ (benchmark app + .NET runtime)
#   benchmarks/gpu/run.sh run [STAGE] [DIR]    # there, in the repository root with .gpu-bundle/ copied along
#
# Stages (default: all, in this order; each fits in a 10-minute command on an H100):
#   check   correctness on CUDA: every loss vs float64 CPU, fused log-prob kernels vs the chunked path, log-prob timing
#   memory  peak GPU memory per case (fresh child processes, cuMemGetInfo) and the largest RPO batch that fits
#   cuda    BenchmarkDotNet LossBenchmarks + RpoScalingBenchmarks, CUDA rows (in-process, short job, 100 ms iterations)
#   cpu     BenchmarkDotNet LossBenchmarks, CPU rows, on the GPU machine's CPU
#   peer    the PyTorch-eager peer: cross-check of its values with the library's, then timings on CUDA and on the CPU
#   report  the ratio tables (ours / PyTorch eager) from the files the stages left in DIR
# Output goes to DIR (default $OUT, else ./gpu-results). `report` also runs anywhere with python3 over collected files.
set -euo pipefail
cd "$(dirname "$0")/../.."
bundle=.gpu-bundle

setup_runtime() {
  dn=$(mktemp -d)
  tar -C "$dn" -xJf "$bundle/dotnet-rt.tar.xz"
  export DOTNET_ROOT=$dn PATH=$dn:$PATH DOTNET_SYSTEM_GLOBALIZATION_INVARIANT=1 DOTNET_CLI_TELEMETRY_OPTOUT=1
  torch_lib=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
  export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}

bench() { dotnet "$bundle/bench/Alignment.Losses.Benchmarks.dll" "$@"; }

stage() {
  local name=$1 out=$2
  case "$name" in
    check)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/machine.txt"
      python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/machine.txt"
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
      python3 benchmarks/pytorch/reference_losses.py --dump "$out/peer-values.json"
      bench --crosscheck "$out/peer-values.json" 2>&1 | tee "$out/peer-crosscheck.log" || true
      python3 benchmarks/pytorch/reference_losses.py --device cuda --out "$out/pytorch-cuda.json" > "$out/pytorch-cuda.log"
      python3 benchmarks/pytorch/reference_losses.py --device cpu --repeats 50 --out "$out/pytorch-cpu.json" > "$out/pytorch-cpu.log"
      python3 benchmarks/pytorch/reference_losses.py --device cuda --memory > "$out/pytorch-memory.log" || true ;;
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

case "${1:-}" in
  prepare)
    rm -rf "$bundle" && mkdir -p "$bundle"
    # managed TorchSharp only (no TorchSharp-cpu): libtorch comes from the machine's pip PyTorch
    dotnet publish benchmarks/Alignment.Losses.Benchmarks -c Release -r linux-x64 --self-contained false \
      -p:TorchBackend=python -p:TorchSharpWeakenGlibcxx=true -o "$bundle/bench"
    sdk_root=$(dirname "$(readlink -f "$(command -v dotnet)")")
    runtime=$(ls "$sdk_root/shared/Microsoft.NETCore.App" | sort -V | tail -1)
    tar -C "$sdk_root" -cJf "$bundle/dotnet-rt.tar.xz" dotnet host "shared/Microsoft.NETCore.App/$runtime"
    du -sh "$bundle"
    echo "bundle ready: copy the repository with $bundle/ to the GPU machine and run: benchmarks/gpu/run.sh run"
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
    echo "usage: $0 prepare | run [check|memory|cuda|cpu|peer|report|all] [output-dir]" >&2
    exit 2
    ;;
esac
