"""Hugging Face Llama checkpoints (config.json + model*.safetensors) read as Meta's names and layout.

The one map from HF to Meta names and the one q/k un-permutation live here: HF stores wq and wk
permuted for its rotate-half RoPE; the rest of streamer only ever sees Meta's interleaved layout.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .args import ModelArgs
from .checkpoint import expected_shapes
from .chat import CONFIG_FILES
from .errors import StreamerError
from .gguf_tokenizer import is_llama3, tiktoken_file
from .tokenizer import PAT_STR

_BLOCK = {  # Meta name inside layers.i -> HF name inside model.layers.i
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def hf_name(meta: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", meta)
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}" if m else _TOP[meta]


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE pairs -> HF's rotate-half row order (convert_llama_weights_to_hf.py)."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half row order back to Meta's interleaved pairs (inverse of convert_llama_weights_to_hf)."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def config_from_args(a: ModelArgs, dtype: torch.dtype) -> dict:
    """A transformers LlamaForCausalLM config.json for these args."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
           "intermediate_size": a.ffn_dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
           "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim, "vocab_size": a.vocab_size,
           "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "max_position_embeddings": a.max_seq_len,
           "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
           "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": str(dtype).removeprefix("torch.")}
    if a.rope_linear_factor is not None:
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": a.rope_linear_factor}
    if a.use_scaled_rope:
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": a.rope_scale_factor, "low_freq_factor": a.rope_low_freq_factor,
                               "high_freq_factor": a.rope_high_freq_factor,
                               "original_max_position_embeddings": a.rope_original_max_pos}
    return cfg


ARCHITECTURES = {"llama": ("LlamaForCausalLM",), "mistral": ("MistralForCausalLM",)}
# config keys that change the math in ways the block math does not implement: refused unless off
_MATH_KEYS = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
              "attn_logit_softcapping": None, "final_logit_softcapping": None}
_HARMLESS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old saves: recomputed, never read


def check_config(cfg: dict, source: str) -> None:
    """Refuse what streamer would otherwise run wrongly: another architecture, or a config that turns on
    something the block math does not do (biases, another activation)."""
    kind, arch = cfg.get("model_type"), cfg.get("architectures") or list(ARCHITECTURES.get(cfg.get("model_type"), ()))
    if kind not in ARCHITECTURES or any(a not in ARCHITECTURES[kind] for a in arch):
        raise StreamerError(f"{source}: model_type {kind!r} ({', '.join(map(str, arch))}) is not supported; streamer "
                            "runs LlamaForCausalLM and MistralForCausalLM checkpoints")
    for key, off in _MATH_KEYS.items():
        if cfg.get(key) not in (None, off):
            raise StreamerError(f"{source}: {key} = {cfg[key]!r} changes the model's math in a way streamer does not "
                                f"implement (it runs {key} = {off!r})")


def ffn_params(dim: int, inter: int) -> dict:
    """Meta's FFN sizing parameters that give exactly `inter` hidden units: rounding 8*dim/3 up to a multiple
    of `inter` itself reproduces it, with a multiplier below 1 when it is smaller."""
    base = int(2 * 4 * dim / 3)
    return {"multiple_of": inter, **({"ffn_dim_multiplier": inter / base} if inter < base else {})}


