"""What Ray costs and gives `streamer batch --ray`, on this machine (loopback clusters via ray.cluster_utils):

  tools/bench_ray.py MODEL [--scaling-model TINY] [--prompts 64] [--new-tokens 32] [--batch-size 16] [--rounds 2]

1. Overhead: the same job as a local `streamer batch` and through `--ray` on a one-node cluster holding all
   the cores, interleaved in rounds; the wall time of each command (process start to exit), median and ratio.
2. Scaling: a job on one node of 1 CPU against two nodes of 1 CPU each (both on this machine), on
   --scaling-model (default MODEL): wall times and the speed-up.
3. The driver's write rate: result records of --new-tokens tokens (with logprobs) appended and fsynced by
   batch.ResultLog, records per second and bytes per record (what the one results file grows by).
Needs `pip install 'streamer[ray]'`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only (read when ray is imported)


def prompts_file(folder: Path, n: int, new_tokens: int) -> Path:
    path = folder / "prompts.jsonl"
    words = ["a cat", "the sea", "a robot", "two friends", "the moon", "a small town"]
    path.write_text("".join(json.dumps({"id": i, "prompt": f"Write a story about {words[i % len(words)]}.",
                                        "max_new_tokens": new_tokens}) + "\n" for i in range(n)))
    return path


def batch(model: Path, prompts: Path, out: Path, batch_size: int, address: str | None = None) -> float:
    """Wall seconds of one `streamer batch` command, from a fresh results file."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "streamer", "batch", str(model), str(prompts), "--out", str(out), "--quiet",
           "--batch-size", str(batch_size), "--dtype", "float32"]
    if address:
        cmd += ["--ray", address, "--ray-chunk", str(batch_size)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return secs


def cluster(nodes: int, cpus: int):
    from ray.cluster_utils import Cluster
    args = dict(num_cpus=cpus, object_store_memory=100 << 20, node_ip_address="127.0.0.1")
    c = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    for _ in range(nodes - 1):
        c.add_node(**args)
    c.wait_for_nodes()
    return c


def write_rate(tmp: Path, new_tokens: int, n: int = 2000) -> tuple[float, float]:
    from streamer.batch import ResultLog
    record = {"id": 0, "text": "word " * new_tokens, "tokens": list(range(1000, 1000 + new_tokens)),
              "logprobs": [-1.234567] * new_tokens, "finish_reason": "length",
              "usage": {"prompt_tokens": 12, "completion_tokens": new_tokens}}
    log = ResultLog(tmp / "rate.jsonl")
    t0 = time.perf_counter()
    for i in range(n):
        log.write({**record, "id": i})
    secs = time.perf_counter() - t0
    log.close()
    return n / secs, (tmp / "rate.jsonl").stat().st_size / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a split model folder")
    p.add_argument("--scaling-model", type=Path, help="the model of the scaling runs (default: MODEL)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray-"))
    prompts = prompts_file(tmp, a.prompts, a.new_tokens)
    cores = os.cpu_count()
    print(f"{a.prompts} prompts x {a.new_tokens} new tokens, batch {a.batch_size}, {cores} cores, float32\n")

    c = cluster(1, cores)
    local, ray_run = [], []
    for _ in range(a.rounds):  # interleaved: the disk and the CPU drift
        local.append(batch(a.model, prompts, tmp / "local.jsonl", a.batch_size))
        ray_run.append(batch(a.model, prompts, tmp / "ray.jsonl", a.batch_size, c.address))
    c.shutdown()
    same = (tmp / "local.jsonl").read_text().splitlines(), (tmp / "ray.jsonl").read_text().splitlines()
    same = sorted(same[0]) == sorted(same[1])
    lm, rm = statistics.median(local), statistics.median(ray_run)
    print(f"| {a.model.name}: overhead | local | --ray, 1 node of {cores} CPUs | ratio |\n|---|---|---|---|")
    print(f"| wall s (runs) | {lm:.1f} ({', '.join(f'{x:.1f}' for x in local)}) | {rm:.1f} "
          f"({', '.join(f'{x:.1f}' for x in ray_run)}) | {rm / lm:.3f} |")
    print(f"results identical: {same}\n")

    model = a.scaling_model or a.model

    def on(nodes: int) -> float:  # the job on a fresh cluster of `nodes` nodes of 1 CPU each
        c = cluster(nodes, 1)
        secs = batch(model, prompts, tmp / f"{nodes}.jsonl", a.batch_size, c.address)
        c.shutdown()
        return secs

    one, two = [on(1)], [on(2)]
    one.append(on(1))  # one node before and after two: the machine drifts
    m1, m2 = statistics.median(one), statistics.median(two)
    print(f"| {model.name}: scaling | 1 node x 1 CPU | 2 nodes x 1 CPU | speed-up |\n|---|---|---|---|")
    print(f"| wall s (runs) | {m1:.1f} ({', '.join(f'{x:.1f}' for x in one)}) | {m2:.1f} "
          f"({', '.join(f'{x:.1f}' for x in two)}) | {m1 / m2:.2f}x |\n")

    rate, size = write_rate(tmp, a.new_tokens)
    print(f"driver write rate: {rate:.0f} records/s appended and fsynced, {size:.0f} bytes per record of "
          f"{a.new_tokens} tokens with logprobs")


if __name__ == "__main__":
    main()
