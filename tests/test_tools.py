"""The tools stay runnable: checkpoint presets at their real sizes, and smoke runs of both benchmarks."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamer import ModelArgs
from streamer.checkpoint import expected_shapes
from streamer.memcap import available
from streamer.synthetic import PRESETS

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_presets_have_the_real_sizes():
    count = {k: sum(torch.Size(s).numel() for s in expected_shapes(ModelArgs.from_params(p)).values()) for k, p in PRESETS.items()}
    assert count["8b"] == 8_030_261_248
    assert ModelArgs.from_params(PRESETS["8b"]).ffn_dim == 14336
    assert ModelArgs.from_params(PRESETS["1b"]).head_dim == 64 and ModelArgs.from_params(PRESETS["1b"]).ffn_dim == 8192
    assert ModelArgs.from_params(PRESETS["3b"]).ffn_dim == 8192


def test_bench_smoke(tmp_path):
    meta = tmp_path / "meta"
    subprocess.run([sys.executable, TOOLS / "make_checkpoint.py", meta, "--preset", "tiny"], check=True, capture_output=True)
    for q in ("", "int8", "int4"):
        subprocess.run([sys.executable, "-m", "streamer", "split", meta, tmp_path / (q or "layers"), "--quiet"]
                       + (["--quantize", q] if q else []), check=True, capture_output=True)
    r = subprocess.run([sys.executable, TOOLS / "bench.py", tmp_path / "layers", "--cap", "none", "--warm", "--steps", "1",
                        "--cases", "floor,matmul,batch,prefill,int8,int4,resident", "--batches", "1,2", "--compile", "off",
                        "--int8", tmp_path / "int8", "--int4", tmp_path / "int4"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for row in ("cold read", "matmul rate", "decode step, batch 2", "prefill 1 x 512", "int8 files", "int4 files",
                "memory read rate", "decode step, all resident", "loading them"):
        assert row in r.stdout, r.stdout
    assert "failed" not in r.stdout
    r = subprocess.run([sys.executable, TOOLS / "bench_memory.py", meta, tmp_path / "layers", "--caps", "none", "--budgets", "",
                        "--new-tokens", "2", "--warm", "--out", tmp_path / "m.md", "--plot", tmp_path / "m.png"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| none | ok |" in (tmp_path / "m.md").read_text()


@pytest.mark.skipif(not available()[0], reason=f"memcap cannot run here: {available()[1]}")
def test_bench_caps_smoke(tmp_path):
    meta = tmp_path / "meta"
    subprocess.run([sys.executable, TOOLS / "make_checkpoint.py", meta, "--preset", "tiny"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "streamer", "split", meta, tmp_path / "layers", "--quiet"], check=True, capture_output=True)
    r = subprocess.run([sys.executable, TOOLS / "bench_caps.py", tmp_path / "layers", "--caps", "384M,1G", "--new-tokens", "4",
                        "--prompt-len", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| 384M |" in r.stdout and "| 1G |" in r.stdout and "384M against 1G: ratio of medians" in r.stdout, r.stdout
