"""streamer against llama.cpp on the same weights, paired: tools/bench_llamacpp.py MODEL --gguf-dir DIR ...

Setup, once (outside the repository; minutes, not CI):
  tools/bench_llamacpp.py --build ~/peers            # llama.cpp from the llama-cpp-python sdist, CPU only
  tools/bench_llamacpp.py --make-gguf META_DIR --gguf-dir ~/gguf --llama-bin ~/peers/llama.cpp/build/bin
      # model-bf16.gguf (tools/make_gguf.py), then model-q8_0.gguf and model-q4_0.gguf (llama-quantize)

Run: for every cap (none = all in RAM) and format (bf16 / int8 / int4 against bf16 / Q8_0 / Q4_0), `--rounds`
rounds of A B, then B A: streamer (`Engine.stream`, planned for the cap as the CLI plans it) and llama.cpp
(`llama-completion`, mmap, `--no-warmup` so that its first reads are counted), each in a fresh process under
`streamer memcap`, the page cache dropped before each, the same prompt ids, `--tokens` greedy tokens.
Reported per run: time to first token (from the process's start to its first generated token on stdout:
imports, loading and the prompt), decode s/token (the mean over the tokens after the first, as llama.cpp
reports it), peak RSS (and the cgroup's peak under a cap). The floors: the memory read rate (bench.py's membw) and one
step's cold disk read (bench.py's floor_read: the fastest of its readers), measured in the same run, so that a decode step's floor is
streamed bytes ÷ disk rate + resident bytes ÷ memory rate.
"""
import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import MEMCAP, drop_caches, floor_read, memory_read_rate, step_files  # noqa: E402

SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp at commit 0c1e570 (2026-10-01)
TARGETS = ["llama-quantize", "llama-bench", "llama-completion", "llama-tokenize"]
CMAKE = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF"]
GGUF = {"bf16": "model-bf16.gguf", "int8": "model-q8_0.gguf", "int4": "model-q4_0.gguf"}
PEER = {"bf16": "bf16", "int8": "Q8_0", "int4": "Q4_0"}
FIRST = "first token"
ENGINES = ("streamer", "llama.cpp")  # a round's order, reversed every other round, so that what the order does falls
# on both: the first run of a bench fills fresh memory (0.25-1.3 s/GB on this VM), and a run right after one of
# its own engine loaded faster (all in RAM, llama.cpp's first token in 5.0-8.0 s then, against 6.9-14.3 otherwise)
PROMPT = "The history of the printing press begins in the fifteenth century, when"


