"""The one-row matmul of batch-1 decode, where reading the weights from RAM is the whole cost.

Measured here (2 threads, 1 GiB of bf16 weights per shape, so not in cache; `python tools/bench.py MODEL --cases
gemv` on the 8B's shapes): torch.mv reads them at 10-11 GB/s, F.linear with one row at 14-18, and a
multiply-and-sum over the rows that inductor compiles into one vectorised loop at 21-31, against a plain memory
read of 34 GB/s in the same run (32-50 in others). The
kernels are compiled for symbolic shapes, once each: specialised per weight shape, they cost ~1 s more for
every shape of the model (2048 x 4096: 1.9 s, then 1536 x 4096: 1.9 s more, 512 x 4096: 1.0 s more), at the
same speed (25.8 GB/s static against 27.2 symbolic, one run). The first compile on a machine costs ~20 s
(inductor's on-disk cache makes it ~4 s after), so the runner compiles in the background while the weights
load (warm_up), and uses the kernels only when the Engine says they pay back: bf16 weights kept in RAM,
many of them, and a C++ compiler present.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import shutil

import torch
import torch.nn.functional as F

_ONE_ROW = contextvars.ContextVar("streamer_one_row_kernel", default=None)
_compiled: dict = {}


def _mul_sum(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (w.float() * x.float()).sum(-1).to(x.dtype)  # products and sums in float32, as linear accumulates


def _swiglu(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One FFN hidden slice for one row, rounded where the eager block math rounds: w2 (silu(w1 x) * w3 x)."""
    h = F.silu(_mul_sum(w1, x)) * _mul_sum(w3, x)
    return (w2.float() * h.float()).sum(-1).to(x.dtype)


def _get(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def compiled_gemv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [out, in] @ x [in] -> [out] in x's dtype, through inductor's fused multiply-and-sum."""
    return _get(_mul_sum)(w, x)


def compiled_swiglu(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An FFN slice in one call (one call's overhead instead of three): [dim] in x's dtype."""
    return _get(_swiglu)(w1, w3, w2, x)


def warm_up(dim: int, dtype: torch.dtype) -> None:
    """Compile both kernels on small stand-ins with the model's input width (the weights' row count and
    the FFN slice width are symbolic, so any will do)."""
    x, w = torch.zeros(dim, dtype=dtype), torch.zeros(16, dim, dtype=dtype)
    compiled_gemv(w, x)
    compiled_swiglu(w, w, torch.zeros(dim, 16, dtype=dtype), x)


def can_compile() -> bool:
    """Whether inductor can build kernels here (it needs a C++ compiler)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


@contextlib.contextmanager
def one_row(compiled: bool):
    """Within it, one-row matmuls (and FFN slices) run the compiled kernels when `compiled`, else F.linear."""
    token = _ONE_ROW.set(True if compiled else None)
    try:
        yield
    finally:
        _ONE_ROW.reset(token)


def linear_one_row(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, in] @ weight.T -> [1, out]."""
    if _ONE_ROW.get() is None or weight.dtype != x.dtype:
        return F.linear(x, weight.to(x.dtype))
    return compiled_gemv(weight, x[0])[None]


def swiglu_one_row(x: torch.Tensor, w1, w3, w2) -> torch.Tensor | None:
    """The compiled FFN slice for x [1, dim], or None where it does not apply (eager, quantized, other dtype)."""
    if _ONE_ROW.get() is None or not all(isinstance(w, torch.Tensor) and w.dtype == x.dtype for w in (w1, w3, w2)):
        return None
    return compiled_swiglu(w1, w3, w2, x[0])[None]
