"""The memory budget: parsing, the planner's split of a budget, its refusals, cgroup limits, and memory
returning after a run."""
import subprocess
import sys

import pytest

from conftest import GQA, make_split
from streamer import ModelFiles, StreamerError
from streamer.budget import BASELINE, cgroup_limit, draft_bytes, parse_size, plan


def test_parse_size():
    assert parse_size("512M") == 512 << 20 and parse_size("4G") == 4 << 30 and parse_size("1.5GiB") == 3 << 29
    with pytest.raises(StreamerError, match="must be a memory size such as 512M, 4G or 1.5G, got 'lots'"):
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
    with pytest.raises(StreamerError, match="cannot work for batch 1, context 2048: it needs at least .* = runtime"):
        plan(files, 100 << 20)
    assert plan(files, 8 << 30, keep_resident=False).resident == []  # everything streams when asked to


def test_resident_files_are_private_only_under_a_memory_cgroup(folder, monkeypatch):
    """A cgroup counts page cache against its limit and reclaims it under pressure, so there resident files
    are private copies the kernel cannot drop; without one they stay the files' own mapped pages."""
    from streamer import budget
    monkeypatch.setattr(budget, "cgroup_limit", lambda: None)
    assert plan(ModelFiles(folder), 8 << 30).runner_kwargs()["mapped"] is True
    monkeypatch.setattr(budget, "cgroup_limit", lambda: 8 << 30)
    assert plan(ModelFiles(folder), 8 << 30).runner_kwargs()["mapped"] is False


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("with_library", [True, False])
def test_quantized_files_stay_private_where_the_native_kernels_read_them(folder, monkeypatch, quantize, with_library):
    """With no cgroup, a quantized split's resident files are private copies where the native kernels read them
    (faster than from mapped pages), else the files' mapped pages as bf16's are."""
    from streamer import budget, native, quant
    from streamer.split import split
    monkeypatch.setattr(budget, "cgroup_limit", lambda: None)
    monkeypatch.setattr(native, "available", lambda: with_library)
    out = folder.parent / quantize
    if not out.exists():
        split(folder.parent / "meta", out, quantize=quantize)
    native_reads = with_library and (quantize == "int8" or quant.int4_layout_known())
    assert plan(ModelFiles(out), 8 << 30).runner_kwargs()["mapped"] is not native_reads
    assert plan(ModelFiles(folder), 8 << 30).runner_kwargs()["mapped"] is True


def test_a_draft_model_takes_its_share_first(folder, tmp_path):
    """A speculative draft is kept whole in RAM: the plan sets its weights, activations and KV aside, shows
    them, and refuses, naming it, a budget that cannot hold it beside the smallest run of the target."""
    files, draft = ModelFiles(folder), ModelFiles(make_split(tmp_path / "d", {**GQA, "vocab_size": 4096}))
    share = draft_bytes(draft, 2048)
    assert share >= sum(draft.files[n]["bytes"] for n in draft.step_files())
    budget = BASELINE + share + (80 << 20)
    alone, beside = plan(files, budget), plan(files, budget, draft=draft)
    assert beside.draft == share and beside.breakdown()["draft model"] == share
    assert sum(beside.breakdown().values()) == beside.predicted_peak <= budget
    assert (beside.bytes_per_step > alone.bytes_per_step or beside.ring_bytes < alone.ring_bytes
            or beside.max_pass_tokens < alone.max_pass_tokens)  # the target runs in what the draft leaves
    with pytest.raises(StreamerError, match=rf"draft model \({draft.folder.name}, whole\)"):
        plan(files, BASELINE + share, draft=draft)
    r = cli("plan", folder, "--memory-budget", "1G", "--draft", draft.folder, "--disk-gbps", "2")
    assert r.returncode == 0 and f"draft model      {draft.folder.name}, whole in RAM" in r.stdout, r.stderr


@pytest.mark.parametrize("mib", [260, 300, 420, 1024, 8192])
def test_breakdown_adds_up_to_the_peak_and_fits_the_budget(folder, mib):
    p = plan(ModelFiles(folder), mib << 20)
    assert sum(p.breakdown().values()) == p.predicted_peak <= p.budget
    assert p.breakdown()["resident weights"] == sum(p.file_bytes[n] for n in p.resident)


def test_short_runs_give_the_ring_what_long_prompts_would_take(folder):
    files = ModelFiles(folder)
    budget = BASELINE + (224 << 20)
    short, long = plan(files, budget, batch=1, context=80), plan(files, budget, batch=1, context=8192)
    assert short.max_pass_tokens == 80  # a pass never needs more rows than the whole context
    assert short.activations < long.activations
    # what activations no longer take goes to the weights: more resident, or a larger ring
    assert short.bytes_per_step < long.bytes_per_step or short.ring_bytes > long.ring_bytes
    assert plan(files, budget, batch=4, context=80).max_pass_tokens == 320