def build(where: Path) -> Path:
    """llama.cpp from the source vendored in the llama-cpp-python sdist; returns the folder of its binaries."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", where], check=True)
    tarball = next(where.glob("llama_cpp_python-*.tar.gz"))
    subprocess.run(["tar", "xzf", tarball, "-C", where], check=True)
    src = next(where.glob("llama_cpp_python-*/vendor/llama.cpp"))
    subprocess.run(["cmake", "-B", "build", *CMAKE], cwd=src, check=True)
    subprocess.run(["cmake", "--build", "build", "-j2", "--target", *TARGETS], cwd=src, check=True)
    return src / "build" / "bin"


def make_ggufs(meta: Path, out: Path, bin_dir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bf16 = out / GGUF["bf16"]
    if not bf16.exists():
        subprocess.run([sys.executable, HERE / "make_gguf.py", meta, bf16], check=True)
    for fmt in ("int8", "int4"):
        if not (out / GGUF[fmt]).exists():
            tmp = out / (GGUF[fmt] + ".tmp")
            subprocess.run([bin_dir / "llama-quantize", bf16, tmp, PEER[fmt]], check=True)
            tmp.replace(out / GGUF[fmt])


# --- one run of each engine (in its own process, under the cap) -------------------------------------------

def streamer_worker(model: Path, ids: list[int], tokens: int) -> dict:
    import torch
    from streamer import Engine
    from streamer.generate import GenStats
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    engine = Engine(model, max_seq_len=len(ids) + tokens + 1)
    stats, first = GenStats(), None
    for _ in engine.stream(prompt_ids=ids, max_new_tokens=tokens, stats=stats):
        if first is None:
            first = time.perf_counter() - t0
            print(FIRST, flush=True)  # the parent times the first token by this line
    mem = engine.memory()
    step = sum((engine.files.folder / n).stat().st_size for n in engine.files.step_files())
    out = {"in_process_ttft_s": first, "prefill_s": stats.prefill_s, "decode_s": stats.decode_s_per_token,
           "decode_steps": stats.decode_s, "tokens": stats.completion_tokens,
           "resident_bytes": engine.plan.resident_bytes, "streamed_bytes": step - engine.plan.resident_bytes,
           "peak_private": mem.peak["private"]}
    engine.close()
    return out


def llamacpp_cmd(bin_dir: Path, gguf: Path, ids: list[int], tokens: int, repack: bool) -> list[str]:
    cmd = [str(bin_dir / "llama-completion"), "-m", str(gguf), "-p", PROMPT, "-n", str(tokens), "-t", "2",
           "--temp", "0", "--ignore-eos", "-no-cnv", "--no-warmup", "-c", str(len(ids) + tokens + 8)]
    return cmd if repack else cmd + ["--no-repack"]


def llamacpp_result(stderr: str) -> dict:
    """Its decode time from its own report (`eval time = X ms / N runs`: the tokens after the first)."""
    m = re.search(r":\s+eval time\s*=\s*([\d.]+) ms /\s*(\d+)", stderr)  # not "prompt eval time"
    if m is None:
        raise RuntimeError((stderr.strip().splitlines() or ["no output"])[-1])
    return {"decode_s": float(m.group(1)) / 1e3 / int(m.group(2)), "tokens": int(m.group(2)) + 1}


def run_capped(cmd: list[str], cap: str) -> tuple[subprocess.CompletedProcess, dict, list]:
    """The command under `memcap cap` (none: as it is), page cache dropped first: its result, its wall time,
    the cgroup's peak (page cache included), the process tree's peak RSS (sampled), and its stdout as
    (seconds since the start, bytes so far) at each read, to time its first token by."""
    drop_caches()
    if cap != "none":
        cmd = MEMCAP + [cap, "--"] + cmd
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    peak, arrivals, out, err = [0], [], bytearray(), []

    def sample():  # the process tree's RSS every 20 ms (what the kernel maps: mmap'd weights count)
        import psutil
        root = psutil.Process(p.pid)
        while p.poll() is None:
            try:
                peak[0] = max(peak[0], sum(q.memory_info().rss for q in [root, *root.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.02)

    def read_out():
        while chunk := p.stdout.read(4096):
            out.extend(chunk)
            arrivals.append((time.perf_counter() - t0, bytes(out)))
    threads = [threading.Thread(target=f) for f in (sample, read_out, lambda: err.append(p.stderr.read()))]
    for t in threads:
        t.start()
    p.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    out_s, err_s = out.decode(errors="replace"), err[0].decode(errors="replace")  # llama.cpp may print part of a character
    m = re.search(r"peak_bytes=(\d+)", err_s)
    return (subprocess.CompletedProcess(cmd, p.returncode, out_s, err_s),
            {"wall_s": wall, "peak_bytes": int(m.group(1)) if m else None, "max_rss": peak[0]}, arrivals)


def measure(engine: str, fmt: str, cap: str, a, ids: list[int]) -> dict:
    """One run. Time to first token is the process's, from its start to its first generated token on stdout
    (imports and loading included): the line the worker prints, or llama.cpp's first byte past the prompt
    it echoes."""
    tokens = a.tokens if cap == "none" else a.cap_tokens
    if engine == "streamer":
        model = {"bf16": a.model, "int8": a.int8, "int4": a.int4}[fmt]
        cmd = [sys.executable, __file__, "--worker", str(model), "--ids", ",".join(map(str, ids)), "--tokens", str(tokens)]
        r, extra, arrivals = run_capped(cmd, cap)
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        if r.returncode or not lines:
            return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1], **extra}
        first = next(t for t, seen in arrivals if FIRST.encode() in seen)
        return json.loads(lines[-1]) | extra | {"ttft_s": first}
    repack = cap == "none"  # repacked Q4_0 never finished loading under 512M or 2G (PEERS.md); bf16/Q8_0 unaffected
    r, extra, arrivals = run_capped(llamacpp_cmd(a.llama_bin, a.gguf_dir / GGUF[fmt], ids, tokens, repack), cap)
    try:
        res = llamacpp_result(r.stderr)
    except RuntimeError as e:
        return {"error": f"{e} (exit {r.returncode})", **extra}
    echo = len(PROMPT.encode())
    first = next((t for t, seen in arrivals if len(seen) > echo), None)
    return res | extra | {"repack": repack, "ttft_s": first}


def prompt_ids(model: Path) -> list[int]:
    from streamer import Engine
    return Engine(model).prompt_ids(PROMPT)


def report(runs: list[dict], floors: dict) -> str:
    rows = ["| cap | format | engine | time to first token (floor: one cold read) | decode s/token | decode floor | decode / floor | peak RSS |",
            "|---|---|---|---|---|---|---|---|"]
    bw, disk = floors["memory_bps"], floors["disk_bps"]
    for cap in dict.fromkeys(r["cap"] for r in runs):
        for fmt in dict.fromkeys(r["format"] for r in runs if r["cap"] == cap):
            for engine in ("streamer", "llama.cpp"):
                rs = [r for r in runs if (r["cap"], r["format"], r["engine"]) == (cap, fmt, engine)]
                ok = [r for r in rs if "error" not in r]
                name = f"{engine} {fmt if engine == 'streamer' else PEER[fmt]}"
                if not ok:
                    rows.append(f"| {cap} | {fmt} | {name} | failed: {rs[0]['error'] if rs else 'not run'} | | | | |")
                    continue
                span = lambda k, f="{:.2f}": "–".join(dict.fromkeys(f.format(v) for v in sorted(r[k] for r in ok)))
                floor, ratio, first = "", "", ""
                s = next((r for r in runs if (r["cap"], r["format"], r["engine"]) == (cap, fmt, "streamer") and "error" not in r), None)
                if s:  # the same bytes per token for both engines' floor: the weights of one step
                    f = s["streamed_bytes"] / disk + s["resident_bytes"] / bw
                    floor = f"{f:.2f} s ({s['resident_bytes'] / 1e9:.1f} GB in RAM, {s['streamed_bytes'] / 1e9:.1f} GB from disk)"
                    first = f" ({(s['streamed_bytes'] + s['resident_bytes']) / disk:.1f} s)"
                    ratio = "–".join(dict.fromkeys(f"{r['decode_s'] / f:.2f}" for r in sorted(ok, key=lambda r: r["decode_s"])))
                peak = "–".join(dict.fromkeys(f"{r['max_rss'] / 2**30:.1f}" for r in ok))
                if cap != "none":
                    peak += " (cgroup: " + "–".join(dict.fromkeys(f"{r['peak_bytes'] / 2**30:.1f}" for r in ok)) + ")"
                rows.append(f"| {cap} | {fmt} | {name} | {span('ttft_s', '{:.1f}')} s{first} | {span('decode_s')} | {floor} | "
                            f"{ratio} | {peak} GiB |")
    head = (f"memory read rate {bw / 1e9:.1f} GB/s, cold disk read {disk / 1e9:.2f} GB/s (one step's files, the "
            f"fastest of bench.floor_read's readers: {floors.get('disk_read', '4 readers')}); ranges over {max(len([r for r in runs if r['engine'] == 'streamer' and r['cap'] == runs[0]['cap'] and r['format'] == runs[0]['format']]), 1)} rounds")
    return head + "\n\n" + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, nargs="?", help="the bf16 split folder")
    p.add_argument("--int8", type=Path, help="the same model split with --quantize int8")
    p.add_argument("--int4", type=Path, help="the same model split with --quantize int4")
    p.add_argument("--gguf-dir", type=Path, help="model-bf16.gguf, model-q8_0.gguf, model-q4_0.gguf")
    p.add_argument("--llama-bin", type=Path, help="the folder of llama-completion and llama-quantize")
    p.add_argument("--caps", default="none,2G,512M")
    p.add_argument("--formats", default="bf16,int8,int4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8, help="tokens per run with no cap")
    p.add_argument("--cap-tokens", type=int, default=4, help="tokens per run under a cap")
    p.add_argument("--out", type=Path)
    p.add_argument("--build", type=Path, help="build llama.cpp under this folder and stop")
    p.add_argument("--make-gguf", type=Path, help="write the GGUF files of this Meta checkpoint folder and stop")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(streamer_worker(a.worker, [int(i) for i in a.ids.split(",")], a.tokens)))
        return
    if a.build:
        print(build(a.build))
        return
    if a.make_gguf:
        make_ggufs(a.make_gguf, a.gguf_dir, a.llama_bin)
        return
    ids = prompt_ids(a.model)
    floors = {"memory_bps": memory_read_rate(), "disk_bps": None}
    drop_caches()
    paths = step_files(a.model)
    read = floor_read(paths)
    floors |= {"disk_bps": sum(p.stat().st_size for p in paths) / read["seconds"], "disk_read": read["how"],
               "disk_reads_s": read["all"]}
    print(f"floors: {floors}", file=sys.stderr)
    runs = []
    for cap in a.caps.split(","):
        for fmt in a.formats.split(","):
            for rnd in range(a.rounds):
                for engine in ENGINES if rnd % 2 == 0 else ENGINES[::-1]:  # A B, then B A: neither always first
                    r = measure(engine, fmt, cap, a, ids) | {"cap": cap, "format": fmt, "engine": engine, "round": rnd}
                    runs.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
    table = report(runs, floors)
    print(table)
    if a.out:
        a.out.write_text(table + "\n\n<details><summary>raw</summary>\n\n```\n" + json.dumps(
            {"floors": floors, "runs": runs}, indent=1) + "\n```\n</details>\n")


if __name__ == "__main__":
    main()
