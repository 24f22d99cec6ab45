"""Summary of one `benchmarks/gpu/run.sh lottery` (or `rehearse`) run, as markdown, from the files its steps left.

Usage: python3 benchmarks/gpu/summarize.py WORK_DIR > summary.md
WORK_DIR holds machine.txt, steps.tsv and each step's NAME.log (tests, check, cross, timing-ours, timing-peer, logprobs,
memory), plus timing-ours.json and timing-peer.json. Everything printed comes from those files; a missing file is
reported as missing, never filled in.
"""
import json
import os
import re
import sys


def read(work, name):
    path = os.path.join(work, name)
    return open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else None


def lines(text, pattern):
    return [l for l in (text or "").splitlines() if re.search(pattern, l)]


def records(work, name):
    text = read(work, name)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return {(r["loss"], r["B"], r["dtype"], r["device"], r["method"]): r["median_us"] for r in data.get("records", [])}


def main(work):
    out = []
    say = out.append
    say("# GPU lottery run")
    say("")
    say("```")
    say((read(work, "machine.txt") or "machine.txt missing").strip())
    say("```")
    say("")
    say("| step | exit | seconds |")
    say("|---|---|---|")
    for row in (read(work, "steps.tsv") or "").splitlines():
        name, rc, took = (row.split("\t") + ["", "", ""])[:3]
        verdict = {"0": "0 (ok)", "124": "124 (timed out)", "137": "137 (killed at its limit)", "not-run": "not run"}.get(rc, rc)
        say(f"| {name} | {verdict} | {took} |")
    say("")

    say("## Correctness")
    say("")
    tests = read(work, "tests.log")
    summary = lines(tests, r"^\d+ passed, \d+ failed, \d+ skipped")
    say(f"- CUDA test classes (CudaTests, CudaKernelPlumbingTests): {summary[-1] if summary else 'no summary line (see tests.log)'}")
    for l in lines(tests, r"^(FAIL|ERROR) ")[:20]:
        say(f"  - {l}")
    check = read(work, "check.log")
    passed, failed = len(lines(check, r"^PASS ")), lines(check, r"^FAIL ")
    verdict = lines(check, r"^cuda-check: ")
    say(f"- --cuda-check: {passed} passed, {len(failed)} failed; {verdict[-1] if verdict else 'no closing line (see check.log)'}")
    for l in failed[:20]:
        say(f"  - {l}")
    for l in lines(check, r"^PASS sequence log-probs"):
        say(f"  - {l}")
    cross = read(work, "cross.log")
    agree = lines(cross, r"losses (agree|differ)")
    say(f"- peer cross-check (float64): {agree[-1] if agree else 'no closing line (see cross.log)'}")
    for l in lines(cross, r"^FAIL ")[:20]:
        say(f"  - {l}")
    say("")

    say("## Loss timings, ours vs the PyTorch peer (same run, same method: median of N calls after 20 warm-ups)")
    say("")
    ours, peer = records(work, "timing-ours.json"), records(work, "timing-peer.json")
    if not ours or not peer:
        say(f"missing: {'timing-ours.json ' if not ours else ''}{'timing-peer.json' if not peer else ''}")
    else:
        say("| loss | B | dtype | device | method | ours (us) | PyTorch eager (us) | ours / PyTorch |")
        say("|---|---:|---|---|---|---:|---:|---:|")
        for key in sorted(ours, key=lambda k: (k[0], k[4], k[1])):
            if key in peer:
                say(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {ours[key]:.1f} | {peer[key]:.1f} | {ours[key] / peer[key]:.2f} |")
    say("")

    say("## Log-probs from bf16 logits, and the copy ceiling")
    say("")
    for l in lines(check, r"^INFO (copy|sequence log-probs)") + lines(read(work, "logprobs.log"), r"^INFO "):
        say(f"- {l[5:]}")
    say("")

    say("## Distillation: fused heads vs materialised logits (JSD, forward + backward)")
    say("")
    found = lines(check, r"^INFO distillation")
    say("\n".join(f"- {l[5:]}" for l in found) if found else "not measured")
    say("")

    say("## Peak memory: fused LM-head log-probs vs materialised logits")
    say("")
    mem = read(work, "memory.log")
    found = lines(mem, r"^(INFO|FAIL) ")
    say("\n".join(f"- {l}" for l in found) if found else "not measured (no memory.log: a rehearsal, or the step did not run)")
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
