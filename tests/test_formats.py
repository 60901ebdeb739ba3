"""Every checkpoint a user has: model-parallel Meta shards, Hugging Face safetensors, 3.1/3.2 RoPE scaling,
the Hub download path (against a local cache), and `streamer info`."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import GQA, SCALED, HD64_TIED, assert_logprobs_close, load_meta_state, params_of
from references import hf_model
from streamer import MemoryKVCache, ModelArgs, ModelFiles, Runner
from streamer.checkpoint import infer_rope_factor
from streamer.layout import MANIFEST
from streamer.split import split
from streamer.synthetic import PRESETS, write_checkpoint

DIM1 = ("attention.wo.weight", "feed_forward.w2.weight")
PROMPT = [1, 17, 42, 99, 5, 250, 3, 8, 120, 64, 7]


def shard(state, n, out, params_file):
    """Meta's model-parallel layout: dim 0 for wq/wk/wv/w1/w3/output/tok_embeddings, dim 1 for wo/w2, norms copied."""
    out.mkdir(parents=True)
    for r in range(n):
        part = {}
        for k, v in state.items():
            if v.dim() == 1:
                part[k] = v.clone()
            else:
                part[k] = v.chunk(n, dim=1 if k.endswith(DIM1) else 0)[r].clone()
        torch.save(part, out / f"consolidated.{r:02d}.pth")
    shutil.copyfile(params_file, out / "params.json")


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_checkpoint_splits_like_the_whole_one(tmp_path, n):
    params = {**GQA, "n_kv_heads": 4}
    meta = write_checkpoint(tmp_path / "meta", params, torch.float32, tokenizer=False)
    split(meta, tmp_path / "whole")
    shard(load_meta_state(meta), n, tmp_path / "sharded", meta / "params.json")
    split(tmp_path / "sharded", tmp_path / "merged")
    for f in json.loads((tmp_path / "whole" / MANIFEST).read_text())["files"]:
        assert (tmp_path / "whole" / f["name"]).read_bytes() == (tmp_path / "merged" / f["name"]).read_bytes(), f["name"]


def save_hf(tmp_path, params, tied):
    meta = write_checkpoint(tmp_path / "meta", params, torch.float32, tokenizer=False, tied=tied)
    model = hf_model(params_of(meta), load_meta_state(meta), tied=tied)
    model.save_pretrained(tmp_path / "hf")
    return model


@pytest.mark.parametrize("params,tied", [(GQA, False), (SCALED, False), (HD64_TIED, True)], ids=["gqa", "llama3_rope", "tied"])
def test_hf_safetensors_folder(tmp_path, params, tied):
    model = save_hf(tmp_path, params, tied)
    assert not tied or not any("lm_head" in k for k in json.dumps(os.listdir(tmp_path / "hf")))
    split(tmp_path / "hf", tmp_path / "layers")
    files = ModelFiles(tmp_path / "layers")
    cache = MemoryKVCache(files.args, 1, len(PROMPT), torch.float32)
    with Runner(files, torch.float32) as runner:
        got = torch.log_softmax(runner.forward([(0, PROMPT)], cache)[0], -1)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0, -1].float(), -1)
    assert_logprobs_close(got, want)
    # and it is the same model as splitting Meta's own files
    split(tmp_path / "meta", tmp_path / "from_meta")
    for f in json.loads((tmp_path / "from_meta" / MANIFEST).read_text())["files"]:
        if f["name"].endswith(".safetensors"):
            assert (tmp_path / "from_meta" / f["name"]).read_bytes() == (tmp_path / "layers" / f["name"]).read_bytes()


def test_rope_scaling_factor_recorded_and_inferred(tmp_path):
    meta = write_checkpoint(tmp_path / "meta", SCALED, torch.float32, tokenizer=False)
    r = subprocess.run([sys.executable, "-m", "streamer", "split", meta, tmp_path / "a", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0 and "rope scaling: factor 8" in r.stderr
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["args"]["rope_scale_factor"] == 8.0
    r = subprocess.run([sys.executable, "-m", "streamer", "split", meta, tmp_path / "b", "--quiet", "--rope-scaling-factor", "32"],
                       capture_output=True, text=True)
    assert "factor 32 (given" in r.stderr and ModelFiles(tmp_path / "b").args.rope_scale_factor == 32.0
    assert infer_rope_factor(ModelArgs.from_params(PRESETS["1b"]))[0] == 32.0
    assert infer_rope_factor(ModelArgs.from_params(PRESETS["3b"]))[0] == 32.0
    assert infer_rope_factor(ModelArgs.from_params({**PRESETS["8b"], "use_scaled_rope": True}))[0] == 8.0


def test_download_from_a_local_hub_cache(tmp_path):
    """No network here: the test lays out a real HF cache and runs the command offline against it."""
    save_hf(tmp_path, GQA, False)
    cache = tmp_path / "hub"
    repo = cache / "models--test-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tmp_path / "hf", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "streamer", "download"]
    r = subprocess.run(cmd + ["test-org/tiny-llama", tmp_path / "layers", "--quiet"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert ModelFiles(tmp_path / "layers").args.n_kv_heads == GQA["n_kv_heads"]
    r = subprocess.run(cmd + ["test-org/absent", tmp_path / "x"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "not in the local Hugging Face cache" in r.stderr and "Traceback" not in r.stderr


def test_info(tmp_path):
    meta = write_checkpoint(tmp_path / "meta", SCALED, torch.float32, tokenizer=False)
    split(meta, tmp_path / "layers")
    r = subprocess.run([sys.executable, "-m", "streamer", "info", tmp_path / "layers"], capture_output=True, text=True)
    assert r.returncode == 0 and "format v1" in r.stdout and "factor" in r.stdout and "MiB per block" in r.stdout
    j = json.loads(subprocess.run([sys.executable, "-m", "streamer", "info", tmp_path / "layers", "--json"],
                                  capture_output=True, text=True).stdout)
    assert j["rope_scaling"]["factor"] == 8.0 and j["dtype"] == "float32" and j["bytes_total"] > j["bytes_per_block"]


def test_meta_to_hf_tool_round_trips(tmp_path):
    """tools/meta_to_hf.py (the peers' input in bench.py) gives a folder HF loads and streamer splits identically."""
    from transformers import LlamaForCausalLM
    meta = write_checkpoint(tmp_path / "meta", SCALED, torch.float32, tokenizer=False)
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "meta_to_hf.py")
    subprocess.run([sys.executable, tool, meta, tmp_path / "hf"], check=True, capture_output=True)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    split(meta, tmp_path / "a")
    split(tmp_path / "hf", tmp_path / "b")
    for f in json.loads((tmp_path / "a" / MANIFEST).read_text())["files"]:
        if f["name"].endswith(".safetensors"):
            assert (tmp_path / "a" / f["name"]).read_bytes() == (tmp_path / "b" / f["name"]).read_bytes()
    files = ModelFiles(tmp_path / "a")
    with Runner(files, torch.float32) as runner:
        got = torch.log_softmax(runner.forward([(0, PROMPT)], MemoryKVCache(files.args, 1, len(PROMPT), torch.float32))[0], -1)
    with torch.no_grad():
        assert_logprobs_close(got, torch.log_softmax(model(torch.tensor([PROMPT])).logits[0, -1].float(), -1))
