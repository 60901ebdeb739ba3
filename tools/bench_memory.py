"""Memory against speed: split and generate under a series of memcaps, and the smallest cap each completes under.

    python tools/bench_memory.py META_CHECKPOINT SPLIT_MODEL [--caps 256M,384M,512M,1G,2G,4G,none]
        [--budgets 512M,4G,8G,20G] [--out bench_memory.md] [--plot bench_memory.png]

Every run is a real `streamer` command inside `streamer memcap` (page cache counted), with the page
cache dropped first. Generate uses a 64-token prompt and --max-new-tokens (default 4), bf16.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import MEMCAP, drop_caches, random_prompt  # tools/ is on sys.path when this script runs
from streamer.budget import parse_size


def mib(size: str) -> int:
    return 0 if size == "none" else parse_size(size) >> 20


WARM = False  # --warm: keep the page cache between runs (smoke tests)


def run(cmd: list[str], cap: str) -> dict:
    if not WARM:
        drop_caches()
    full = cmd if cap == "none" else MEMCAP + [cap, "--"] + cmd
    t0 = time.perf_counter()
    r = subprocess.run(full, capture_output=True, text=True)
    out = {"ok": r.returncode == 0, "wall_s": time.perf_counter() - t0}
    for line in r.stderr.splitlines():
        if line.startswith("memcap:"):
            out["cgroup_peak"] = int(line.split("peak_bytes=")[1].split()[0])
            out["oom_kills"] = line.split("oom_kills=")[1].split()[0]
    if not out["ok"]:
        said = [l for l in r.stderr.strip().splitlines() if not l.startswith("memcap:")]
        out["error"] = ("OOM-killed" if out.get("oom_kills", "0") not in ("0", "") else
                        (said or ["?"])[-1][:200])
    try:
        out["json"] = json.loads(r.stdout)
    except json.JSONDecodeError:
        pass
    return out


def split_cmd(src: Path, dst: Path) -> list[str]:
    return [sys.executable, "-m", "streamer", "split", str(src), str(dst), "--quiet"]


def gen_cmd(model: Path, new: int, budget: str | None = None) -> list[str]:
    ids = ",".join(map(str, random_prompt(random.Random(64), 64)))
    cmd = [sys.executable, "-m", "streamer", "generate", str(model), "--prompt-ids", ids, "--max-new-tokens", str(new),
           "--dtype", "bfloat16", "--json"]
    return cmd + (["--memory-budget", budget] if budget else [])


def do_split(src: Path, work: Path, cap: str) -> dict:
    dst = work / "split"
    shutil.rmtree(dst, ignore_errors=True)
    r = run(split_cmd(src, dst), cap)
    shutil.rmtree(dst, ignore_errors=True)
    return r


def bisect(probe, fail_mib: int, ok_mib: int, step: int = 32) -> int:
    """Smallest cap (MiB) in (fail, ok] that succeeds, to `step` MiB."""
    while ok_mib - fail_mib > step:
        mid = (fail_mib + ok_mib) // 2 // 16 * 16
        if probe(f"{mid}M")["ok"]:
            ok_mib = mid
        else:
            fail_mib = mid
        print(f"  bisect: fails at {fail_mib}M, completes at {ok_mib}M", file=sys.stderr)
    return ok_mib


def row(cap: str, r: dict) -> dict:
    s = r.get("json", {}).get("stats", {})
    m = s.get("memory", {})
    return {"cap": cap, "ok": r["ok"], "wall_s": r["wall_s"], "cgroup_peak": r.get("cgroup_peak"),
            "decode_s": s.get("decode_s_per_token"), "peak_rss": m.get("peak_rss"), "peak_private": m.get("peak_private"),
            "peak_file": m.get("peak_file"), "error": r.get("error")}


def _secs(s):
    return "" if s is None else f"{s:.2f}"


def fmt(b):
    return "" if b is None else f"{b / 2**20:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("meta", type=Path, help="a Meta checkpoint folder (for split)")
    p.add_argument("model", type=Path, help="its split folder (for generate)")
    p.add_argument("--caps", default="256M,384M,512M,1G,2G,4G,none")
    p.add_argument("--budgets", default="512M,4G,8G,20G", help="--memory-budget values, each under a memcap of the same size")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--skip-split", action="store_true")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache between runs (smoke runs)")
    p.add_argument("--out", type=Path, default=Path("bench_memory.md"))
    p.add_argument("--plot", type=Path, default=Path("bench_memory.png"))
    a = p.parse_args()
    global WARM
    WARM = a.warm
    work = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=a.model.parent))
    caps = a.caps.split(",")
    res = {"split": [], "generate": [], "budget": []}
    try:
        for cap in caps:
            if not a.skip_split:
                res["split"].append(row(cap, do_split(a.meta, work, cap)))
                print(f"split {cap}: {res['split'][-1]}", file=sys.stderr)
            res["generate"].append(row(cap, run(gen_cmd(a.model, a.new_tokens), cap)))
            print(f"generate {cap}: {res['generate'][-1]}", file=sys.stderr)
        smallest = {}
        for kind, probe in (("split", lambda c: do_split(a.meta, work, c)), ("generate", lambda c: run(gen_cmd(a.model, 2), c))):
            rows = [r for r in res[kind] if r["cap"] != "none"]
            ok = [mib(r["cap"]) for r in rows if r["ok"]]
            if not ok:
                continue
            fail = [mib(r["cap"]) for r in rows if not r["ok"] and mib(r["cap"]) < min(ok)]
            smallest[kind] = bisect(probe, max(fail) if fail else 64, min(ok))
        for b in filter(None, a.budgets.split(",")):
            res["budget"].append(row(b, run(gen_cmd(a.model, a.new_tokens, b), b)))
            print(f"budget {b}: {res['budget'][-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = report(res, smallest, a)
    a.out.write_text(table + "\n\n<details><summary>raw</summary>\n\n```\n" + json.dumps(res, indent=1) + "\n```\n</details>\n")
    print(table)
    plot(res, a.plot)


def report(res, smallest, a) -> str:
    lines = [f"8B-shaped model, bf16, 64-token prompt, {a.new_tokens} new tokens; sizes in MiB; cgroup peak counts page cache.", "",
             "| memcap | split | split wall s | split cgroup peak | generate | decode s/token | cgroup peak | peak RSS | peak private | peak file |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    splits = {r["cap"]: r for r in res["split"]}
    for g in res["generate"]:
        s = splits.get(g["cap"], {})
        lines.append(f"| {g['cap']} | {'ok' if s.get('ok') else ('OOM' if s else '-')} | {s.get('wall_s', 0):.0f} | {fmt(s.get('cgroup_peak'))} "
                     f"| {'ok' if g['ok'] else 'fails: ' + str(g['error'])} | {_secs(g['decode_s'])} | {fmt(g['cgroup_peak'])} | {fmt(g['peak_rss'])} "
                     f"| {fmt(g['peak_private'])} | {fmt(g['peak_file'])} |")
    lines += ["", "Smallest memcap (bisection, 32 MiB steps): " + ", ".join(f"{k} {v} MiB" for k, v in smallest.items()), "",
              "| --memory-budget = memcap | generate | decode s/token | peak RSS | peak private | peak file |", "|---|---|---|---|---|---|"]
    for g in res["budget"]:
        lines.append(f"| {g['cap']} | {'ok' if g['ok'] else 'fails: ' + str(g['error'])} | {_secs(g['decode_s'])} | {fmt(g['peak_rss'])} "
                     f"| {fmt(g['peak_private'])} | {fmt(g['peak_file'])} |")
    return "\n".join(lines)


def plot(res, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_memory: matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("generate", "default budget"), ("budget", "--memory-budget = memcap")):
        pts = [(mib(r["cap"]) or 24 * 1024, r["decode_s"]) for r in res[key] if r["ok"] and r["decode_s"]]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory cap (MiB; 'none' plotted at 24 GiB)")
    ax.set_ylabel("decode step (s)")
    ax.set_title("Llama-3-8B-shaped, bf16: decode step against the memory cap")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
