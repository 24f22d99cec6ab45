#!/usr/bin/env bash
# Reproduces the GPU benchmark numbers in docs/benchmarks.md on a CUDA machine that has a pip PyTorch and no .NET SDK.
#
#   benchmarks/gpu/run.sh prepare      # here, with the .NET SDK: builds .gpu-bundle/ (benchmark app + .NET runtime)
#   benchmarks/gpu/run.sh run [DIR]    # there, in the repository root with .gpu-bundle/ copied along: runs the
#                                      # BenchmarkDotNet suites (in-process) and the PyTorch-eager peer in the same
#                                      # session, then prints the ratio table; everything lands in DIR (default $OUT or ./gpu-results)
set -euo pipefail
cd "$(dirname "$0")/../.."
bundle=.gpu-bundle

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
    out=${2:-${OUT:-gpu-results}}
    mkdir -p "$out"
    dn=$(mktemp -d)
    tar -C "$dn" -xJf "$bundle/dotnet-rt.tar.xz"
    export DOTNET_ROOT=$dn PATH=$dn:$PATH DOTNET_SYSTEM_GLOBALIZATION_INVARIANT=1 DOTNET_CLI_TELEMETRY_OPTOUT=1
    torch_lib=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
    export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/machine.txt"
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/machine.txt"
    # 0. correctness on CUDA (every loss vs float64 CPU; fused log-prob kernels vs the chunked path) and issue #7's timing
    dotnet "$bundle/bench/Alignment.Losses.Benchmarks.dll" --cuda-check 2>&1 | tee "$out/cuda-check.log" || true
    # 1. our suites (BenchmarkDotNet, in-process, short job)
    BENCH_ARTIFACTS="$out/bdn" dotnet "$bundle/bench/Alignment.Losses.Benchmarks.dll" \
      --filter '*LossBenchmarks*' '*RpoScalingBenchmarks*' --job short 2>&1 | tee "$out/bdn.log" | grep -E '^\|' || true
    # 2. the PyTorch-eager peer, same machine, same session
    python3 benchmarks/pytorch/reference_losses.py --device cuda --out "$out/pytorch-cuda.json" > "$out/pytorch-cuda.log"
    python3 benchmarks/pytorch/reference_losses.py --device cpu --repeats 50 --out "$out/pytorch-cpu.json" > "$out/pytorch-cpu.log"
    # 3. ratio tables (ours / PyTorch eager)
    report=$(ls "$out"/bdn/results/*LossBenchmarks*-report-full.json | head -1)
    python3 benchmarks/compare.py "$report" "$out/pytorch-cuda.json" --device cuda | tee "$out/ratio-cuda.md"
    python3 benchmarks/compare.py "$report" "$out/pytorch-cpu.json" --device cpu | tee "$out/ratio-cpu.md"
    ;;
  *)
    echo "usage: $0 prepare | run [output-dir]" >&2
    exit 2
    ;;
esac
