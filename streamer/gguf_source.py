"""GGUF files of the `llama` architecture (llama.cpp, Ollama, LM Studio) read as Meta's names and layout.

llama.cpp's converter stores wq and wk in Meta's interleaved RoPE order (it undoes HF's permutation), so
every tensor maps one to one onto a Meta key. Matrices are dequantized only in the rows a split file asks
for (one piece of ~16 MiB at a time), so an 8B GGUF splits in bounded memory; the column pieces of the FFN's
w2 dequantize that one matrix once. Q8_0 and Q4_0, the common types, are dequantized here with torch; every
other type the `gguf` package knows (Q4_1, Q5_*, the K-quants, ...) goes through its numpy code.
A file split in parts (`NAME-00001-of-00003.gguf`) is read as one model from its first part.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .args import ModelArgs
from .checkpoint import expected_shapes
from .errors import StreamerError
from .hf import ffn_params

TENSOR_NAMES = {  # Meta's key within layers.N -> llama.cpp's within blk.N
    "attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}
_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}
_PART = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")
_ROPE_FACTORS = (8.0, 32.0, 16.0, 4.0, 2.0)  # Llama 3.1's factor, 3.2's, and others seen with llama3 scaling


def gguf_name(meta: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", meta)
    return f"blk.{m.group(1)}.{TENSOR_NAMES[m.group(2)]}" if m else _TOP[meta]


def parts_of(path: Path) -> list[Path]:
    """The files of one model: `path` alone, or every part of a split GGUF, checked complete."""
    m = _PART.fullmatch(path.name)
    if not m:
        return [path]
    stem, count = m.group(1), int(m.group(3))
    paths = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise StreamerError(f"{path}: part of a {count}-file GGUF, but {', '.join(missing)} is missing")
    return paths


def _open(path: Path):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct errors, ... on a damaged file
        raise StreamerError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def dequantize_rows(data: np.ndarray, qtype) -> torch.Tensor:
    """Rows of a GGUF tensor's raw data (one row of blocks per matrix row) as float32 [rows, cols]."""
    import gguf
    T = gguf.GGMLQuantizationType
    raw = torch.from_numpy(np.array(data))  # a copy: the reader's arrays are read-only memory maps
    if qtype in (T.F32, T.F16):
        return raw.float()
    if qtype == T.BF16:
        return raw.view(torch.int16).view(torch.bfloat16).reshape(raw.shape[0], -1).float()
    if qtype == T.Q8_0:  # blocks of 32: a float16 scale, then 32 int8 codes
        blocks = raw.view(raw.shape[0], -1, 34)
        scale = blocks[..., :2].contiguous().view(torch.float16).float()
        return (blocks[..., 2:].contiguous().view(torch.int8).float() * scale).reshape(raw.shape[0], -1)
    if qtype == T.Q4_0:  # blocks of 32: a float16 scale, then 16 bytes; low nibbles are items 0..15, high 16..31
        blocks = raw.view(raw.shape[0], -1, 18)
        scale = blocks[..., :2].contiguous().view(torch.float16).float()
        qs = blocks[..., 2:]
        codes = torch.cat([qs & 0xF, qs >> 4], dim=-1).float() - 8
        return (codes * scale).reshape(raw.shape[0], -1)
    try:
        return torch.from_numpy(gguf.quants.dequantize(np.array(data), qtype)).float()
    except NotImplementedError:
        raise StreamerError(f"GGUF tensor type {qtype.name} cannot be dequantized (the gguf package has no "
                            "dequantizer for it); convert the file to another type with llama-quantize") from None


