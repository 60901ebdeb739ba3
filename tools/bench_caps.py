"""One run, two memory caps: is a decode step under a small memcap slower than under a large one?

    python tools/bench_caps.py MODEL [--caps 512M,4G] [--budget 512M] [--new-tokens 16]

The disk's read rate here drifts by 20% within minutes, more than the difference being measured, so
separate runs under each cap cannot settle it. This runs one generation inside `streamer memcap` at
the larger cap and rewrites its own cgroup's limit before every decode step, alternating between the caps:
each step under the small cap has a neighbour under the large one, a few seconds apart. Both read the same
bytes (one --memory-budget for the whole run, which must fit the small cap). Lowering the limit makes the
kernel reclaim down to it first, so the small cap's steps also pay for re-reading whatever code pages the
switch evicted: the comparison errs against the small cap.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from bench import MEMCAP, drop_caches, random_prompt  # tools/ is on sys.path when this script runs


def major_faults() -> int:
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[9])


def worker(model: Path, caps: list[str], budget: str, prompt_len: int, new_tokens: int) -> dict:
    from streamer import Engine
    from streamer.budget import cgroup_limit_files, parse_size
    limit_files = cgroup_limit_files()
    if not limit_files:
        raise SystemExit("bench_caps: not inside a memory cgroup (run through memcap)")
    context = prompt_len + new_tokens + 1
    steps = []
    with Engine(model, budget, "bfloat16", max_seq_len=context) as engine:
        runner, cache = engine.runner(1, context), engine.kv_cache(1)
        cache.reserve(0, context)
        ids = random_prompt(random.Random(64), prompt_len)
        logits = runner.forward([(0, ids)], cache, phase="prefill")
        for k in range(new_tokens):
            cap = caps[k % len(caps)]
            limit_files[0].write_text(str(parse_size(cap)))  # blocks while the kernel reclaims down to it
            faults, t0 = major_faults(), time.perf_counter()
            logits = runner.forward([(0, [int(logits[0].argmax())])], cache, phase="decode")
            steps.append({"cap": cap, "s": time.perf_counter() - t0, "major_faults": major_faults() - faults})
        cache.close()
        mem, ring = engine.memory(), engine.plan.ring_bytes
    return {"budget": budget, "ring_bytes": ring, "steps": steps, "peak_private": mem.peak["private"],
            "peak_rss": mem.peak["rss"]}


def report(res: dict, caps: list[str]) -> str:
    by_cap = {c: [s["s"] for s in res["steps"] if s["cap"] == c] for c in caps}
    med = {c: sorted(v)[len(v) // 2] for c, v in by_cap.items()}
    low, high = caps[0], caps[1]
    pairs = [a / b for a, b in zip(by_cap[low], by_cap[high])]
    faults = {c: sum(s["major_faults"] for s in res["steps"] if s["cap"] == c) for c in caps}
    lines = [f"One generation, --memory-budget {res['budget']} (weight ring {res['ring_bytes'] / 2**20:.0f} MiB), "
             f"peak private {res['peak_private'] / 2**20:.0f} MiB; the cgroup limit alternates per decode step.", "",
             "| memcap | decode steps (s) | median | major page faults |", "|---|---|---|---|"]
    for c in caps:
        lines.append(f"| {c} | {', '.join(f'{x:.2f}' for x in by_cap[c])} | {med[c]:.2f} | {faults[c]} |")
    pairs_s = ", ".join(f"{x:.2f}" for x in pairs)
    lines += ["", f"{low} against {high}: ratio of medians {med[low] / med[high]:.3f}; of sums "
              f"{sum(by_cap[low][:len(pairs)]) / sum(by_cap[high][:len(pairs)]):.3f}; step by step {pairs_s}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--caps", default="512M,4G", help="the small cap, then the large one")
    p.add_argument("--budget", help="--memory-budget for the run (default: the small cap)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    caps = a.caps.split(",")
    if len(caps) != 2:
        p.error("--caps takes two sizes: small,large")
    budget = a.budget or caps[0]
    if a.worker:
        print(json.dumps(worker(a.model, caps, budget, a.prompt_len, a.new_tokens)))
        return
    drop_caches()
    cmd = MEMCAP + [caps[1], "--", sys.executable, __file__, str(a.model), "--worker", "--caps", a.caps,
           "--budget", budget, "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(Path(__file__).parent)})
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode or not lines:
        raise SystemExit(f"bench_caps: the run failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    res = json.loads(lines[-1])
    table = report(res, caps)
    print(table)
    if a.out:
        a.out.write_text(table + "\n\n<details><summary>raw</summary>\n\n```\n" + json.dumps(res, indent=1) + "\n```\n</details>\n")


if __name__ == "__main__":
    main()
