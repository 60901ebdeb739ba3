"""Speculative decoding against plain decoding, paired: tools/bench_spec.py TARGET --drafts D1,ngram,oracle ...

Each run is a fresh process under `streamer memcap --cap` (none: no cap), with the page cache dropped first:
plain greedy decoding first, then the target with each draft at each `--draft-tokens` T. `oracle` is the
perfect draft: it proposes the plain run's own continuation, so a pass yields T + 1 tokens and its cost at T
tokens shows. Reported: s/token over the generated tokens after the first (the verification passes and the
drafting), tokens per pass, the draft's proposals kept, its seconds per proposed token, and whether the
tokens equal the plain run's (they must, in float32). `--memory-budget` is the whole run's (default: the cap):
a model draft's share comes out of it first, and the target plans in the rest.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import MEMCAP, drop_caches  # noqa: E402


class Oracle:
    """Proposes the known continuation (the plain run's tokens) after the prompt."""

    def __init__(self, prompt: list[int], out: list[int]):
        self.seq = prompt + out

    def propose(self, tokens, k):
        n = len(tokens)
        return self.seq[n:n + k] if self.seq[:n] == list(tokens) else []


def worker(a) -> dict:
    import torch
    from streamer import Engine
    from streamer.generate import GenStats
    torch.set_num_threads(2)
    ids = [int(t) for t in a.ids.split(",")]
    draft = None if a.draft == "plain" else Oracle(ids, json.loads(a.oracle)) if a.draft == "oracle" else a.draft
    t0 = time.perf_counter()
    with Engine(a.target, a.memory_budget, a.dtype, max_seq_len=len(ids) + a.tokens + 1, draft=draft,
                draft_tokens=a.t) as engine:
        stats = GenStats()
        out = engine.generate(prompt_ids=ids, max_new_tokens=a.tokens, stats=stats)
        total = time.perf_counter() - t0
    decode = sum(stats.decode_s) + stats.draft_s
    return {"tokens": out.tokens, "prefill_s": stats.prefill_s, "s_per_token": decode / max(len(out.tokens) - 1, 1),
            "passes": stats.passes, "drafted": stats.drafted, "accepted": stats.accepted, "draft_s": stats.draft_s,
            "verify_s": sum(stats.decode_s), "total_s": total}


def run(a, draft: str, t: int, oracle: list[int] | None = None) -> dict:
    cmd = [sys.executable, __file__, str(a.target), "--worker", "--draft", draft, "--t", str(t), "--ids", a.ids,
           "--tokens", str(a.tokens), "--dtype", a.dtype] + (["--memory-budget", a.memory_budget] if a.memory_budget else [])
    if oracle is not None:
        cmd += ["--oracle", json.dumps(oracle)]
    if a.cap != "none":
        cmd = MEMCAP + [a.cap, "--"] + cmd
    drop_caches()
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode or not lines:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path)
    p.add_argument("--drafts", default="ngram,oracle", help="comma-separated: split folders, ngram, oracle")
    p.add_argument("--draft-tokens", default="4,8,16", help="T values")
    p.add_argument("--ids", default=None, help="prompt ids (default: a passage that repeats, for ngram)")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--cap", default="none")
    p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16 (in bfloat16, near-ties between the "
                   "one-row decode kernels and the verification GEMM may flip a token)")
    p.add_argument("--memory-budget", help="the run's memory budget, target and draft together (default: the cap)")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--draft", help=argparse.SUPPRESS)
    p.add_argument("--t", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--oracle", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.ids is None:
        passage = [128000] + list(range(1000, 1012))
        a.ids = ",".join(map(str, passage + passage[1:]))
    plain = run(a, "plain", 1)
    if "error" in plain:
        raise SystemExit(f"plain run failed: {plain['error']}")
    rows = ["| draft | T | s/token | vs plain | tokens per pass | kept / proposed | draft s per proposed token | same tokens |",
            "|---|---|---|---|---|---|---|---|",
            f"| none (plain) | | {plain['s_per_token']:.3f} | 1.00 | {len(plain['tokens']) / plain['passes']:.2f} | | | |"]
    runs = {"plain": plain}
    for draft in a.drafts.split(","):
        for t in map(int, a.draft_tokens.split(",")):
            r = run(a, draft, t, plain["tokens"] if draft == "oracle" else None)
            runs[f"{draft} T={t}"] = r
            name = Path(draft).name if draft not in ("ngram", "oracle") else draft
            if "error" in r:
                rows.append(f"| {name} | {t} | failed: {r['error']} | | | | | |")
                continue
            per = f"{r['draft_s'] / r['drafted'] * 1e3:.1f} ms" if r["drafted"] else ""
            rows.append(f"| {name} | {t} | {r['s_per_token']:.3f} | {plain['s_per_token'] / r['s_per_token']:.2f}x | "
                        f"{len(r['tokens']) / r['passes']:.2f} | {r['accepted']} / {r['drafted']} | {per} | "
                        f"{'yes' if r['tokens'] == plain['tokens'] else 'NO'} |")
            print(rows[-1], file=sys.stderr, flush=True)
    head = (f"target {a.target.name} ({a.dtype}), memcap {a.cap}" + (f", memory budget {a.memory_budget}" if a.memory_budget else "")
            + f", {a.tokens} tokens; tokens per pass counts the prefill's pass")
    table = head + "\n\n" + "\n".join(rows)
    print(table)
    if a.out:
        a.out.write_text(table + "\n\n```\n" + json.dumps(runs, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