class GGUFMatrix:
    """One GGUF matrix as Meta's [rows, cols], dequantized only in the rows sliced from it."""

    ROWS = 1024  # rows dequantized at a time when the whole matrix is written

    def __init__(self, owner: "GGUFCheckpoint", name: str):
        self.owner, self.name = owner, name
        self.tensor = owner.tensors[name]
        self.shape = torch.Size(owner.shape_of(name))

    def rows(self, a: int, b: int) -> torch.Tensor:
        try:
            return dequantize_rows(self.tensor.data[a:b], self.tensor.tensor_type)
        except StreamerError as e:
            raise StreamerError(f"{self.owner.path_of[self.name]}: tensor {self.name!r}: {e}") from None

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice) and index.step in (None, 1):
            a, b, _ = index.indices(self.shape[0])
            return self.rows(a, b)
        if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None):
            return self.owner.whole(self.name)[:, index[1]]
        raise TypeError(f"GGUFMatrix supports row slices and [:, cols], not {index!r}")

    def row_chunks(self):
        """The whole matrix, ROWS rows at a time (how split writes the embedding)."""
        for a in range(0, self.shape[0], self.ROWS):
            yield self.rows(a, min(a + self.ROWS, self.shape[0]))


class GGUFCheckpoint:
    """A GGUF file (or a split GGUF's parts) of the llama architecture, presented with Meta's keys and layout.
    Tokenizer files for the split are made from its metadata (gguf_tokenizer.py)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.paths = parts_of(self.path)
        readers = [_open(p) for p in self.paths]
        self.fields = readers[0].fields
        self.tensors, self.path_of = {}, {}
        for p, r in zip(self.paths, readers):
            for t in r.tensors:
                self.tensors[t.name], self.path_of[t.name] = t, p
        arch = self.value("general.architecture")
        if arch != "llama":
            raise StreamerError(f"{self.path}: architecture {arch!r} is not 'llama'; streamer runs the llama "
                                "architecture only (Llama 2/3, Mistral, TinyLlama, SmolLM, ...)")
        self.args = self._args()
        self.shapes = expected_shapes(self.args)
        self.tied = "output.weight" not in self.tensors
        self._check()
        self._whole: tuple[str, torch.Tensor] | None = None
        self.rope_factor_from = "the GGUF's rope_freqs" if self.args.use_scaled_rope else None
        from .gguf_tokenizer import tokenizer_files
        self._tokenizer_files = tokenizer_files(self)

    # --- metadata --------------------------------------------------------------------------------------------
    def value(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        if isinstance(value, float):  # a float32: its shortest decimal (1e-05, not 9.999999747378752e-06)
            return float(str(np.float32(value)))
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    def _need(self, key: str):
        value = self.value(key)
        if value is None:
            raise StreamerError(f"{self.path}: metadata {key!r} is missing")
        return value

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))  # ggml lists the fastest dim first

    def _args(self) -> ModelArgs:
        if "token_embd.weight" not in self.tensors:
            raise StreamerError(f"{self.path}: no tensor 'token_embd.weight'")
        dim, n_heads = int(self._need("llama.embedding_length")), int(self._need("llama.attention.head_count"))
        head_dim = int(self.value("llama.attention.key_length", dim // n_heads))
        if self.value("llama.attention.value_length", head_dim) != head_dim:
            raise StreamerError(f"{self.path}: value_length {self.value('llama.attention.value_length')} != "
                                f"key_length {head_dim}; streamer runs equal key and value heads")
        rope_dims = self.value("llama.rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise StreamerError(f"{self.path}: rope.dimension_count {rope_dims} != head width {head_dim} (partial "
                                "rotary embeddings are not implemented)")
        params = {"dim": dim, "n_layers": int(self._need("llama.block_count")), "n_heads": n_heads,
                  "n_kv_heads": int(self.value("llama.attention.head_count_kv", n_heads)),
                  "vocab_size": self.shape_of("token_embd.weight")[0],
                  "norm_eps": float(self.value("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                  "rope_theta": float(self.value("llama.rope.freq_base", 10000.0)),
                  "max_seq_len": int(self.value("llama.context_length", 4096)),
                  **ffn_params(dim, int(self._need("llama.feed_forward_length")))}
        if head_dim * n_heads != dim:
            params["head_dim"] = head_dim
        scaling = self.value("llama.rope.scaling.type", "none")
        if scaling == "linear":
            params["rope_linear_factor"] = float(self._need("llama.rope.scaling.factor"))
        elif scaling not in ("none", None):
            raise StreamerError(f"{self.path}: rope scaling type {scaling!r} is not supported (none, linear, or "
                                "Llama 3.1's rope_freqs)")
        args = ModelArgs.from_params(params, source=str(self.path))
        if "rope_freqs.weight" in self.tensors:
            args = self._llama3_rope(args)
        return args

    def _llama3_rope(self, args: ModelArgs) -> ModelArgs:
        """llama.cpp stores Llama 3.1's frequency scaling as per-frequency divisors: find the factor that gives them."""
        from .model import rope_frequencies
        t = self.tensors["rope_freqs.weight"]
        got = dequantize_rows(t.data[None], t.tensor_type)[0]
        base = rope_frequencies(args)
        for factor in _ROPE_FACTORS:
            scaled = replace(args, use_scaled_rope=True, rope_scale_factor=factor)
            if got.shape == base.shape and torch.allclose(base / rope_frequencies(scaled), got, rtol=1e-4):
                return scaled
        raise StreamerError(f"{self.path}: rope_freqs.weight matches Llama 3.1's scaling with none of the factors "
                            f"{', '.join(f'{f:g}' for f in _ROPE_FACTORS)}")

    def _check(self) -> None:
        wanted = {gguf_name(k) for k in self.shapes} | {"rope_freqs.weight"}
        for name in self.tensors:
            if name not in wanted:
                raise StreamerError(f"{self.path_of[name]}: unexpected tensor {name!r}: a llama model has no such "
                                    "weight, and streamer would run without it")
        for key, shape in self.shapes.items():
            name = self._name(key)
            if name not in self.tensors:
                raise StreamerError(f"{self.path}: missing tensor {name!r}")
            if self.shape_of(name) != shape:
                raise StreamerError(f"{self.path}: tensor {name!r} has shape {list(self.shape_of(name))}, the "
                                    f"metadata implies {list(shape)}")

    def _name(self, key: str) -> str:
        return "token_embd.weight" if key == "output.weight" and self.tied else gguf_name(key)

    @property
    def dtype(self) -> torch.dtype:
        """The split's default dtype: the matrices' own float type, or bfloat16 for quantized ones."""
        import gguf
        T = gguf.GGMLQuantizationType
        kinds = {self.tensors[self._name(k)].tensor_type for k, s in self.shapes.items() if len(s) == 2}
        plain = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
        return plain[kinds.pop()] if len(kinds) == 1 and next(iter(kinds)) in plain else torch.bfloat16

    # --- tensors ---------------------------------------------------------------------------------------------
    def tensor(self, key: str):
        """Norms as float32 tensors; matrices as a GGUFMatrix, read in the rows sliced from it."""
        name = self._name(key)
        if len(self.shapes[key]) == 1:
            t = self.tensors[name]
            return dequantize_rows(t.data[None], t.tensor_type)[0]
        return GGUFMatrix(self, name)

    def whole(self, name: str) -> torch.Tensor:
        """A whole matrix in float32, kept until another is asked for (w2's column pieces reuse it)."""
        if self._whole is None or self._whole[0] != name:
            self._whole = None
            m = GGUFMatrix(self, name)
            out = torch.empty(m.shape)
            for a in range(0, m.shape[0], m.ROWS):
                out[a:a + m.ROWS] = m.rows(a, min(a + m.ROWS, m.shape[0]))
            self._whole = (name, out)
        return self._whole[1]

    def params_json(self) -> bytes:
        return json.dumps(self.args.to_dict(), indent=2).encode()

    def tokenizer_files(self) -> dict[str, bytes]:
        return self._tokenizer_files

    def missing_tokenizer_hint(self) -> str:
        return f"{self.path}: no tokenizer metadata (tokenizer.ggml.*); --prompt-ids works without one"
