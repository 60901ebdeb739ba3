"""Resident decode's one-row matmuls, and bf16 attention of decode rows and prompt chunks, in native code (native.c: AVX-512 BF16, VNNI and
VBMI), built with the machine's C compiler at first use and kept in the user's cache; where there is no compiler,
no such CPU, or STREAMER_NATIVE=0, every caller takes torch's kernels instead (`gemv_*` return None / False).

Measured here (2 threads, 8 layers of the 8B's FFN-up [28672, 4096] out of cache, 4-8 rounds):
- bf16: 68-70 GB/s, against 56-61 for inductor's multiply-and-sum (kernels.compiled_gemv), 71-75 for oneDNN's
  prepacked weights (which need a repacked private copy of every matrix) and a plain read of 72-80 (k2.py);
- int8: 57-62 GB/s against torch._int_mm's 49-55, with the very same exact int32 sums (k5.py);
- int4: 60-62 GB/s of codes against torch's int4 kernel's 40-42, x quantized to int8 a group at a time (k13.py);
- decode attention (bf16): 11 / 75 / 467 us a layer at 16 / 320 / 2048 positions against the compiled
  kernel's 39 / 114 / 646 (k11.py), so a compiled bf16 run at batch 1 needs no inductor at all;
- prompt attention (bf16): 12.8 ms a layer at 512 tokens against torch's SDPA's 26.0 (k7_prefill_attn.py).
Building takes ~0.3 s. The library links the OpenMP runtime torch has already loaded, so the two share threads.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx512vbmi")  # as /proc/cpuinfo names them
CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mavx512vnni", "-mavx512vbmi", "-fopenmp", "-shared",
          "-fPIC")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
why_not: str | None = None  # why there is no native library, once that is known


def library() -> ctypes.CDLL | None:
    """The built library, building it on first call; None where it cannot be had (why_not says why)."""
    global _lib, why_not
    if _lib is None and why_not is None:
        with _lock:
            if _lib is None and why_not is None:
                try:
                    _lib = _load()
                except _Unavailable as e:
                    why_not = str(e)
    return _lib


def available() -> bool:
    return library() is not None


class _Unavailable(Exception):
    pass


def _load() -> ctypes.CDLL:
    if os.environ.get("STREAMER_NATIVE", "1") == "0":
        raise _Unavailable("STREAMER_NATIVE=0")
    if missing := [f for f in CPU_FLAGS if f not in _cpu_flags()]:
        raise _Unavailable(f"this CPU lacks {', '.join(missing)}")
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        raise _Unavailable("no C compiler (cc, gcc, clang or $CC)")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc,) + CFLAGS).encode()).hexdigest()[:16]
    path = _cache_dir() / f"native-{key}.so"
    try:  # an unwritable cache, a $CC that is not there, a library that will not load: torch's kernels instead
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise _Unavailable(f"cannot build or load {path}: {e}") from None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.gemv_bf16, lib.gemv_int8):  # n, w, ld, rows, yoff, x, xs, y, in, threads (native.c)
        fn.argtypes = [ctypes.c_int, p, p, p, p, p, i64, p, i64, ctypes.c_int]
        fn.restype = None
    lib.gemv_int4.argtypes = [ctypes.c_int, p, p, p, p, p, i64, p, i64, i64, ctypes.c_int]
    lib.gemv_int4.restype = None
    lib.attend_bf16.argtypes = [ctypes.c_int] * 4 + [p] * 3 + [i64] * 3 + [p, p, ctypes.c_float, ctypes.c_int]
    lib.attend_bf16.restype = None
    lib.attend_prefill_bf16.argtypes = ([ctypes.c_int, i64] + [ctypes.c_int] * 3 + [p] * 3 + [i64] * 2
                                        + [p, ctypes.c_float, p, ctypes.c_int])
    lib.attend_prefill_bf16.restype = None
    return lib


def _build(cc: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)  # built aside, renamed when whole
    os.close(fd)
    try:
        done = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode:
            raise _Unavailable(f"{cc} could not build {SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamer"


def table(ws: list[torch.Tensor], aux: list[torch.Tensor] | None = None) -> torch.Tensor | None:
    """What the native kernels read of matrices ws [rows_j, in] (one dtype, one input width, contiguous rows):
    their addresses, row strides, rows, where each one's outputs start (one after another) and the address of each
    one's aux tensor (int4's scales and zeros), int64 [5, n]. It holds addresses, not the tensors: they must
    outlive it. None where the kernels cannot take ws."""
    if not ws or any(w.dim() != 2 or w.stride(1) != 1 or w.dtype != ws[0].dtype or w.shape[1] != ws[0].shape[1]
                     for w in ws):
        return None
    rows = [w.shape[0] for w in ws]
    starts = [sum(rows[:j]) for j in range(len(ws))]
    return torch.tensor([[w.data_ptr() for w in ws], [w.stride(0) for w in ws], rows, starts,
                         [a.data_ptr() for a in aux] if aux else [0] * len(ws)], dtype=torch.int64)


def int4_table(pieces) -> torch.Tensor | None:
    """table() of int4 matrices (quant.Int4Weight: codes [rows, in / 2] in torch's layout, scales and zeros
    [in / group, rows, 2] in bf16, each contiguous, rows whole blocks of 64); None where gemv_int4 cannot take them."""
    if pieces[0].group % 4 or any(p.packed.shape[0] % 64 or not p.packed.is_contiguous() or p.group != pieces[0].group
                                  or p.sz.dtype != torch.bfloat16 or not p.sz.is_contiguous() for p in pieces):
        return None
    return table([p.packed for p in pieces], [p.sz for p in pieces])


def gemv_pieces(tab: torch.Tensor, x: torch.Tensor, out: torch.Tensor, group: int = 0) -> bool:
    """The one-row products of every matrix in tab (table(), or int4_table() with its group) in one call: x [in]
    (one for all) or [n, in] (one each), bf16 (for bf16 or int4 matrices) or int8, written to the contiguous out
    (bf16, or int32 exact sums) one matrix's rows after another's. False, with out untouched, where there is no
    native library. It reads and writes by address: the caller sees to shapes, dtypes and contiguity."""
    if (lib := library()) is None or (group and x.dtype != torch.bfloat16):
        return False
    assert x.is_contiguous() and out.is_contiguous()
    assert out.dtype == (torch.int32 if x.dtype == torch.int8 else x.dtype)
    n, at, inp = tab.shape[1], tab.data_ptr(), x.shape[-1]
    xs, threads = (inp if x.dim() == 2 else 0), torch.get_num_threads()
    if group:
        lib.gemv_int4(n, at, at + 32 * n, at + 16 * n, at + 24 * n, x.data_ptr(), xs, out.data_ptr(), inp, group,
                      threads)
    else:
        fn = lib.gemv_bf16 if x.dtype == torch.bfloat16 else lib.gemv_int8
        fn(n, at, at + 8 * n, at + 16 * n, at + 24 * n, x.data_ptr(), xs, out.data_ptr(), inp, threads)
    return True


def gemv_bf16(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """w [out, in] @ x [in] -> [out] bf16, products and sums in float32, rounded once; None where the native
    kernel cannot take them (not bf16, rows not contiguous, or no library)."""
    if (w.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or x.shape != (w.shape[-1],)
            or (tab := table([w])) is None):
        return None
    y = torch.empty(w.shape[0], dtype=torch.bfloat16)
    return y if gemv_pieces(tab, x.contiguous(), y) else None


def gemv_int8(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    """out [out] int32 = w [out, in] int8 @ x [in] int8, exactly as torch._int_mm sums them; False, with out
    untouched, where the native kernel cannot take them."""
    if (w.dtype != torch.int8 or x.dtype != torch.int8 or x.shape != (w.shape[-1],) or out.shape != w.shape[:1]
            or out.dtype != torch.int32 or not out.is_contiguous() or (tab := table([w])) is None):
        return False
    return gemv_pieces(tab, x.contiguous(), out)


def can_attend(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether attend_bf16 takes decode attention of this dtype and head size (given the library)."""
    return dtype == torch.bfloat16 and head_dim % 16 == 0 and head_dim <= 512 and available()


