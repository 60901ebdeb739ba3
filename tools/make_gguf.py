"""Write a Meta checkpoint folder as a GGUF file for llama.cpp: tools/make_gguf.py MODEL OUT.gguf

MODEL is a folder in Meta's layout (params.json, consolidated.*.pth, tokenizer.model), as
tools/make_checkpoint.py writes. The GGUF has llama.cpp's tensor names and Meta's interleaved q/k rows,
which are what llama.cpp's own converter writes (it undoes HF's permutation), bf16 matrices and float32
norms (or --type F32, F16, Q8_0, Q4_0 matrices, quantized by the gguf package), and the Llama 3 vocabulary as
llama.cpp's `llama-bpe` byte-level BPE, built from tokenizer.model's ranks. `llama-quantize OUT.gguf
OUT-q8_0.gguf Q8_0` makes the quantized peers the way llama.cpp does (its output matrix in Q6_K). Tensors are written one at a
time from the memory-mapped checkpoint, so the whole model is never held in memory. Needs `pip install gguf`.
"""
import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from streamer.checkpoint import MetaCheckpoint
from streamer.gguf_source import TENSOR_NAMES as BLOCK_NAMES
from streamer.model import rope_frequencies
from streamer.tokenizer import Tokenizer, gpt2_byte_table



def tensor_names(n_layers: int, tied: bool) -> list[tuple[str, str]]:
    """(Meta key, GGUF name) in the order llama.cpp's converter writes them."""
    names = [("tok_embeddings.weight", "token_embd.weight")]
    for i in range(n_layers):
        names += [(f"layers.{i}.{k}", f"blk.{i}.{v}") for k, v in BLOCK_NAMES.items()]
    names.append(("norm.weight", "output_norm.weight"))
    return names if tied else names + [("output.weight", "output.weight")]


def byte_level(token: bytes, table: dict[int, str]) -> str:
    return "".join(table[b] for b in token)


def merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Merge rules equivalent to tiktoken's ranks: every split of a token into two tokens, ranked by the
    token's rank, so that any pair whose join is a token merges in rank order (the rules transformers'
    TikTokenConverter writes; one rule per token would leave pairs like (a, bc) unmerged)."""
    rules = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        rules += sorted(splits, key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
    return rules


def add_vocab(w, tok: Tokenizer, n_vocab: int) -> None:
    import gguf
    ranks = tok.model._mergeable_ranks
    table = gpt2_byte_table()
    by_id = {i: t for t, i in ranks.items()}
    tokens = [byte_level(by_id[i], table) for i in range(len(ranks))]
    specials = sorted(tok.special.items(), key=lambda kv: kv[1])
    tokens += [name for name, _ in specials]
    types = [gguf.TokenType.NORMAL] * len(ranks) + [gguf.TokenType.CONTROL] * len(specials)
    for i in range(len(tokens), n_vocab):  # a head wider than the vocabulary: padding ids
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    merges = [f"{byte_level(l, table)} {byte_level(r, table)}" for l, r in merges_of(ranks)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_add_bos_token(True)


TYPES = ("BF16", "F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # matrices; norms are always float32


def as_array(t: torch.Tensor, qtype: str) -> np.ndarray:
    """1-D tensors (norms) in float32, as llama.cpp keeps them; matrices as the bytes of `qtype`."""
    import gguf
    if t.dim() == 1 or qtype == "F32":
        return t.float().numpy()
    if qtype == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    if qtype == "F16":
        return t.half().numpy()
    return gguf.quants.quantize(t.float().numpy(), gguf.GGMLQuantizationType[qtype])


def add_tensor_info(w, name: str, t: torch.Tensor, qtype: str) -> None:
    import gguf
    if t.dim() == 1 or qtype in ("F32", "F16"):
        dtype = np.dtype(np.float32 if t.dim() == 1 or qtype == "F32" else np.float16)
        w.add_tensor_info(name, t.shape, dtype, dtype.itemsize * t.numel())
    else:  # bytes: the writer turns the byte shape back into elements
        kind = gguf.GGMLQuantizationType[qtype]
        shape = gguf.quants.quant_shape_to_byte_shape(tuple(t.shape), kind)
        w.add_tensor_info(name, shape, np.dtype(np.uint8), shape[0] * shape[1], kind)


def write(folder: Path, out: Path, qtype: str = "BF16", vocab=None, quiet: bool = False, parts: int = 1) -> None:
    """vocab(writer) adds the tokenizer's metadata; by default Llama 3's, from the folder's tokenizer.model.
    parts > 1 writes llama.cpp's split format, OUT-00001-of-0000N.gguf ..., holding the tensors in memory
    (small models only)."""
    import gguf
    ckpt = MetaCheckpoint(folder)
    args = ckpt.args
    if vocab is None:
        if ckpt.tokenizer_path is None:
            raise SystemExit(f"{folder}: no tokenizer.model (the GGUF needs the vocabulary)")
        vocab = lambda w: add_vocab(w, Tokenizer(ckpt.tokenizer_path), args.vocab_size)
    tied = "output.weight" not in ckpt.shards[0]
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(folder.name)
    w.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if qtype == "F32" else f"MOSTLY_{qtype}"))
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(ckpt.shapes["layers.0.feed_forward.w1.weight"][0])
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    if args.head_dim * args.n_heads != args.dim:
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    if args.rope_linear_factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(args.rope_linear_factor)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    vocab(w)
    names = tensor_names(args.n_layers, tied)
    sources = [lambda k=k: ckpt.tensor(k) for k, _ in names]
    if args.use_scaled_rope:  # llama.cpp divides each frequency by these factors (Llama 3.1's apply_scaling)
        factors = rope_frequencies(replace(args, use_scaled_rope=False)) / rope_frequencies(args)
        names.append(("", "rope_freqs.weight"))
        sources.append(lambda: factors)
    if parts > 1:
        _write_parts(w, out, names, sources, qtype, parts)
        return
    for (_, name), src in zip(names, sources):
        add_tensor_info(w, name, src(), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0, done = time.perf_counter(), 0
    for (_, name), src in zip(names, sources):
        arr = as_array(src(), qtype)
        w.write_tensor_data(arr)
        done += arr.nbytes
        if not quiet:
            print(f"\r{name}: {done / 1e9:.1f} GB", end="", flush=True)
    w.close()
    os.replace(tmp, out)
    if not quiet:
        print(f"\n{out}: {done / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")


def _write_parts(w, out: Path, names, sources, qtype: str, parts: int) -> None:
    import gguf
    w.split_max_tensors = -(-len(names) // parts)
    for (_, name), src in zip(names, sources):
        t = src()
        kind = None if t.dim() == 1 or qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
        w.add_tensor(name, as_array(t, qtype), raw_dtype=kind)
    w.write_header_to_file(path=out)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a Meta checkpoint folder")
    p.add_argument("out", type=Path)
    p.add_argument("--type", choices=TYPES, default="BF16", help="how matrices are stored (default: BF16)")
    a = p.parse_args()
    write(a.model, a.out, a.type)


if __name__ == "__main__":
    main()
