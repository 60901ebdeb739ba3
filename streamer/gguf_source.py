"""GGUF files of the `llama` architecture (llama.cpp, Ollama, LM Studio) read as Meta's names and layout.

llama.cpp's converter stores wq and wk in Meta's interleaved RoPE order (it undoes HF's permutation), so
every tensor maps one to one onto a Meta key. Matrices are dequantized only in the rows a split file asks
for (one piece of ~16 MiB at a time), so an 8B GGUF splits in bounded memory; the column pieces of the FFN's
w2 dequantize that one matrix once. Q8_0 and Q4_0, the common types, are dequantized here with torch; every
other type the `gguf` package knows (Q4_1, Q5_*, the K-quants, ...) goes through its numpy code. The
header is parsed here (read_gguf says why); the types, block sizes and dequantizers are the gguf package's.
A file split in parts (`NAME-00001-of-00003.gguf`) is read as one model from its first part.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

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


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml's order: the fastest-varying dimension first
    path: Path
    offset: int  # of its data in the file
    rows: int
    row_bytes: int

    def read(self, a: int = 0, b: int | None = None) -> np.ndarray:
        """Rows a..b of the raw data: [rows, bytes per row] uint8, or the values for F32 / F16. Read with preadv
        rather than a memory map, so the pages are page cache the split drops, never the process's."""
        import gguf
        b = self.rows if b is None else b
        raw = bytearray((b - a) * self.row_bytes)  # writable, so torch takes it without another copy
        with open(self.path, "rb") as f:
            got = os.preadv(f.fileno(), [raw], self.offset + a * self.row_bytes)
        if got != len(raw):
            raise StreamerError(f"{self.path}: file ended early while reading tensor {self.name!r}")
        data = np.frombuffer(raw, np.uint8).reshape(b - a, self.row_bytes)
        if self.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = data.view(np.float32 if self.tensor_type == gguf.GGMLQuantizationType.F32 else np.float16)
        return data


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


