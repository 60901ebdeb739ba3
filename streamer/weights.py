"""Weight files: safetensors headers (read and checked) and streamed, aligned, atomic writing.

Layer files are plain safetensors. Their headers are parsed here without the safetensors library, so
that every entry is checked against the file size before a byte of data is read; the bytes themselves
are read by the weight stream (stream.py) with preads into its ring.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Callable

import torch

from .errors import StreamerError
from .files import CHUNK, drop_cache

DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20


def read_header(path: Path, file_size: int | None = None) -> tuple[dict, int]:
    """Parse and check a safetensors header; returns ({name: (dtype, shape, begin, end)}, data_start)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size if file_size is None else file_size
            raw = f.read(8)
            if len(raw) < 8:
                raise StreamerError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise StreamerError(f"{path}: truncated or corrupt (header claims {n} bytes, file has {size})")
            meta = json.loads(f.read(n))
    except OSError as e:
        raise StreamerError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StreamerError(f"{path}: corrupt safetensors header") from None
    data_start = 8 + n
    tensors = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise StreamerError(f"{path}: tensor {name!r} has a malformed or unsupported header entry") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise StreamerError(f"{path}: tensor {name!r} offsets do not match its shape {list(shape)}")
        if data_start + end > size:
            raise StreamerError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, file has {size}")
        tensors[name] = (dtype, shape, begin, end)
    return tensors, data_start


TENSOR_ALIGN = 64  # every tensor starts on a 64-byte boundary: CPU kernels (int8 matmul) need 16
PAD = "__pad."  # byte tensors that fill the gaps, since safetensors allows no holes; readers skip them


def layout(tensors: dict[str, tuple[torch.dtype, tuple]], align: int = TENSOR_ALIGN) -> list[tuple[str, torch.dtype, tuple, int, int]]:
    """(name, dtype, shape, begin, end) in file order, with padding entries wherever alignment needs them."""
    out, offset = [], 0
    for name, (dtype, shape) in tensors.items():
        if offset % align:
            gap = -offset % align
            out.append((f"{PAD}{len(out)}", torch.uint8, (gap,), offset, offset + gap))
            offset += gap
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        out.append((name, dtype, tuple(shape), offset, offset + nbytes))
        offset += nbytes
    return out


def header_bytes(tensors: dict[str, tuple[torch.dtype, tuple]], align: int = TENSOR_ALIGN) -> bytes:
    """The safetensors header; the data that follows starts on a TENSOR_ALIGN boundary."""
    meta = {n: {"dtype": DTYPE_NAMES[dt], "shape": list(s), "data_offsets": [b, e]} for n, dt, s, b, e in layout(tensors, align)}
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % TENSOR_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def file_size_for(tensors: dict[str, tuple[torch.dtype, tuple]]) -> int:
    return len(header_bytes(tensors)) + layout(tensors)[-1][4]


def write_safetensors(path: Path, tensors: dict[str, tuple[torch.dtype, tuple, Callable[[], torch.Tensor]]],
                      align: int = TENSOR_ALIGN) -> tuple[int, str]:
    """Stream tensors into `path` atomically, producing each one only when it is written, so memory holds
    one tensor at a time (or one piece of it, for a producer that returns an object with row_chunks()). Returns (size, sha256). align=1 writes no padding (files for other tools)."""
    spec = {name: (dtype, shape) for name, (dtype, shape, _) in tensors.items()}
    header = header_bytes(spec, align)
    digest = hashlib.sha256(header)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for name, dtype, shape, begin, end in layout(spec, align):
                if name.startswith(PAD):
                    digest.update(bytes(end - begin))
                    f.write(bytes(end - begin))
                    continue
                t = tensors[name][2]()
                if tuple(t.shape) != tuple(shape):
                    raise StreamerError(f"{path}: tensor {name!r} came out {list(t.shape)}, expected {list(shape)}")
                for part in t.row_chunks() if hasattr(t, "row_chunks") else [t]:  # a source too big to hold at once
                    flat = part.to(dtype).contiguous().reshape(-1).view(torch.uint8)
                    for i in range(0, flat.numel(), CHUNK):
                        chunk = flat[i:i + CHUNK].numpy()
                        digest.update(chunk)
                        f.write(chunk)
                    del part, flat
                del t
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
            drop_cache(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()