def _attendable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """What both attention kernels need: q [..., H, hd], k and v [..., KV, hd] in bf16, k and v views of one cache (the
    same strides) with contiguous heads, H a multiple of KV, and a head size and library can_attend takes."""
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and can_attend(q.dtype, q.shape[-1])
            and k.stride() == v.stride() and k.stride(-1) == 1 and q.shape[-2] % k.shape[-2] == 0)


def attend_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ends: torch.Tensor) -> torch.Tensor | None:
    """kernels._decode_attention's math on q [D, H, hd] and k, v [D, S, KV, hd] (views of one cache, the same
    strides), sequence d reading positions [0, ends[d]): float32 throughout, rounded to bf16 once -> [D, H * hd].
    None where the native kernel cannot take them."""
    D, H, hd = q.shape
    KV = k.shape[2]
    if not _attendable(q, k, v):
        return None
    q, ends = q.contiguous(), ends.to(torch.int64).contiguous()
    out = torch.empty(D, H * hd, dtype=q.dtype)
    library().attend_bf16(D, H, KV, hd, q.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
                          k.stride(2), ends.data_ptr(), out.data_ptr(), 1 / math.sqrt(hd), torch.get_num_threads())
    return out


def attend_prefill_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor | None:
    """Causal attention of one sequence's chunk, as model.attend computes it with torch's SDPA (float32 inside,
    rounded to bf16 once): q [T, H, hd] at positions start .. start + T - 1, k and v [start + T, KV, hd] (views of one
    cache row, the same strides) -> [T, H * hd]. None where the native kernel cannot take them."""
    T, H, hd = q.shape
    S, KV = k.shape[0], k.shape[1]
    if not _attendable(q, k, v) or H // KV > 8 or S != start + T:
        return None
    q, threads, Sp = q.contiguous(), torch.get_num_threads(), -(-S // 16) * 16
    work = torch.empty(KV * hd * Sp + KV * S * hd + threads * H // KV * Sp, dtype=torch.float32)  # 64-byte aligned
    out = torch.empty(T, H * hd, dtype=q.dtype)
    library().attend_prefill_bf16(T, start, H, KV, hd, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                  k.stride(0), k.stride(1), out.data_ptr(), 1 / math.sqrt(hd), work.data_ptr(), threads)
    return out


def gemv_int4(x: torch.Tensor, w) -> torch.Tensor | None:
    """x [in] bf16 @ W.T for int4 codes in torch's CPU layout (quant.Int4Weight: packed [rows, in / 2], sz
    [in / group, rows, 2]), x quantized to int8 a group at a time -> [rows] bf16 (native.c's gemv_int4 says how).
    None where the native kernel cannot take them: not bf16, rows not whole blocks of 64, or no library."""
    if x.dtype != torch.bfloat16 or x.shape != (2 * w.packed.shape[1],) or x.shape[0] % w.group:
        return None
    w = w._replace(sz=w.sz.to(torch.bfloat16).contiguous())  # kept while the kernel reads it by address
    if (tab := int4_table([w])) is None:
        return None
    y = torch.empty(w.packed.shape[0], dtype=torch.bfloat16)
    return y if gemv_pieces(tab, x.contiguous(), y, w.group) else None