def read_gguf(path: Path) -> tuple[dict, dict[str, GGUFTensor]]:
    """A GGUF file's metadata {key: value} and tensors {name: GGUFTensor}, read when asked for.

    The header is parsed here rather than with gguf.GGUFReader, which keeps a numpy object per string: for
    Llama 3's 128K-token vocabulary and 280K merges it holds ~450 MB and takes ~10 s, more than a 512M cap
    allows. Tensor types, block sizes and dequantizers still come from the gguf package."""
    import gguf
    data, buf = b"", None
    try:
        with open(path, "rb") as f:
            file_bytes = os.fstat(f.fileno()).st_size
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if file_bytes else b""
        buf = memoryview(data)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (streamer reads 2 and 3, little-endian)")
        off, fields = 24, {}

        def string(off):
            (n,) = struct.unpack_from("<Q", buf, off)
            return bytes(buf[off + 8:off + 8 + n]).decode("utf-8", "replace"), off + 8 + n

        def value(kind, off):
            if kind == _STRING:
                return string(off)
            if kind == _ARRAY:
                item, count = struct.unpack_from("<IQ", buf, off)
                off += 12
                if item in _SCALARS:
                    dt = np.dtype(_SCALARS[item])
                    values = np.frombuffer(buf, dt, count, off).tolist()
                    return values, off + dt.itemsize * count
                values = []
                for _ in range(count):
                    v, off = value(item, off)
                    values.append(v)
                return values, off
            fmt = _SCALARS[kind]
            v = struct.unpack_from(fmt, buf, off)[0]
            if kind == _FLOAT32:  # its shortest decimal (1e-05, not 9.999999747378752e-06)
                v = float(str(np.float32(v)))
            return v, off + struct.calcsize(fmt)

        for _ in range(n_kv):
            key, off = string(off)
            (kind,) = struct.unpack_from("<I", buf, off)
            fields[key], off = value(kind, off + 4)
        infos = []
        for _ in range(n_tensors):
            name, off = string(off)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            shape = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
            kind, offset = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            infos.append((name, gguf.GGMLQuantizationType(kind), tuple(int(d) for d in shape), offset))
        align = int(fields.get("general.alignment", 32))
        start = -(-off // align) * align
    except (ValueError, struct.error, KeyError, IndexError, UnicodeDecodeError, OSError) as e:
        raise StreamerError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    finally:
        if buf is not None:
            buf.release()
        if isinstance(data, mmap.mmap):
            data.close()
    tensors = {}
    for name, kind, shape, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        rows, cols = (int(np.prod(shape[1:])), shape[0])
        if cols % block:
            raise StreamerError(f"{path}: tensor {name!r}: {cols} columns is not a whole number of {kind.name} blocks")
        row_bytes = cols // block * size
        if start + offset + rows * row_bytes > file_bytes:
            raise StreamerError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        tensors[name] = GGUFTensor(name, kind, shape, Path(path), start + offset, rows, row_bytes)
    return fields, tensors


def dequantize_rows(data: np.ndarray, qtype) -> torch.Tensor:
    """Rows of a GGUF tensor's raw data (one row of blocks per matrix row) as float32 [rows, cols]."""
    import gguf
    T = gguf.GGMLQuantizationType
    raw = torch.from_numpy(data)
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
        return torch.from_numpy(gguf.quants.dequantize(data, qtype)).float()
    except NotImplementedError:
        raise StreamerError(f"GGUF tensor type {qtype.name} cannot be dequantized (the gguf package has no "
                            "dequantizer for it); convert the file to another type with llama-quantize") from None


class GGUFMatrix:
    """One GGUF matrix as Meta's [rows, cols], dequantized only in the rows sliced from it."""

    ROWS = 256  # rows dequantized at a time when the whole matrix is read (8B's w2: 14 MB of float32)

    def __init__(self, owner: "GGUFCheckpoint", name: str):
        self.owner, self.name = owner, name
        self.tensor = owner.tensors[name]
        self.shape = torch.Size(owner.shape_of(name))

    def rows(self, a: int, b: int) -> torch.Tensor:
        try:
            return dequantize_rows(self.tensor.read(a, b), self.tensor.tensor_type)
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
        self.tensors, self.path_of = {}, {}
        for i, p in enumerate(self.paths):
            fields, tensors = read_gguf(p)
            if i == 0:
                self.fields = fields
            for name, t in tensors.items():
                self.tensors[name], self.path_of[name] = t, p
        arch = self.value("general.architecture")
        if arch != "llama":
            raise StreamerError(f"{self.path}: architecture {arch!r} is not 'llama'; streamer runs the llama "
                                "architecture only (Llama 2/3, Mistral, TinyLlama, SmolLM, ...)")
        self.args = self._args()
        self.shapes = expected_shapes(self.args)
        self.tied = "output.weight" not in self.tensors
        self._check()
        self._whole: tuple[str, torch.Tensor] | None = None
        self.hold_dtype = torch.float32  # whole matrices are held in this; split sets the dtype it writes
        self.rope_factor_from = "the GGUF's rope_freqs" if self.args.use_scaled_rope else None
        from .gguf_tokenizer import tokenizer_files
        self._tokenizer_files = tokenizer_files(self)

    # --- metadata --------------------------------------------------------------------------------------------
    def value(self, key: str, default=None):
        return self.fields.get(key, default)

    def _need(self, key: str):
        value = self.value(key)
        if value is None:
            raise StreamerError(f"{self.path}: metadata {key!r} is missing")
        return value

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(reversed(self.tensors[name].shape))  # ggml lists the fastest dimension first

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
        got = dequantize_rows(t.read(), t.tensor_type)[0]
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
            return dequantize_rows(t.read(), t.tensor_type)[0]
        return GGUFMatrix(self, name)

    def whole(self, name: str) -> torch.Tensor:
        """A whole matrix in hold_dtype, kept until another is asked for (w2's column pieces reuse it)."""
        if self._whole is None or self._whole[0] != name:
            self._whole = None
            m = GGUFMatrix(self, name)
            out = torch.empty(m.shape, dtype=self.hold_dtype)
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
