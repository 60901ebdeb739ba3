"""Speculative decoding against plain decoding, paired: tools/bench_spec.py TARGET --drafts D1,ngram,oracle ...

Each run is a fresh process under `streamer memcap --cap` (none: no cap), with the page cache dropped first:
plain greedy decoding first, then the target with each draft at each `--draft-tokens` T (a number, or auto:
picked from the measured passes) and each `--branches` B (1: a chain; more: a tree). `oracle` is the perfect
draft: it proposes the plain run's own continuation (with B > 1, each level also holds B - 1 wrong siblings,
so passes run the tree mask), so a pass yields all its levels plus one token and its cost at T tokens shows.
Reported: s/token over the generated tokens after the first (the verification passes and the drafting),
tokens per pass, a verification pass's seconds against a plain step's, the draft's proposals kept, and for
a model draft its seconds per pass against its memory floor (its bytes over a plain read from RAM, like
STREAM, measured here first); and whether the tokens equal the plain run's (they must, in float32).
`--memory-budget` is the whole run's (default: the cap): a model draft's share comes out of it first, and
the target plans in the rest.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import MEMCAP, drop_caches, floor_read  # noqa: E402


class Oracle:
    """Proposes the known continuation (the plain run's tokens) after the prompt: a chain, or with branches
    B > 1 a tree whose levels hold the right token and B - 1 wrong ones."""

    def __init__(self, prompt: list[int], out: list[int], branches: int, vocab: int):
        self.seq, self.branches, self.vocab = prompt + out, branches, vocab

    def propose(self, tokens, k, slot=0):
        from streamer.speculative import Tree
        n = len(tokens)
        if self.seq[:n] != list(tokens):
            return []
        tree, parent = Tree([], []), -1
        for t in self.seq[n:n + max(1, k // self.branches)]:
            for j in range(self.branches):
                if len(tree.tokens) < k:
                    tree.tokens.append((t + j) % self.vocab)
                    tree.parents.append(parent)
            parent = len(tree.tokens) - self.branches
        return tree


def worker(a) -> dict:
    import torch
    from streamer import Engine
    from streamer.generate import GenStats
    torch.set_num_threads(2)
    ids = [int(t) for t in a.ids.split(",")]
    from streamer.layout import ModelFiles
    vocab, branches = ModelFiles(a.target).args.vocab_size, int(a.branches)
    draft = (None if a.draft == "plain" else Oracle(ids, json.loads(a.oracle), branches, vocab)
             if a.draft == "oracle" else a.draft)
    t0 = time.perf_counter()
    with Engine(a.target, a.memory_budget, a.dtype, max_seq_len=len(ids) + a.tokens + 1, draft=draft,
                draft_tokens=None if a.t == "auto" else int(a.t), draft_branches=branches) as engine:
        stats = GenStats()
        out = engine.generate(prompt_ids=ids, max_new_tokens=a.tokens, stats=stats)
        total = time.perf_counter() - t0
        d = engine.draft._runner if engine.draft else None
        draft_passes, draft_bytes = (d.io.passes, d.io.resident_bytes) if d else (0, 0)
    decode = sum(stats.decode_s) + stats.draft_s
    return {"tokens": out.tokens, "prefill_s": stats.prefill_s, "s_per_token": decode / max(len(out.tokens) - 1, 1),
            "passes": stats.passes, "drafted": stats.drafted, "accepted": stats.accepted, "draft_s": stats.draft_s,
            "verify_s": sum(stats.decode_s), "s_per_pass": sum(stats.decode_s) / max(len(stats.decode_s), 1),
            "draft_passes": draft_passes, "draft_bytes": draft_bytes, "total_s": total}


def worker_passes(a) -> dict:
    """Seconds of a plain decode step and of verification passes of T tree tokens (a 4-ary tree, so the tree
    mask runs), in rounds that alternate them, in one process after one prefill."""
    import torch
    from streamer import Engine
    from streamer.generate import chunk
    from streamer.costs import flops_per_token, matmul_rate
    from streamer.speculative import NOTHING, Tree
    torch.set_num_threads(2)
    ids = [int(t) for t in a.ids.split(",")]
    sizes = [int(t) for t in a.pass_cost.split(",")]
    times = {t: [] for t in [0] + sizes}
    reads = []
    with Engine(a.target, a.memory_budget, a.dtype, max_seq_len=len(ids) + 4 * a.rounds * (len(sizes) + 1) + 200) as engine:
        runner = engine.runner(1, engine.max_seq_len)
        cache = engine.kv_cache(1)
        cache.reserve(0, engine.max_seq_len)
        if len(ids) > 1:
            runner.forward([(0, ids[:-1])], cache)  # the prefill; the last prompt token is the first pass's root
        last = ids[-1]
        gen = torch.Generator().manual_seed(0)
        streamed = [a.target / n for n in runner.names if n not in runner.resident]
        for _ in range(a.rounds):
            if streamed:  # the disk floor of this round: the same bytes, read cold, the fastest way here
                reads.append(floor_read(streamed)["seconds"])
            for t in [0] + sizes:
                tree = NOTHING if t == 0 else Tree(torch.randint(0, engine.args.vocab_size, (t,), generator=gen).tolist(),
                                                   [i // 4 - 1 for i in range(t)])
                start = len(cache.tokens[0])
                t0 = time.perf_counter()
                logits = runner.forward([chunk(0, last, tree, start)], cache, phase="decode", every=t > 0)
                times[t].append(time.perf_counter() - t0)
                last = int(logits[0].argmax())
                cache.keep_rows(0, start, [0])
        rate = {t: matmul_rate(engine.args.dim, engine.dtype, rows=t + 1) for t in sizes}
        flops = flops_per_token(engine.args)
    return {"times": {str(t): v for t, v in times.items()}, "compute_s": {str(t): (t + 1) * flops / rate[t] for t in sizes},
            "streamed_bytes": sum(p.stat().st_size for p in streamed), "reads": reads}


def worker_run(a, extra: list[str]) -> dict:
    """One worker process (this script with --worker and `extra`) under the cap, the page cache dropped first:
    its JSON line, or {"error"} with its last line of stderr."""
    cmd = [sys.executable, __file__, str(a.target), "--worker", *extra, "--ids", a.ids, "--dtype", a.dtype]
    cmd += ["--memory-budget", a.memory_budget] if a.memory_budget else []
    if a.cap != "none":
        cmd = MEMCAP + [a.cap, "--"] + cmd
    drop_caches()
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode or not lines:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def run(a, draft: str, t: str, branches: int = 1, oracle: list[int] | None = None) -> dict:
    return worker_run(a, ["--draft", draft, "--t", t, "--branches", str(branches), "--tokens", str(a.tokens)]
                      + (["--oracle", json.dumps(oracle)] if oracle is not None else []))


def pass_cost(a) -> None:
    """The --pass-cost table: each size's median pass against the plain step's, and its compute floor."""
    import statistics
    res = worker_run(a, ["--pass-cost", a.pass_cost, "--rounds", str(a.rounds)])
    if "error" in res:
        raise SystemExit(f"failed: {res['error']}")
    med = {t: statistics.median(v) for t, v in res["times"].items()}
    reads = ", ".join(f"{x:.2f}" for x in res["reads"])
    rows = [f"target {a.target.name} ({a.dtype}), memcap {a.cap}, {a.rounds} rounds alternating sizes, "
            f"{res['streamed_bytes'] / 1e9:.2f} GB streamed per pass" + (f"; disk floor (the same bytes read cold, 4 "
            f"O_DIRECT readers, each round): {reads} s" if reads else ""),
            "", "| tree tokens T | median s per pass | all passes | vs plain step | compute floor (T+1 tokens at the measured matmul rate) |",
            "|---|---|---|---|---|"]
    for t, m in med.items():
        floor = f"{res['compute_s'][t]:.2f} s" if t != "0" else ""
        rows.append(f"| {t if t != '0' else 'plain step'} | {m:.2f} | {', '.join(f'{x:.2f}' for x in res['times'][t])} | "
                    f"{m / med['0']:.2f} | {floor} |")
    table = "\n".join(rows)
    print(table)
    if a.out:
        a.out.write_text(table + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path)
    p.add_argument("--drafts", default="ngram,oracle", help="comma-separated: split folders, ngram, oracle")
    p.add_argument("--draft-tokens", default="4,8,16", help="T values (auto: picked from the measured passes)")
    p.add_argument("--branches", default="1", help="B values: 1 for a chain, more for a tree")
    p.add_argument("--ids", default=None, help="prompt ids (default: a passage that repeats, for ngram)")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--cap", default="none")
    p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16 (in bfloat16, near-ties between the "
                   "one-row decode kernels and the verification GEMM may flip a token)")
    p.add_argument("--memory-budget", help="the run's memory budget, target and draft together (default: the cap)")
    p.add_argument("--pass-cost", metavar="T,T,...", help="instead: time verification passes of these tree sizes "
                   "against plain decode steps, alternating, in one process")
    p.add_argument("--rounds", type=int, default=3, help="with --pass-cost: passes of each size")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--draft", help=argparse.SUPPRESS)
    p.add_argument("--t", default="8", help=argparse.SUPPRESS)
    p.add_argument("--oracle", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker_passes(a) if a.pass_cost else worker(a)))
        return
    if a.ids is None:
        passage = [128000] + list(range(1000, 1012))
        a.ids = ",".join(map(str, passage + passage[1:]))
    if a.pass_cost:
        return pass_cost(a)
    plain = run(a, "plain", "1")
    if "error" in plain:
        raise SystemExit(f"plain run failed: {plain['error']}")
    membw = None
    if any(d not in ("ngram", "oracle") for d in a.drafts.split(",")):
        from bench import memory_read_rate
        membw = memory_read_rate(1 << 30)
    rows = ["| draft | shape | T | s/token | vs plain | tokens per pass | s per pass | vs plain step | kept / proposed "
            "| draft s per pass (floor) | same tokens |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| none (plain) | | | {plain['s_per_token']:.3f} | 1.00 | {len(plain['tokens']) / plain['passes']:.2f} | "
            f"{plain['s_per_pass']:.3f} | 1.00 | | | |"]
    runs = {"plain": plain}
    for draft in a.drafts.split(","):
        for b in map(int, a.branches.split(",")):
            if draft == "ngram" and b > 1:
                continue  # prompt lookup proposes chains
            for t in a.draft_tokens.split(","):
                r = run(a, draft, t, b, plain["tokens"] if draft == "oracle" else None)
                runs[f"{draft} B={b} T={t}"] = r
                name = Path(draft).name if draft not in ("ngram", "oracle") else draft
                shape = "chain" if b == 1 else f"tree, B={b}"
                if "error" in r:
                    rows.append(f"| {name} | {shape} | {t} | failed: {r['error']} | | | | | | | |")
                    continue
                own = ""
                if r["draft_passes"]:
                    per = r["draft_s"] / r["draft_passes"]
                    own = f"{per * 1e3:.1f} ms ({r['draft_bytes'] / membw * 1e3:.1f} ms), {r['draft_passes']} passes"
                rows.append(f"| {name} | {shape} | {t} | {r['s_per_token']:.3f} | {plain['s_per_token'] / r['s_per_token']:.2f}x | "
                            f"{len(r['tokens']) / r['passes']:.2f} | {r['s_per_pass']:.3f} | "
                            f"{r['s_per_pass'] / plain['s_per_pass']:.2f} | {r['accepted']} / {r['drafted']} | {own} | "
                            f"{'yes' if r['tokens'] == plain['tokens'] else 'NO'} |")
                print(rows[-1], file=sys.stderr, flush=True)
    head = (f"target {a.target.name} ({a.dtype}), memcap {a.cap}" + (f", memory budget {a.memory_budget}" if a.memory_budget else "")
            + f", {a.tokens} tokens; tokens per pass counts the prefill's pass"
            + (f"; memory read rate {membw / 1e9:.1f} GB/s" if membw else ""))
    table = head + "\n\n" + "\n".join(rows)
    print(table)
    if a.out:
        a.out.write_text(table + "\n\n```\n" + json.dumps(runs, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
