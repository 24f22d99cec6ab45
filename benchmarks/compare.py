"""Prints the ratio table ours / PyTorch eager from our timings and reference_losses.py's JSON.

Usage: python3 benchmarks/compare.py <ours.json> <pytorch-results.json> [--device cuda] [--op-by-op <ours-op-by-op.json>]
       [--plain <plain-torchsharp.json>]
ours.json is a BenchmarkDotNet *-report-full.json export, or the app's --quick-timing output (the peer's record format).
A ratio below 1.0 means Alignment.Losses is faster. Medians are compared. With --op-by-op, a second timing of ours
(the same losses with FusedCpu = false) adds its column and its ratio to the peer; with --plain, a timing of the bare
formula in TorchSharp ops does the same.
"""
import json
import sys


def bdn_records(path):
    data = json.load(open(path))
    if "records" in data:                      # --quick-timing: already the peer's records
        for r in data["records"]:
            yield (r["loss"], r["B"], r["dtype"], r["device"], r["method"]), r["median_us"]
        return
    for bench in data["Benchmarks"]:
        params = dict(p.split("=", 1) for p in bench.get("Parameters", "").split("&") if "=" in p)
        stats = bench.get("Statistics") or {}
        if "Median" not in stats:
            continue
        yield (params.get("Loss"), int(params.get("B", 0)), params.get("DType"), params.get("Device"), bench["Method"]), stats["Median"] / 1000.0


def main():
    argv = sys.argv[1:]
    device = argv[argv.index("--device") + 1] if "--device" in argv else None
    extra = [(label, dict(bdn_records(argv[argv.index(flag) + 1])))
             for flag, label in (("--op-by-op", "ours op by op"), ("--plain", "plain TorchSharp")) if flag in argv]
    valued = {i + 1 for i, a in enumerate(argv) if a in ("--device", "--op-by-op", "--plain")}
    args = [a for i, a in enumerate(argv) if not a.startswith("--") and i not in valued]
    ours = dict(bdn_records(args[0]))
    peer = json.load(open(args[1]))
    theirs = {(r["loss"], r["B"], r["dtype"], r["device"], r["method"]): r["median_us"] for r in peer["records"]}
    print(f"PyTorch {peer.get('torch')} on {peer.get('gpu') or peer.get('device')}")
    header = "| loss | B | dtype | device | method | ours (us) | PyTorch eager (us) | ratio |"
    for label, _ in extra:
        header += f" {label} (us) | {label} ratio |"
    print(header)
    print("|---" * (8 + 2 * len(extra)) + "|")
    worst = 0.0
    for key in sorted(ours, key=lambda k: (k[0], k[4], k[2], k[3], k[1])):
        if device and key[3] != device or key not in theirs:
            continue
        ratio = ours[key] / theirs[key]
        worst = max(worst, ratio)
        row = f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {ours[key]:.1f} | {theirs[key]:.1f} | {ratio:.2f} |"
        for _, timing in extra:
            row += f" {timing[key]:.1f} | {timing[key] / theirs[key]:.2f} |" if key in timing else " - | - |"
        print(row)
    print(f"\nworst ratio: {worst:.2f}")


if __name__ == "__main__":
    main()
