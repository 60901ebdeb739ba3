"""Shared fixtures: tiny random Meta checkpoints, split folders, and the reference models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamer import Engine, GenStats
from streamer.demo import STORIES  # the trained stories260K model that ships with streamer
from streamer.split import split
from streamer.synthetic import write_checkpoint
from streamer.tokenizer import packaged_tokenizer_path

# Three shapes the references are checked on: GQA; Llama 3.1 scaled RoPE; head_dim 64 with a tied head.
GQA = {"dim": 64, "n_layers": 3, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32,
       "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0}
SCALED = {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 384, "multiple_of": 64,
          "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
HD64_TIED = {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 1, "vocab_size": 300, "multiple_of": 64,
             "norm_eps": 1e-5, "rope_theta": 10000.0}
SHAPES = {"gqa": (GQA, False), "scaled_rope": (SCALED, False), "hd64_tied": (HD64_TIED, True)}


def make_split(root: Path, params: dict, tied: bool = False, dtype=torch.float32, seed: int = 0) -> Path:
    meta = write_checkpoint(root / "meta", params, dtype, seed=seed, tied=tied, tokenizer=False)
    split(meta, root / "layers")
    return root / "layers"


@pytest.fixture(params=sorted(SHAPES))
def shape_model(request, tmp_path):
    params, tied = SHAPES[request.param]
    return request.param, make_split(tmp_path, params, tied), tmp_path / "meta"


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    path = packaged_tokenizer_path()
    if path is None:
        pytest.skip("llama-models is not installed: it ships Llama 3's tokenizer.model")
    return path


@pytest.fixture(scope="session")
def llama3_tiny(tmp_path_factory, tokenizer_path) -> Path:
    """The `tiny` preset (Llama 3's vocabulary, 4 small blocks) with the real tokenizer, split."""
    from streamer.synthetic import PRESETS
    root = tmp_path_factory.mktemp("llama3_tiny")
    write_checkpoint(root / "meta", PRESETS["tiny"], torch.bfloat16, seed=3)
    split(root / "meta", root / "layers")
    return root / "layers"


def resident_in_pieces(tmp_path, monkeypatch, scheme: str | None, dt):
    """A runner holding every file of a small split in RAM (quantized by `scheme`, or bf16 where None), its
    matrices stored in several pieces; the split is at tmp_path / (scheme or "bf16")."""
    from streamer import ModelFiles, Runner, layout
    monkeypatch.setattr(layout, "PIECE_BYTES", 16 << 10)  # int8: wqkv in 4 pieces, wo 2, the head 8
    monkeypatch.setattr(layout, "FFN_PIECE_ROWS", 64)  # 7 FFN slices of 64
    make_split(tmp_path, {**GQA, "dim": 128, "n_heads": 4}, dtype=torch.float32 if scheme else torch.bfloat16)
    split(tmp_path / "meta", tmp_path / (scheme or "bf16"), quantize=scheme)
    files = ModelFiles(tmp_path / (scheme or "bf16"))
    return Runner(files, dt, resident=files.step_files())


def stream(folder: Path, prompt: list[int], n: int, dtype=torch.float32, kv_dir=None, runner_kw=None, compile=False,
           kv_cache="auto", draft=None, draft_tokens=8, draft_branches=4, **kw):
    """Greedy generation through the Engine (streamed or resident runner; KV cache placed by the plan, or on
    disk with kv_cache="disk"; speculative with a draft): (pieces, stats)."""
    stats = GenStats()
    with Engine(folder, dtype=dtype, max_seq_len=256, compile=compile, kv_cache=kv_cache, runner_options=runner_kw,
                draft=draft, draft_tokens=draft_tokens, draft_branches=draft_branches) as engine:
        pieces = list(engine.stream(prompt_ids=prompt, max_new_tokens=n, kv_dir=kv_dir, stats=stats, **kw))
    return pieces, stats


def load_meta_state(meta: Path) -> dict[str, torch.Tensor]:
    return torch.load(meta / "consolidated.00.pth", weights_only=True)


def params_of(meta: Path) -> dict:
    return json.loads((meta / "params.json").read_text())


def assert_logprobs_close(got, want):
    """Logprobs within 1e-5 relative. For confident tokens (logprob near 0) a relative bound on the
    logprob is ill-conditioned, so 1e-6 absolute is also accepted: a logprob difference d is a relative
    error of e^d - 1 ~ d in the probability itself, so that is 1e-6 relative on the probability."""
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float32), torch.as_tensor(want, dtype=torch.float32),
                               rtol=1e-5, atol=1e-6)
