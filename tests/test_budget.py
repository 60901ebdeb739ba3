"""The memory budget: parsing, the planner's split of a budget, its refusals, and memory returning after a run."""
import gc
import subprocess
import sys

import pytest
import torch

from conftest import GQA, make_split, stream
from streamer import ModelFiles, StreamerError
from streamer.budget import BASELINE, parse_size, plan
from streamer.memory import rss_parts


def test_parse_size():
    assert parse_size("512M") == 512 << 20 and parse_size("4G") == 4 << 30 and parse_size("1.5GiB") == 3 << 29
    with pytest.raises(StreamerError, match="expected e.g. 512M"):
        parse_size("lots")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_split(tmp_path_factory.mktemp("b"), {**GQA, "n_layers": 6, "dim": 256, "n_heads": 4, "vocab_size": 4096})


def test_plan_splits_the_budget(folder):
    files = ModelFiles(folder)
    total = sum(files.files[n]["bytes"] for n in files.step_files())
    everything = plan(files, 8 << 30)
    assert everything.resident == files.step_files() and everything.bytes_per_step == 0
    tight = plan(files, BASELINE + (64 << 20))
    assert tight.resident == [] and tight.bytes_per_step == total
    counts = [len(plan(files, tight.budget + k * (1 << 20)).resident) for k in range(0, 400, 4)]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == len(files.step_files())
    assert any(0 < c < len(files.step_files()) for c in counts)  # some blocks resident, the rest streamed
    with pytest.raises(StreamerError, match="cannot work: the runtime needs"):
        plan(files, 100 << 20)


def test_short_runs_give_the_ring_what_long_prompts_would_take(folder):
    files = ModelFiles(folder)
    budget = BASELINE + (200 << 20)
    short, long = plan(files, budget, batch=1, context=80), plan(files, budget, batch=1, context=8192)
    assert short.max_pass_tokens == 80  # a pass never needs more rows than the whole context
    assert short.activations < long.activations
    # what activations no longer take goes to the weights: more resident, or a larger ring
    assert short.bytes_per_step < long.bytes_per_step or short.ring_bytes > long.ring_bytes
    assert plan(files, budget, batch=4, context=80).max_pass_tokens == 320


def test_plan_command(folder):
    r = subprocess.run([sys.executable, "-m", "streamer", "plan", folder, "--memory", "8G", "--disk-gbps", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "predicted peak" in r.stdout and "6 of 6 blocks, and the head" in r.stdout
    r = subprocess.run([sys.executable, "-m", "streamer", "plan", folder, "--memory", "64M"], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot work" in r.stderr and "Traceback" not in r.stderr


def test_memory_returns_after_a_run(folder):
    stream(folder, [1, 2, 3], 4, runner_kw={"ring_bytes": 64 << 20})  # warm up torch's allocator and kernels
    gc.collect()
    before = rss_parts()["private"]
    stream(folder, [1, 2, 3], 4, runner_kw={"ring_bytes": 64 << 20})
    gc.collect()
    assert rss_parts()["private"] - before < 16 << 20  # the ring and the KV cache are gone
