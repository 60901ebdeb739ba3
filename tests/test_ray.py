"""`streamer batch --ray` and streamer.ray.Generate on a real two-node Ray cluster on this machine (loopback
only), running the trained stories260K model: equal to a local run, a worker SIGKILLed mid-run, a driver
SIGKILLed and rerun, a node without the model, and the Ray Data path."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import STORIES
from streamer.split import split
from test_errors import in_process

# Loopback only: Ray otherwise swaps 127.0.0.1 for the machine's address (its setting for laptops, read at import)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
N_PROMPTS = 12


def node_args(home) -> dict:
    return dict(num_cpus=1, object_store_memory=80 << 20, node_ip_address="127.0.0.1", env_vars={"HOME": str(home)})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes, each its own HOME holding ~/stories (the same split), so `~/stories` is each machine's copy."""
    from ray.cluster_utils import Cluster
    root = tmp_path_factory.mktemp("ray")
    split(STORIES, root / "a" / "stories")
    shutil.copytree(root / "a" / "stories", root / "b" / "stories")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Once upon a time, {w}",
                                           "max_new_tokens": 24 + i % 5}) + "\n"
                               for i, w in enumerate(["Lily", "a cat", "Tom", "the sun", "Ben", "a dog"] * (N_PROMPTS // 6))))
    c = Cluster(initialize_head=True, head_node_args={**node_args(root / "a"), "include_dashboard": False})
    c.add_node(**node_args(root / "b"))
    c.wait_for_nodes()
    yield c, root
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def home(cluster, monkeypatch):
    c, root = cluster
    monkeypatch.setenv("HOME", str(root / "a"))  # the driver's ~ is the head node's
    return root


def results(path) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    got = {r["id"]: r for r in lines}
    assert len(got) == len(lines), "an id came out twice"
    return {k: (r.get("tokens"), r.get("text"), r.get("error")) for k, r in got.items()}


@pytest.fixture(scope="module")
def local(cluster):
    c, root = cluster
    out = root / "local.jsonl"
    r = in_process("batch", root / "a" / "stories", root / "prompts.jsonl", "--out", out, "--batch-size", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    got = results(out)
    assert len(got) == N_PROMPTS and not any(e for _, _, e in got.values())
    return got


def test_cluster_run_equals_a_local_run(cluster, home, local, tmp_path):
    c, root = cluster
    out = tmp_path / "ray.jsonl"
    r = in_process("batch", "~/stories", root / "prompts.jsonl", "--out", out, "--batch-size", "4",
                   "--ray", c.address, "--ray-chunk", "5", "--quiet")
    assert r.returncode == 0, r.stderr
    assert results(out) == local
    assert f"batch: {N_PROMPTS} done" in r.stderr


def worker_pids() -> list[int]:
    import psutil
    return [p.pid for p in psutil.process_iter(["cmdline"]) if any("ray::Worker" in a for a in p.info["cmdline"] or [])]


def run_driver(root, address, out):
    return subprocess.Popen([sys.executable, "-m", "streamer", "batch", "~/stories", root / "prompts.jsonl", "--out", out,
                             "--batch-size", "2", "--ray", address, "--ray-chunk", "2", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(out, n, proc, timeout=120):
    t0 = time.time()
    while not (out.exists() and len(out.read_text().splitlines()) >= n):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def test_a_worker_killed_mid_run_loses_nothing(cluster, home, local, tmp_path):
    """SIGKILL one worker process after results started coming: Ray restarts it, its chunk runs again, and
    the output holds each id exactly once, equal to the local run."""
    c, root = cluster
    out = tmp_path / "ray.jsonl"
    proc = run_driver(root, c.address, out)
    wait_for_lines(out, 4, proc)
    pids = worker_pids()
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "died with 2 requests" in err and "they run again" in err  # it was running a chunk: killed mid-run
    assert results(out) == local


def test_a_killed_driver_resumes_on_rerun(cluster, home, local, tmp_path):
    c, root = cluster
    out = tmp_path / "ray.jsonl"
    proc = run_driver(root, c.address, out)
    wait_for_lines(out, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(results(out)) < N_PROMPTS
    again = run_driver(root, c.address, out)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"already in {out}" in err
    assert results(out) == local


def test_a_node_without_the_model_fails_the_job_by_name(cluster, home, tmp_path):
    c, root = cluster
    node = c.add_node(**node_args(tmp_path))  # a HOME with no ~/stories
    c.wait_for_nodes()
    try:
        out = tmp_path / "ray.jsonl"
        r = in_process("batch", "~/stories", root / "prompts.jsonl", "--out", out, "--ray", c.address, "--quiet")
        assert r.returncode != 0
        assert "node 127.0.0.1" in r.stderr and str(tmp_path / "stories") in r.stderr, r.stderr
        assert not out.exists() or not out.read_text()
    finally:
        c.remove_node(node)


def test_ray_data_generate(cluster, home, local):
    """streamer.ray.Generate as a map_batches callable class: its columns, and the local run's results."""
    import streamer.ray
    c, root = cluster
    rows = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    ds = ray.data.from_items(rows).map_batches(
        streamer.ray.Generate, fn_constructor_kwargs={"model": "~/stories", "batch_size": 4},
        concurrency=2, batch_size=6, num_cpus=1)
    got = ds.take_all()
    assert {tuple(sorted(r)) for r in got} == {("error", "finish_reason", "id", "text", "tokens", "usage")}
    assert {r["id"]: (list(r["tokens"]), r["text"], r["error"]) for r in got} == local


def test_a_job_error_on_a_worker_is_one_line(cluster, home, tmp_path):
    """A worker's own StreamerError (here a memory budget too small to plan) stops the job with its message,
    not a Ray traceback."""
    c, root = cluster
    r = in_process("batch", "~/stories", root / "prompts.jsonl", "--out", tmp_path / "o.jsonl", "--ray", c.address,
                   "--memory-budget", "1M", "--quiet")
    assert r.returncode != 0
    assert "a memory budget of 1 MiB cannot work" in r.stderr and "Traceback" not in r.stderr, r.stderr
