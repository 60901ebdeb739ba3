"""End to end through the command line: make_checkpoint -> split -> generate, in tmp_path."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from streamer.layout import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "streamer", *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, ROOT / "tools" / "make_checkpoint.py", root / "meta", "--preset", "tiny",
                    "--dtype", "float32", "--seed", "3"], check=True, capture_output=True, timeout=300)
    cli("split", root / "meta", root / "layers", "--quiet")
    return root / "layers"


def test_split_output(tiny):
    manifest, _ = read_manifest(tiny)
    names = {f["name"] for f in manifest["files"]}
    assert {"embedding.safetensors", "head.safetensors", "params.json", "block_000.safetensors", "block_003.safetensors"} <= names
    assert manifest["dtype"] == "float32" and manifest["args"]["n_layers"] == 4
    assert all(len(f["sha256"]) == 64 and f["bytes"] == (tiny / f["name"]).stat().st_size for f in manifest["files"])


def test_generate_json_from_ids(tiny):
    r = cli("generate", tiny, "--prompt-ids", "128000,1820,4320", "--max-new-tokens", "5", "--dtype", "float32",
            "--json", "--logprobs", "3")
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == [128000, 1820, 4320] and len(out["tokens"]) == 5 == len(out["logprobs"])
    assert out["finish_reason"] == "length"
    assert all(len(top) == 3 and top[0][1] >= top[-1][1] for top in out["top_logprobs"])
    assert out["top_logprobs"][0][0] == [out["tokens"][0], out["logprobs"][0]]  # greedy picks the best
    stats = out["stats"]
    assert stats["prefill_s"] > 0 and stats["decode_s_per_token"] > 0 and stats["bytes_read"] > 0
    assert stats["memory"]["peak_rss"] > 0 and stats["memory"]["peak_private"] > 0
    assert "peak rss" in r.stderr


def test_generate_text_prints_as_it_goes(tiny, tokenizer_path):
    r = cli("generate", tiny, "--prompt", "the answer to the ultimate question of life, the universe, and everything is ",
            "--max-new-tokens", "4", "--dtype", "float32", "--memory-report")
    assert r.stdout.strip()
    assert "phase" in r.stderr and "decode" in r.stderr
    j = json.loads(cli("generate", tiny, "--prompt", "Hi", "--chat", "--system", "Be brief.", "--max-new-tokens", "2",
                       "--json").stdout)
    assert j["prompt_ids"][:4] == [128000, 128006, 9125, 128007] and j["prompt_ids"][-4:] == [128006, 78191, 128007, 271]


def test_same_greedy_output_as_python_api(tiny):
    a = json.loads(cli("generate", tiny, "--prompt-ids", "128000,1820", "--max-new-tokens", "6", "--dtype", "float32", "--json").stdout)
    b = json.loads(cli("generate", tiny, "--prompt-ids", "128000,1820", "--max-new-tokens", "6", "--dtype", "float32", "--json").stdout)
    assert a["tokens"] == b["tokens"]


def test_demo(tmp_path):
    r = cli("demo", "--dir", tmp_path / "demo", "--max-new-tokens", "3")
    assert "tokens:" in r.stdout and "random" in r.stderr and "peak" in r.stderr
