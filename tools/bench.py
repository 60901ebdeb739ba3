"""Speed against the physical floor, every case under memcap with the page cache dropped first.

    python tools/bench.py MODEL [--cap 2G] [--cases floor,matmul,qmatmul,attention,decode,prefill,batch,longctx] [--out bench.md]

Each case runs in its own process inside `streamer memcap` and prints one JSON line; this script
gathers them into one table: case, measured time, floor, time / floor. Floors are measured in the same
run: the cold read of the same bytes and the bf16 matmul rate. Decode steps are paired by default: before
each step the same bytes are read cold four ways (1 reader, 4 readers, 4 with O_DIRECT, the runner's own reader
with no compute) and the step is compared with the fastest, because this disk's speed drifts by 20% within minutes.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

MEMCAP = [sys.executable, "-m", "streamer", "memcap"]  # + [SIZE, "--", command...]


# --- workers: run inside memcap, print one JSON line --------------------------------------------------

def step_files(model: Path) -> list[Path]:
    from streamer import ModelFiles
    return [model / n for n in ModelFiles(model).step_files()]


def random_prompt(r, n: int) -> list[int]:
    """BOS and n - 1 random ids from `r` (a random.Random): the prompts every benchmark here uses."""
    return [128000] + [r.randrange(1000, 100000) for _ in range(n - 1)]


def cold_read(paths: list[Path], readers: int, chunk: int = 16 << 20, direct: bool = False) -> dict:
    """Read every byte of `paths` with `readers` threads into private buffers: buffered preads whose pages are
    dropped after, or O_DIRECT preads (no page cache at all)."""
    jobs = [(p, off) for p in paths for off in range(0, p.stat().st_size, chunk)]
    lock, total = threading.Lock(), sum(p.stat().st_size for p in paths)
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)

    def work():
        buf = mmap.mmap(-1, chunk)  # page aligned, as O_DIRECT needs
        fds = {}
        while True:
            with lock:
                if not jobs:
                    break
                path, off = jobs.pop(0)
            fd = fds.get(path) or fds.setdefault(path, os.open(path, flags))
            n = os.preadv(fd, [buf], off)
            if not direct:
                os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
        for fd in fds.values():
            os.close(fd)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    return {"bytes": total, "seconds": secs, "gbps": total / secs / 1e9}


def stream_read(paths: list[Path], readers: int = 4, ring: int = 256 << 20) -> dict:
    """Read every byte of `paths` as the runner does: its WeightStream (O_DIRECT preads over `readers` threads into
    its ring), each 16 MiB taken and given back in turn, no compute. Here it read 3.1-3.3 GB/s where cold_read's 4
    O_DIRECT readers read 1.6-2.6 GB/s, alternating in one process (d5_ab.py)."""
    from streamer.stream import READ_CHUNK, Piece, WeightStream
    files = [(p, [Piece(-1, f"{p.name}@{off}", torch.uint8, (n,), off, n)
                  for off in range(0, size, READ_CHUNK) for n in [min(READ_CHUNK, size - off)]])
             for p in paths for size in [p.stat().st_size]]
    stream = WeightStream(files, ring, readers)  # its ring touched first, as the runner's is at load
    t0 = time.perf_counter()
    for _, pieces in files:
        for q in pieces:
            stream.take(q.name)
            stream.release()
    stream.close()
    secs = time.perf_counter() - t0
    total = sum(p.stat().st_size for p in paths)
    return {"bytes": total, "seconds": secs, "gbps": total / secs / 1e9}


FLOOR_READS = {"1 reader": (1, False), "4 readers": (4, False), "4 readers, O_DIRECT": (4, True),
               "the runner's reader": (4, None)}


def floor_read(paths: list[Path]) -> dict:
    """The fastest of the cold-read strategies over `paths`, each measured now."""
    runs = {k: (stream_read(paths, n) if d is None else cold_read(paths, n, direct=d))["seconds"]
            for k, (n, d) in FLOOR_READS.items()}
    best = min(runs, key=runs.get)
    return {"seconds": runs[best], "how": best, "all": runs}


def matmul_rate(dim: int, ffn: int, rows: int, reps: int = 5) -> float:
    """bf16 FLOP/s of x[rows, dim] @ W[ffn, dim].T, the shape of a decode or prefill matmul."""
    w = torch.randn(ffn, dim).to(torch.bfloat16)
    x = torch.randn(rows, dim).to(torch.bfloat16)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * dim * ffn / best


def block_flops(args, tokens: int) -> float:
    """Matmul FLOPs of all blocks for `tokens` new tokens (weights only; attention scores are extra)."""
    per_token = args.n_layers * 2 * args.dim * (args.head_dim * (args.n_heads * 2 + args.n_kv_heads * 2) + 3 * args.ffn_dim)
    return per_token * tokens


def memory_read_rate(nbytes: int = 4 << 30, reps: int = 3) -> float:
    """Bytes/s of a plain large read from RAM, like STREAM: the floor of a decode step whose weights are resident."""
    buf = torch.ones(nbytes // 8, dtype=torch.int64)
    buf.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def gemv_rates(shapes: list[tuple[int, int]], total: int = 1 << 30) -> dict:
    """GB/s of each one-row matmul kernel on bf16 weights of these shapes, `total` bytes of them (so not cached)."""
    import torch.nn.functional as F
    from streamer import native
    from streamer.kernels import compiled_gemv
    kernels = {"torch.mv": lambda w, x: torch.mv(w, x[0]), "F.linear": F.linear,
               "compiled": lambda w, x: compiled_gemv(w, x[0])}
    if native.available():
        kernels["native"] = lambda w, x: native.gemv_bf16(w, x[0])
    out = {}
    for o, i in shapes:
        ws = [torch.randn(o, i).to(torch.bfloat16) for _ in range(max(1, total // (2 * o * i)))]
        x = torch.randn(1, i).to(torch.bfloat16)
        for name, k in kernels.items():
            out[f"{name} [{o}, {i}]"] = 2 * o * i / _per_matrix(lambda x, w: k(w, x), x, ws, reps=3) / 1e9
    return out


def quantized_matmuls(dim: int, rows: list[int], total: int = 1 << 30) -> dict:
    """ms per [dim, dim] matrix of x[rows] @ W.T for int8 and int4 codes: streamer's qlinear (torch's kernel at
    few rows, int8 x int8 at many, int4 codes requantized to int8 a tile at a time), for int4 also with the
    compiled tile kernel (`compiled`, as a compiled run takes it), torch's kernel alone, and bf16 F.linear on
    bf16 weights, which the quantized files must not be slower than. `total` bytes of bf16 weights (half that of
    int8 codes, a quarter of int4), so none stays in cache, in at most 64 matrices."""
    import torch.nn.functional as F
    from streamer import kernels, quant

    def compiled(x, w):
        with kernels.use_compiled(True):
            return quant.qlinear(x, w)
    n = max(2, min(64, total // (2 * dim * dim)))
    out = {"dim": dim}
    bf16 = [torch.randn(dim, dim).to(torch.bfloat16) for _ in range(n)]
    for scheme in quant.SCHEMES:
        ws = [quant.quantize(torch.randn(dim, dim) * 0.02, scheme) for _ in range(n)]
        kernel = ((lambda x, w: torch._weight_int8pack_mm(x, w.q, w.scale.to(x.dtype))) if scheme == "int8" else
                  (lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w.packed, w.group, w.sz.to(x.dtype))))
        for m in rows:
            x = torch.randn(m, dim).to(torch.bfloat16)
            ways = {"streamer": (quant.qlinear, ws), "kernel": (kernel, ws), "bf16": (F.linear, bf16)}
            if scheme == "int4" and kernels.can_compile():
                ways["compiled"] = (compiled, ws)
            out[f"{scheme} {m}"] = {k: _per_matrix(fn, x, mats) * 1e3 for k, (fn, mats) in ways.items()}
        del ws
    return out


def decode_attention_times(args, compiled: bool = True, batches=(1, 32, 256), positions=(8, 320)) -> dict:
    """ms per layer of decode attention (model.attend_decode: D sequences, one new token each, over S cached
    positions of the model's heads, bf16), eager and compiled (kernels.decode_attention), with the bytes of
    keys and values it reads."""
    from streamer import kernels
    from streamer.model import attend_decode
    out = {}
    for d in batches:
        for s in positions:
            kv = torch.randn(2, d, s, args.n_kv_heads, args.head_dim).to(torch.bfloat16)
            q = torch.randn(d, args.n_heads, args.head_dim).to(torch.bfloat16)
            ends, slots = torch.full((d,), s), list(range(d))
            row = {"kv_bytes": kv.numel() * kv.element_size()}
            for name, on in (("eager", False), ("compiled", True)):
                if not on or (compiled and kernels.can_compile()):
                    with kernels.use_compiled(on):
                        row[name] = _per_matrix(lambda q, kv: attend_decode(q, kv, slots, ends), q, [kv] * 5) * 1e3
            out[f"{d} {s}"] = row
    return out


def _per_matrix(fn, x, mats, reps: int = 2) -> float:
    fn(x, mats[0])
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in mats:
            fn(x, w)
        best = min(best, time.perf_counter() - t0)
    return best / len(mats)


def run_steps(model: Path, batch: int, prompt_len: int, steps: int, dtype=torch.bfloat16, paired: bool = False,
              compile="auto", **runner_kw) -> dict:
    """Prefill `batch` random prompts of `prompt_len` tokens together, then `steps` decode steps.

    paired: before each step, measure the disk floor (floor_read of the bytes a step reads), then time the step
    on a fresh runner, whose ring starts empty. The disk's speed drifts by 20% within minutes here, so a step
    is compared with the floor measured just before it; the fresh runner forgoes the read-ahead a step
    normally gets from the one before, so the ratio errs against us."""
    import random
    from streamer import Engine
    engine = Engine(model, dtype=dtype, max_seq_len=prompt_len + steps + 1, compile=compile, runner_options=runner_kw)
    context = prompt_len + steps + 1
    t0 = time.perf_counter()
    runner = engine.runner(batch, context, kv_first=batch > 1)  # planned as `generate` or `batch` plans it
    load = time.perf_counter() - t0
    files = engine.files
    streamed = [model / n for n in files.step_files() if n not in runner.resident]
    cache = engine.kv_cache(batch)
    r = random.Random(0)
    chunks = [(s, random_prompt(r, prompt_len)) for s in range(batch)]
    for s, ids in chunks:
        cache.reserve(s, prompt_len + steps + 1)
    t0 = time.perf_counter()
    logits = runner.forward(chunks, cache, phase="prefill")
    prefill = time.perf_counter() - t0
    times, floors, nbytes = [], [], 0
    for _ in range(steps):
        nxt = [(s, [int(logits[i].argmax())]) for i, (s, _) in enumerate(chunks)]
        if paired:
            engine.release()  # its resident blocks go before the next runner loads its own
            floors.append(floor_read(streamed))
            runner = engine.runner(batch, context, kv_first=batch > 1)
        read0 = runner.io.bytes_read
        t0 = time.perf_counter()
        logits = runner.forward(nxt, cache, phase="decode")
        times.append(time.perf_counter() - t0)
        nbytes = runner.io.bytes_read - read0
    kv_disk = sum(p.stat().st_blocks * 512 for p in cache.dir.glob("*.kv")) if hasattr(cache, "dir") else 0
    cache.close()
    mem = engine.memory()
    engine.close()  # before measuring the matmul rate, whose matrices would not fit beside the plan under a cap
    from streamer.costs import flops_per_token  # the step's compute floor: its rows at the matmul rate of that many rows
    compute_floor = batch * flops_per_token(files.args) / matmul_rate(files.args.dim, files.args.ffn_dim, batch)
    out = {"batch": batch, "prompt_len": prompt_len, "prefill_s": prefill, "step_s": sorted(times)[len(times) // 2],
           "steps": times, "bytes_per_step": nbytes, "kv_bytes_on_disk": kv_disk, "peak_private": mem.peak["private"],
           "peak_rss": mem.peak["rss"], "prefill_flops": block_flops(files.args, batch * prompt_len),
           "load_s": load, "resident_bytes": engine.plan.resident_bytes, "compiled": runner.compiled,
           "compute_floor_s": compute_floor, "kv_in_ram": engine.plan.kv_slots}
    if floors:
        ratios = sorted(t / f["seconds"] for t, f in zip(times, floors))
        out |= {"floors": floors, "paired_floor_s": sorted(f["seconds"] for f in floors)[len(floors) // 2],
                "paired_ratio": ratios[len(ratios) // 2], "paired_ratios": ratios}
    return out


def peer_steps(kind: str, hf: Path, batch: int, steps: int, cap_bytes: int, prompt_len: int = 16) -> dict:
    """A peer on the same weights in HF layout: transformers + accelerate disk offload, or AirLLM 4.0.
    Each generated token is timed through generate()'s streamer callback."""
    import random
    import tempfile
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    r = random.Random(0)
    ids = torch.tensor([random_prompt(r, prompt_len) for _ in range(batch)])
    t0 = time.perf_counter()
    if kind == "hfram":  # the all-in-RAM reference: plain transformers, no offload
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16)
    elif kind == "hf":
        from transformers import AutoModelForCausalLM
        offload = tempfile.mkdtemp(prefix="bench-offload-", dir=hf.parent)
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16, device_map="auto", offload_folder=offload,
                                                     max_memory={"cpu": int(cap_bytes * 0.6)})
    else:
        from airllm import AutoModel
        model = AutoModel.from_pretrained(str(hf), device="cpu", dtype=torch.bfloat16)
    load = time.perf_counter() - t0
    clock = Clock()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, use_cache=True,
                   streamer=clock, pad_token_id=0)
    ticks = clock.t[1:]  # the first put() is the prompt itself
    gaps = sorted(b - a for a, b in zip(ticks, ticks[1:]))
    return {"batch": batch, "load_s": load, "prefill_s": ticks[0] - t0 if ticks else None,
            "step_s": gaps[len(gaps) // 2] if gaps else None, "steps": gaps}


def worker(case: str, model: Path, a) -> dict:
    torch.set_num_threads(os.cpu_count())
    compile = {"on": True, "off": False}.get(a.compile, "auto")
    from streamer.layout import ModelFiles
    args = ModelFiles(model).args
    if case.startswith("floor"):
        return cold_read(step_files(model), int(case.removeprefix("floor")))
    if case == "membw":
        return {"read_bps": memory_read_rate(min(4 << 30, a.cap_bytes // 4))}  # a quarter of a cap, at most 4 GiB
    if case == "gemv":
        return gemv_rates([(1024, args.dim), (args.dim, 1024), (2048, args.dim)])
    if case == "attention":
        return decode_attention_times(args, compiled=a.compile != "off")
    if case == "qmatmul":
        return quantized_matmuls(args.dim, [1, 8, 12, 16, 32, 64, 128, 256, 512], min(1 << 30, a.cap_bytes // 8))
    if case == "resident":  # every block in RAM (run it with --cap none on a machine that holds the model)
        return run_steps(model, 1, 16, a.steps, compile=compile)
    if case == "matmul":
        return {"decode_flops": matmul_rate(args.dim, args.ffn_dim, 1), "prefill_flops": matmul_rate(args.dim, args.ffn_dim, 512)}
    if case.startswith("batch"):
        return run_steps(model, int(case.removeprefix("batch")), a.prompt_len, a.steps, paired=a.paired, compile=compile)
    if case == "prefill":
        return run_steps(model, 1, 512, 1, compile=compile)
    if case == "longctx":
        return run_steps(model, 8, 1536, 2, compile=compile)
    if case in ("int8", "int4"):
        return run_steps(getattr(a, case), 1, 16, a.steps, paired=a.paired, compile=compile)
    if case == "hflongctx":  # the long-context job (8 x 1536) through HF + accelerate offload
        return peer_steps("hf", a.hf, 8, 1, a.cap_bytes, prompt_len=1536)
    if case.startswith(("hf", "airllm")):
        kind = next(k for k in ("hfram", "hf", "airllm") if case.startswith(k))
        return peer_steps(kind, a.hf, int(case.removeprefix(kind)), a.steps, a.cap_bytes, prompt_len=a.prompt_len)
    raise SystemExit(f"unknown case {case}")


# --- the orchestrator ------------------------------------------------------------------------------------

def _bytes(cap: str) -> int:
    from streamer.budget import parse_size
    return int(__import__("psutil").virtual_memory().total) if cap == "none" else parse_size(cap)


def drop_caches() -> None:
    subprocess.run(["sync"])
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("bench: cannot drop the page cache (needs root): reads may be warm", file=sys.stderr)


def measure(case: str, model: Path, cap: str, a) -> dict:
    if not a.warm:
        drop_caches()
    cmd = [sys.executable, __file__, str(model), "--worker", case, "--steps", str(a.steps), "--compile", a.compile,
           "--prompt-len", str(a.prompt_len)]
    cmd += ["--paired" if a.paired else "--no-paired"]
    for opt in ("int8", "int4", "hf"):
        if getattr(a, opt):
            cmd += [f"--{opt}", str(getattr(a, opt))]
    cmd += ["--cap-bytes", str(_bytes(cap))]
    if cap != "none":
        cmd = MEMCAP + [cap, "--"] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    memcap = next((l for l in r.stderr.splitlines() if l.startswith("memcap:")), "")
    if r.returncode or not lines:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1], "memcap": memcap}
    out = json.loads(lines[-1])
    out["memcap"] = memcap
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--cap", default="2G", help="memcap for every case (none: no cap)")
    p.add_argument("--cases", default="floor,matmul,batch1,prefill")
    p.add_argument("--batches", default="1,8,32,64", help="batch sizes for the `batch` case")
    p.add_argument("--steps", type=int, default=3, help="decode steps per batch case (median reported)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence in the batch and peer cases")
    p.add_argument("--longctx-cap", default="1G")
    p.add_argument("--int8", type=Path, help="the same model split with --quantize int8 (case int8)")
    p.add_argument("--int4", type=Path, help="the same model split with --quantize int4 (case int4)")
    p.add_argument("--hf", type=Path, help="the same weights in HF layout (cases hf1, hf32, airllm1: the peers)")
    p.add_argument("--out", type=Path)
    p.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the disk floor before every decode step and compare each step with its own floor")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache between cases (smoke runs)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="the compiled one-row kernels of decode (kernels.py): Engine's auto, or forced on or off")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--cap-bytes", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a)))
        return
    cases = a.cases.split(",")
    if "batch" in cases:
        cases[cases.index("batch"):cases.index("batch") + 1] = [f"batch{b}" for b in a.batches.split(",")]
    res = {}
    if any(c in ("resident", "gemv", "attention") or c.startswith("batch") for c in cases) and "membw" not in cases:
        cases.insert(0, "membw")
    if any(c.startswith("batch") or c in ("prefill", "longctx", "resident") for c in cases):
        cases = ["floor1", "floor4"] + [c for c in cases if c not in ("floor", "floor1", "floor4")]
    else:
        cases = [x for c in cases for x in (["floor1", "floor4"] if c == "floor" else [c])]
    for c in cases:
        res[c] = measure(c, a.model, a.longctx_cap if c in ("longctx", "hflongctx") else a.cap, a)
        print(f"{c}: {json.dumps(res[c])}", file=sys.stderr)
    table = report(res, a)
    print(table)
    if a.out:
        a.out.write_text(table + "\n\n<details><summary>raw</summary>\n\n```\n" + json.dumps(res, indent=1) + "\n```\n</details>\n")


def _step_floor(r: dict, best_gbps: float | None, membw: float | None) -> tuple[str, str]:
    """The floor and ratio cells of a decode case: paired (each step against the floor read just before it,
    medians of both), else the step's bytes at the best rate of the floor cases. Blocks kept resident add
    their bytes at the memory read rate (when the run measured it, case membw). A batch case's floor is the
    larger of that read and its rows' compute (compute_floor_s), with the tokens/s it allows."""
    ram = r.get("resident_bytes", 0) / membw if membw else 0.0
    plus = f" + {ram:.2f} s (resident, memory)" if ram else ""
    if "paired_ratio" in r:
        hows = sorted({f["how"] for f in r["floors"]})
        ratios = sorted(t / (f["seconds"] + ram) for t, f in zip(r["steps"], r["floors"]))
        return (f"{r['paired_floor_s']:.2f} s (disk, read before each step: {', '.join(hows)}){plus}",
                f"{ratios[len(ratios) // 2]:.2f} (per step: {', '.join(f'{x:.2f}' for x in ratios)})")
    if not best_gbps:
        return "", ""
    floor = r["bytes_per_step"] / 1e9 / best_gbps
    if "compute_floor_s" not in r:
        return f"{floor:.2f} s (disk){plus}", f"{r['step_s'] / (floor + ram):.2f}"
    bound = max(floor + ram, r["compute_floor_s"])
    return (f"{bound:.2f} s = max({floor + ram:.2f} s read, {r['compute_floor_s']:.2f} s matmul of {r['batch']} rows); "
            f"{r['batch'] / bound:.2f} tokens/s", f"{r['step_s'] / bound:.2f} ({bound / r['step_s']:.2f}x the floor-bound tokens/s)")


def report(res: dict, a) -> str:
    rows = ["| case | measured | floor | measured / floor |", "|---|---|---|---|"]
    floors = [res[k] for k in ("floor1", "floor4") if k in res and "gbps" in res[k]]
    for k in ("floor1", "floor4"):
        if k in res and "gbps" in res[k]:
            r = res[k]
            rows.append(f"| cold read of one step's weights, {k[5:]} reader(s) | {r['seconds']:.2f} s ({r['gbps']:.2f} GB/s, "
                        f"{r['bytes'] / 1e9:.2f} GB) | | |")
    best_gbps = max((f["gbps"] for f in floors), default=None)
    membw = res.get("membw", {}).get("read_bps")
    if membw:
        rows.append(f"| memory read rate (sum over up to 4 GiB) | {membw / 1e9:.1f} GB/s | | |")
    for name, rate in res.get("gemv", {}).items():
        if isinstance(rate, float):
            rows.append(f"| one-row bf16 matmul, {name} | {rate:.1f} GB/s of weights | {membw / 1e9:.1f} GB/s (memory) | "
                        f"{membw / 1e9 / rate:.2f} |" if membw else f"| one-row bf16 matmul, {name} | {rate:.1f} GB/s | | |")
    for name, ms in res.get("qmatmul", {}).items():
        if isinstance(ms, dict):
            scheme, m = name.split()
            dim = res["qmatmul"]["dim"]
            best = min(ms["streamer"], ms.get("compiled", ms["streamer"]))
            compiled = f", compiled {ms['compiled']:.2f}" if "compiled" in ms else ""
            rows.append(f"| {scheme} matmul, {m} rows, [{dim}, {dim}] | {ms['streamer']:.2f} ms{compiled} "
                        f"(torch's {scheme} kernel {ms['kernel']:.2f}) | {ms['bf16']:.2f} ms (bf16 F.linear) | "
                        f"{best / ms['bf16']:.2f} |")
    for name, ms in res.get("attention", {}).items():
        if isinstance(ms, dict):
            d, s = name.split()
            floor = f"{ms['kv_bytes'] / membw * 1e3:.2f} ms (its keys and values at the memory rate)" if membw else ""
            best = ms.get("compiled", ms["eager"])
            rows.append(f"| decode attention, {d} sequences x {s} positions, a layer | "
                        + (f"compiled {ms['compiled']:.2f} ms, " if "compiled" in ms else "")
                        + f"eager {ms['eager']:.2f} ms | {floor} | "
                        + (f"{best / (ms['kv_bytes'] / membw * 1e3):.2f} |" if membw else " |"))
    r = res.get("resident", {})
    if "step_s" in r:
        floor = r["resident_bytes"] / membw if membw else None
        rows.append(f"| decode step, all resident ({r['resident_bytes'] / 1e9:.2f} GB in RAM, compiled kernel "
                    f"{'on' if r['compiled'] else 'off'}) | {r['step_s']:.3f} s, peak private {r['peak_private'] / 2**20:.0f} MiB | "
                    + (f"{floor:.3f} s (memory) | {r['step_s'] / floor:.2f} |" if floor else "| |"))
        if best_gbps:
            cold = r["resident_bytes"] / 1e9 / best_gbps
            rows.append(f"| loading them (reading {r['resident_bytes'] / 1e9:.2f} GB into RAM) | {r['load_s']:.1f} s, then "
                        f"prefill of 16 tokens {r['prefill_s']:.2f} s | {cold:.1f} s (cold read) | {r['load_s'] / cold:.2f} |")
    mm = res.get("matmul", {})
    if "decode_flops" in mm:
        rows.append(f"| bf16 matmul rate | {mm['decode_flops'] / 1e12:.2f} TFLOP/s at 1 row, "
                    f"{mm['prefill_flops'] / 1e12:.2f} at 512 rows | | |")
    base = res.get("batch1", {}).get("step_s")  # the bf16 batch-1 step, which the others are compared with
    for k, r in res.items():
        if (k.startswith("batch") or k in ("int8", "int4")) and "step_s" in r:
            floor, ratio = _step_floor(r, best_gbps, membw)
            what = f"batch {r['batch']}" if k.startswith("batch") else f"{k} files, batch 1"
            vs = f"{r['step_s'] / base:.2f}x the bf16 batch-1 step; " if base and k != "batch1" else ""
            rows.append(f"| decode step, {what} ({r['bytes_per_step'] / 1e9:.2f} GB/step) | {r['step_s']:.2f} s, "
                        f"{r['batch'] / r['step_s']:.2f} tokens/s, {vs}peak private {r['peak_private'] / 2**20:.0f} MiB | "
                        f"{floor} | {ratio} |")
        if k in ("prefill", "longctx") and "prefill_s" in r:
            rate = mm.get("prefill_flops")
            floor = r["prefill_flops"] / rate if rate else None
            label = f"prefill {r['batch']} x {r['prompt_len']} tokens ({r['prefill_flops'] / 1e12:.1f} TFLOP)"
            extra = (f"; decode step {r['step_s']:.2f} s, KV on disk {r['kv_bytes_on_disk'] / 1e9:.2f} GB, "
                     f"peak private {r['peak_private'] / 2**20:.0f} MiB") if k == "longctx" else ""
            rows.append(f"| {label} | {r['prefill_s']:.2f} s, {r['prefill_flops'] / r['prefill_s'] / 1e12:.2f} TFLOP/s{extra} | "
                        f"{floor:.2f} s (matmul) | {r['prefill_s'] / floor:.2f} |" if floor else f"| {label} | {r['prefill_s']:.2f} s | | |")
        if k.startswith(("hf", "airllm")) and r.get("step_s"):
            who = ("HF transformers, all in RAM (no cap)" if k.startswith("hfram") else
                   "HF transformers + accelerate disk offload" if k.startswith("hf") else "AirLLM 4.0 (device=cpu)")
            ours = res.get(f"batch{r['batch']}", {}).get("step_s")
            vs = f"; streamer bf16 is {r['step_s'] / ours:.2f}x faster" if ours else ""
            rows.append(f"| peer: {who}, batch {r['batch']} | {r['step_s']:.2f} s/step, {r['batch'] / r['step_s']:.2f} tokens/s "
                        f"(load {r['load_s']:.0f} s){vs} | | |")
        if "error" in r:
            rows.append(f"| {k} | failed: {r['error']} ({r['memcap']}) | | |")
    caps = f"memcap {a.cap}" + (f", longctx under memcap {a.longctx_cap}" if "longctx" in res else "")
    return f"{caps}; torch {torch.__version__}, {os.cpu_count()} cores\n\n" + "\n".join(rows)


if __name__ == "__main__":
    main()