def args_from_config(cfg: dict, source: str) -> ModelArgs:
    check_config(cfg, source)
    try:
        dim, inter = cfg["hidden_size"], cfg["intermediate_size"]
        params = {"dim": dim, "n_layers": cfg["num_hidden_layers"], "n_heads": cfg["num_attention_heads"],
                  "n_kv_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                  "vocab_size": cfg["vocab_size"], "norm_eps": cfg.get("rms_norm_eps", 1e-5),
                  "max_seq_len": cfg.get("max_position_embeddings", 8192)}
    except KeyError as e:
        raise StreamerError(f"{source}: missing {e.args[0]!r}") from None
    if cfg.get("head_dim") not in (None, dim // params["n_heads"]):
        params["head_dim"] = cfg["head_dim"]
    window = cfg.get("sliding_window")
    if window is not None:  # within the window, windowed attention is full attention: cap the context there
        if not isinstance(window, int) or window <= 0:
            raise StreamerError(f"{source}: sliding_window {window!r} is not a positive integer")
        params["max_seq_len"] = min(params["max_seq_len"], window)
    rope = cfg.get("rope_parameters")  # transformers 5 keeps rope_theta and the scaling here, and reads them first
    if rope:
        params["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else None
    else:
        params["rope_theta"], scaling = cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            params.update(use_scaled_rope=True, rope_scale_factor=float(scaling["factor"]),
                          rope_low_freq_factor=float(scaling["low_freq_factor"]),
                          rope_high_freq_factor=float(scaling["high_freq_factor"]),
                          rope_original_max_pos=int(scaling["original_max_position_embeddings"]))
        elif kind == "linear":
            params["rope_linear_factor"] = float(scaling["factor"])
        elif kind != "default":
            raise StreamerError(f"{source}: rope scaling type {kind!r} is not supported (none, 'llama3' or 'linear')")
    params.update(ffn_params(dim, inter))
    args = ModelArgs.from_params(params, source=source)
    if args.ffn_dim != inter:
        raise StreamerError(f"{source}: intermediate_size {inter} cannot be expressed as Meta's FFN sizing")
    return args


class HFCheckpoint:
    """A folder with config.json and model*.safetensors, presented with Meta's keys and layout."""

    def __init__(self, folder: Path, **arg_overrides):
        from safetensors import safe_open

        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        try:
            self.config = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StreamerError(f"{cfg_path}: cannot read ({e})") from None
        self.args = args_from_config(self.config, str(cfg_path))
        if arg_overrides:
            self.args = ModelArgs.from_params({**self.args.to_dict(), **arg_overrides}, source=str(cfg_path))
        self.paths = sorted(self.folder.glob("model*.safetensors"))
        if not self.paths:
            raise StreamerError(f"{self.folder}: no model*.safetensors files")
        self.tied = bool(self.config.get("tie_word_embeddings", False))
        self._where, self._path_of = {}, {}
        self._files = []
        for path in self.paths:
            try:
                f = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise StreamerError(f"{path}: not a readable safetensors file ({e})") from None
            self._files.append(f)
            for key in f.keys():
                self._where[key], self._path_of[key] = f, path
        self.shapes = expected_shapes(self.args)
        wanted = {hf_name(k) for k in self.shapes}
        for name, f in self._where.items():
            if name not in wanted and not _HARMLESS.fullmatch(name):
                raise StreamerError(f"{self._path_of[name]}: unexpected tensor {name!r}: a Llama checkpoint has no such "
                                    "weight, and streamer would run without it")
        for key, shape in self.shapes.items():
            name = hf_name(key)
            if key == "output.weight" and name not in self._where:
                if not self.tied:
                    raise StreamerError(f"{self.folder}: missing {name!r} and tie_word_embeddings is not set")
                name = hf_name("tok_embeddings.weight")
            if name not in self._where:
                raise StreamerError(f"{self.folder}: missing tensor {name!r}")
            got = tuple(self._where[name].get_slice(name).get_shape())
            if got != shape:
                raise StreamerError(f"{self.folder}: tensor {name!r} has shape {list(got)}, config.json implies {list(shape)}")
        self.dtype = self._get("tok_embeddings.weight").dtype
        self.rope_factor_from = "config.json"

    def _get(self, key: str) -> torch.Tensor:
        name = hf_name(key)
        if key == "output.weight" and name not in self._where:
            name = hf_name("tok_embeddings.weight")  # tied head: Llama 3.2 stores no lm_head
        return self._where[name].get_tensor(name)

    def tensor(self, key: str) -> torch.Tensor:
        w = self._get(key)
        if key.endswith("attention.wq.weight"):
            return unpermute_qk(w, self.args.n_heads)
        if key.endswith("attention.wk.weight"):
            return unpermute_qk(w, self.args.n_kv_heads)
        return w

    def params_json(self) -> bytes:
        return json.dumps(self.args.to_dict(), indent=2).encode()

    def tokenizer_files(self) -> dict[str, bytes]:
        """Meta's tokenizer.model from original/, or tokenizer.json (Llama 3's own vocabulary becomes Meta's
        tiktoken file), with the chat template and generation config beside it."""
        files = {name: (self.folder / name).read_bytes() for name in CONFIG_FILES if (self.folder / name).is_file()}
        meta, fast = self.folder / "original" / "tokenizer.model", self.folder / "tokenizer.json"
        if meta.is_file():
            files["tokenizer.model"] = meta.read_bytes()
        elif fast.is_file():
            files.update(_tokenizer_json(fast))
        return files

    def missing_tokenizer_hint(self) -> str:
        return (f"{self.folder} has no tokenizer.json (or Meta's original/tokenizer.model): fetch it with "
                f"`huggingface-cli download REPO tokenizer.json tokenizer_config.json --local-dir {self.folder}` to use "
                "--prompt text (--prompt-ids works without it)")


def _tokenizer_json(path: Path) -> dict[str, bytes]:
    """tokenizer.json as the split keeps it: Llama 3's exact vocabulary (its pre-tokenizer regex and special
    names) as Meta's tiktoken tokenizer.model, any other as it is."""
    raw = path.read_bytes()
    try:
        spec = json.loads(raw)
        vocab, added = spec["model"]["vocab"], spec.get("added_tokens", [])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise StreamerError(f"{path}: not a Hugging Face tokenizer.json") from None
    pre = spec.get("pre_tokenizer") or {}
    splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [pre]) if isinstance(p, dict)]
    if spec["model"].get("type") == "BPE" and isinstance(vocab, dict) and PAT_STR in splits:
        tokens = [None] * (len(vocab) + len(added))
        for token, i in [*vocab.items(), *((a["content"], a["id"]) for a in added)]:
            if 0 <= i < len(tokens):
                tokens[i] = token
        if None not in tokens and is_llama3(tokens, "llama-bpe"):
            return {"tokenizer.model": tiktoken_file(tokens[:128000])}
    return {"tokenizer.json": raw}
