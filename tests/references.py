"""Builders for the two reference implementations nobody here wrote: HF transformers and Meta's llama-models."""
from __future__ import annotations

import importlib
import os
import socket
import sys
import types

import torch

from streamer.args import ModelArgs


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_llama_weights_to_hf.py's permutation: interleaved RoPE pairs -> HF's rotate-half halves."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def hf_model(params: dict, state: dict[str, torch.Tensor], tied: bool = False):
    """HF LlamaForCausalLM on the same weights (float32, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = ModelArgs.from_params(params)
    rope_scaling = None
    if a.use_scaled_rope:
        rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_dim,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                         head_dim=a.head_dim, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                         rope_scaling=rope_scaling, max_position_embeddings=131072 if rope_scaling else 8192,
                         tie_word_embeddings=tied, attention_bias=False, mlp_bias=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float().eval()
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not tied:
        hf["lm_head.weight"] = state["output.weight"]
    names = {"attention.wo": "self_attn.o_proj", "attention.wv": "self_attn.v_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(a.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf[q + "self_attn.q_proj.weight"] = permute_qk(state[p + "attention.wq.weight"], a.n_heads)
        hf[q + "self_attn.k_proj.weight"] = permute_qk(state[p + "attention.wk.weight"], a.n_kv_heads)
        for meta_name, hf_name in names.items():
            hf[q + hf_name + ".weight"] = state[p + meta_name + ".weight"]
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and all("rotary" in m or (tied and m == "lm_head.weight") for m in missing), (missing, unexpected)
    return model


def meta_model(params: dict, state: dict[str, torch.Tensor], max_seq_len: int = 256):
    """Meta's llama_models/llama3/model.py Transformer on CPU, in a one-process gloo group."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # PyPI's torchvision fails beside the CPU torch; the reference doesn't need it
        stub = types.ModuleType("torchvision")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        sys.modules["torchvision"] = stub
    import fairscale.nn.model_parallel.initialize as fs_init
    from llama_models.llama3.args import ModelArgs as MetaArgs
    from llama_models.llama3.model import Transformer

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    model = Transformer(MetaArgs(max_seq_len=max_seq_len, max_batch_size=1, **params))
    model.load_state_dict(state, strict=True)
    return model.eval()