def cli(*args):
    return subprocess.run([sys.executable, "-m", "streamer", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_plan_command(folder):
    r = cli("plan", folder, "--memory-budget", "8G", "--disk-gbps", "2")
    assert r.returncode == 0 and "6 of 6 blocks, and the head" in r.stdout, r.stderr
    assert ("as mapped file pages" if cgroup_limit() is None else "in private memory") in r.stdout
    peak = next(l for l in r.stdout.splitlines() if "predicted peak" in l)
    total, parts = peak.split("predicted peak")[1].split(";")[0].split("=")
    mib = lambda s: float(s.strip().split()[-2].replace(",", ""))
    assert abs(mib(total) - sum(mib(p) for p in parts.split("+"))) <= len(parts.split("+"))  # it adds up (rounding)
    r = cli("plan", folder, "--memory-budget", "64M")
    assert r.returncode == 2 and "cannot work" in r.stderr and "runtime" in r.stderr and "Traceback" not in r.stderr
    for term in ("runtime", "weight ring", "activations", "KV of one block"):  # the same terms as the breakdown
        assert term in r.stderr and term in peak
    r = cli("plan", folder, "--batch-size", "0")
    assert r.returncode == 2 and "--batch-size must be a positive integer or auto, got '0'" in r.stderr
    r = cli("plan", folder, "--memory-budget", "8G", "--disk-gbps", "2", "--batch-size", "auto", "--context", "64")
    picked = [l for l in r.stdout.splitlines() if l.endswith("<- picked")]
    assert r.returncode == 0 and len(picked) == 1, r.stdout + r.stderr
    assert f"memory budget 8,192 MiB for batch {picked[0].split()[0]}, context 64" in r.stdout


V1 = "9:name=systemd:/\n4:memory:/jobs/a1\n1:cpu:/\n0::/\n"
V2 = "0::/user.slice/job\n"


@pytest.mark.parametrize("text,path,value,want", [
    (V1, "memory/jobs/a1/memory.limit_in_bytes", "536870912\n", 512 << 20),
    (V1, "memory/jobs/a1/memory.limit_in_bytes", "9223372036854771712\n", None),  # v1's "no limit"
    (V2, "user.slice/job/memory.max", "2147483648\n", 2 << 30),
    (V2, "user.slice/job/memory.max", "max\n", None),
    (V2, "unified/user.slice/job/memory.max", "1073741824\n", 1 << 30),  # hybrid: v2 mounted at unified/
    ("garbage without colons\n", "x", "1", None),
])
def test_cgroup_limit_parsing(tmp_path, text, path, value, want):
    f = tmp_path / path
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(value)
    assert cgroup_limit(text, tmp_path) == want


MEMORY_RETURNS = """
import gc, sys
sys.path.insert(0, {tests!r})
from conftest import stream
from streamer.memory import rss_parts
for _ in range(2):  # warm up torch's allocator and kernels, and let malloc's arenas settle (measured: 2 runs)
    stream({folder!r}, [1, 2, 3], 4, runner_kw={{"ring_bytes": 64 << 20}})
gc.collect()
before = rss_parts()["private"]
for _ in range(2):
    stream({folder!r}, [1, 2, 3], 4, runner_kw={{"ring_bytes": 64 << 20}})
gc.collect()
print((rss_parts()["private"] - before) >> 20)
"""


def test_memory_returns_after_a_run(folder):
    """In a fresh process, so that nothing earlier tests left behind counts: the ring and the KV cache go."""
    tests = str(__import__("pathlib").Path(__file__).parent)
    r = subprocess.run([sys.executable, "-c", MEMORY_RETURNS.format(tests=tests, folder=str(folder))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 16  # MiB still held after two more runs, each with a 64 MiB ring


def test_kv_first_trades_resident_blocks_for_a_batchs_kv(folder):
    """kv_first (what --batch-size auto plans with): where resident blocks and a big batch's KV cache compete
    for RAM, the KV comes first; the plan still adds up within the budget."""
    files = ModelFiles(folder)
    batch, context = 16, 512
    competing = []
    for mib in range(400, 1200, 8):  # budgets where the default plan keeps blocks resident and KV partly on disk
        p = plan(files, mib << 20, batch, context)
        if p.resident and p.kv_slots < batch:
            competing.append(mib << 20)
    assert competing
    for budget in competing:
        default, first = plan(files, budget, batch, context), plan(files, budget, batch, context, kv_first=True)
        assert first.kv_slots > default.kv_slots and first.resident_bytes < default.resident_bytes
        assert first.predicted_peak <= budget and sum(first.breakdown().values()) == first.predicted_peak
