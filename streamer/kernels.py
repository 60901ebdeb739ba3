"""The one-row matmul of batch-1 decode, where reading the weights from RAM is the whole cost. Where the native
library runs (native.py) it takes them in every run, and inductor's kernels below are for machines without it.

Measured here (2 threads, 1 GiB of bf16 weights per shape, so not in cache; `python tools/bench.py MODEL --cases
gemv` on the 8B's shapes): torch.mv reads them at 10-11 GB/s, F.linear with one row at 14-18, and a
multiply-and-sum over the rows that inductor compiles into one vectorised loop at 21-31, against a plain memory
read of 34 GB/s in the same run (32-50 in others). The
kernels are compiled for symbolic shapes, once each: specialised per weight shape, they cost ~1 s more for
every shape of the model (2048 x 4096: 1.9 s, then 1536 x 4096: 1.9 s more, 512 x 4096: 1.0 s more), at the
same speed (25.8 GB/s static against 27.2 symbolic, one run). The first compile on a machine costs ~20 s
(inductor's on-disk cache makes it ~4 s after), so the runner compiles in the background while the weights
load (warm_up), and uses the kernels only when the Engine says they pay back: bf16 weights kept in RAM,
many of them, or many sequences, and a C++ compiler present. An FFN slice takes three of them (w1, w3, then
w2): one kernel fusing the slice read its weights at 33 GB/s where three separate ones read 48-49 (s1_swiglu.py),
and the all-resident 8B bf16 step took 0.571 s with it against 0.465 without (p8_ffn_ab.py, one process, five
rounds).

Many-row matmuls on int4 codes requantize them to int8 a tile at a time for an integer matmul
(quant.qlinear); a compiled loop does that in a third of the eager ops' time (int4_int8_tile: 1.4 against
4.2 ms per 4096 x 4096 of codes, in tiles of 512 rows, a6_tile.py), which takes int4 at 128-512 rows from
2.4-2.7x bf16's matmul time (torch's int4 kernel) to 0.7-1.0x. That kernel is compiled for each tile shape (a
model has a few).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import shutil
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import native

_COMPILED = contextvars.ContextVar("streamer_compiled_kernels", default=None)
_compiled: dict = {}


def _mul_sum(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (w.float() * x.float()).sum(-1).to(x.dtype)  # products and sums in float32, as linear accumulates


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """model.attend_decode's math: q [D, H, hd]; k, v [D, S, KV, hd]; sequence d reads positions [0, ends[d]).
    Products, sums, scores and probabilities in float32, rounded to q's dtype once, at the end."""
    D, S, KV, hd = k.shape
    H = q.shape[1]
    qh = q.view(D, 1, KV, H // KV, hd)
    scores = (k[:, :, :, None, :].float() * qh.float()).sum(-1) / math.sqrt(hd)  # [D, S, KV, H/KV]
    scores = scores.masked_fill((torch.arange(S) >= ends[:, None])[:, :, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=1)
    return (probs[..., None].float() * v[:, :, :, None, :].float()).sum(1).to(q.dtype).reshape(D, H * hd)


def _int4_int8_tile(packed: torch.Tensor, sp: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """quant.int4_as_int8_t of whole blocks of 64 rows, with the same numbers: packed [rows, in / 2] uint8 in torch's
    int4 layout (quant.int4_codes_t), sp and zp [in / g, rows] float32 (quant.int4_int8_scales) -> W.T's int8 codes
    [in, rows], round(q * sp + zp). Written over [in, rows / 64, 2, 32], whose last 32 are contiguous in the codes
    and in W.T alike, so inductor makes it one vectorised loop (over a flat [in, rows] it made a scalar one). The
    nibbles come by a broadcast shift: a cat of the two halves was materialised and copied first (1.50 against
    1.35-1.41 ms per 4096 x 4096 of codes, a7_nocat.py)."""
    rows, inp = packed.shape[0], 2 * packed.shape[1]
    shape = (sp.shape[0], 1, rows // 64, 2, 32)
    b = packed.view(rows // 64, 1, inp, 32)
    shift = torch.tensor([0, 4], dtype=torch.uint8).view(1, 2, 1, 1)
    codes = ((b >> shift) & 15).permute(2, 0, 1, 3).reshape(shape[0], -1, *shape[2:])
    q = torch.round(codes.float() * sp.view(shape) + zp.view(shape)).to(torch.int8)
    return q.contiguous().view(inp, rows)


def _get(fn, dynamic: bool = True):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=dynamic)
    return _compiled[fn]


def compiled_gemv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [out, in] @ x [in] -> [out] in x's dtype, through inductor's fused multiply-and-sum."""
    return _get(_mul_sum)(w, x)


def warm_up(dim: int, dtype: torch.dtype, heads: tuple[int, int, int] | None = None,
            int4_tiles: Iterable[tuple[int, int, int, int]] = (), batch: int = 0) -> None:
    """Compile the kernels on small stand-ins with the model's input width and (n_heads, n_kv_heads, head_dim)
    (the weights' row count, the sequences and positions are symbolic, so any will do; one sequence is compiled
    on its own, as torch specialises sizes of 1; many sequences only where `batch`, the most a pass decodes, is
    not 1: that took ~1 s with inductor's cache warm, for a kernel a batch of one never calls), and the int4 tile
    kernel for each (rows, in, group, out) of int4_tiles, the tiles of the model's int4 matrices
    (quant.int4_tile_shapes).
    The stand-ins are as the real inputs are in all that dynamo guards on, or the first real call compiles again,
    in the middle of a pass: distinct tensors where the real ones are (it guards on aliasing), and symbolic sizes
    that equal no model dimension (equal sizes share one symbol). The int4 tiles are compiled here whatever the
    context (this runs in a thread of its own, outside use_compiled): they once were not, and the 8B int4 at
    batch 128 under memcap 4G compiled them in its first passes, steps of 5.43, 5.37 and 4.44 s against
    4.14-4.23 s once warmed up (one run each, w4_int4b128.sh)."""
    for rows, inp, g, out in int4_tiles:
        sp, zp = (torch.zeros(inp // g, out)[:, :rows] for _ in range(2))  # a tile's columns
        int4_int8_tile(torch.zeros(rows, inp // 2, dtype=torch.uint8), sp, zp, torch.empty(inp, rows, dtype=torch.int8))
    x, w = torch.zeros(dim, dtype=dtype), torch.zeros(16, dim, dtype=dtype)
    if native.gemv_bf16(w, x) is None:  # builds the native library, or else compiles inductor's
        compiled_gemv(w, x)
    if heads and not native.can_attend(dtype, heads[2]):  # else decode attention is native too
        H, KV, hd = heads
        many = _apart(2, {H, KV, hd})
        S = _apart(many + 1, {H, KV, hd})  # positions read, of a longer cache row
        for d in (1,) if batch == 1 else (1, many):  # views of a longer cache, as the cache in RAM hands them out
            kv = torch.zeros(2, d, _apart(S + 1, {H, KV, hd}), KV, hd, dtype=dtype)[:, :, :S]
            _get(_decode_attention)(torch.zeros(d, H, hd, dtype=dtype), kv[0], kv[1], torch.full((d,), S))


def _apart(n: int, taken: set[int]) -> int:
    """The least size from n that is none of `taken`."""
    while n in taken:
        n += 1
    return n


def inductor_needed(dtype: torch.dtype, head_dim: int, int4: bool) -> bool:
    """Whether warm_up compiles anything with inductor for this run: int4 tiles (an int4 split), or a one-row
    matmul or decode attention the native library does not take. A bf16 run on the native library compiles
    nothing, so its plan keeps no memory for compiled kernels."""
    return int4 or not native.can_attend(dtype, head_dim)  # can_attend: bf16, this head size, the library loads


def can_compile() -> bool:
    """Whether inductor can build kernels here (it needs a C++ compiler)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


@contextlib.contextmanager
def use_compiled(compiled: bool):
    """Within it, one-row matmuls and decode attention the native library does not take, and int4 tiles, run the
    compiled kernels when `compiled`, else their eager forms."""
    token = _COMPILED.set(True if compiled else None)
    try:
        yield
    finally:
        _COMPILED.reset(token)


def linear_one_row(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, in] @ weight.T -> [1, out]: natively where native.gemv_bf16 takes it (in any run), else compiled within
    use_compiled(True), else F.linear."""
    if weight.dtype == x.dtype and (y := native.gemv_bf16(weight, x[0])) is not None:
        return y[None]
    if _COMPILED.get() is None or weight.dtype != x.dtype:
        return F.linear(x, weight.to(x.dtype))
    return compiled_gemv(weight, x[0])[None]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ends: torch.Tensor) -> torch.Tensor | None:
    """model.attend_decode natively where native.attend_bf16 takes it (in any run: every number of sequences takes
    it alike), else compiled within use_compiled(True), else None."""
    if (out := native.attend_bf16(q, k, v, ends)) is not None:
        return out
    if _COMPILED.get() is None:
        return None
    return _get(_decode_attention)(q, k, v, ends)


PREFILL_NATIVE_POSITIONS = 2048  # the native prompt attention reads each kv head's keys and values once per row, and
# past this torch's tiled SDPA caught up: a layer of the 8B took 12.8 ms against SDPA's 26.0 at 512 tokens, 183
# against 214 at 2048, 211 against 208 for 512 after 3584 cached positions, 828 against 780 at 4096 (k7, k8)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor | None:
    """model.attend's causal attention of one sequence's chunk, natively where native.attend_prefill_bf16 takes it
    (in any run, as decode attention: bf16) and it reads up to PREFILL_NATIVE_POSITIONS positions, else None."""
    if k.shape[0] > PREFILL_NATIVE_POSITIONS:
        return None
    return native.attend_prefill_bf16(q, k, v, start)


def int4_compiled() -> bool:
    """Whether int4 tiles take the compiled kernel (int4_int8_tile): within use_compiled(True)."""
    return _COMPILED.get() is not None


def _int4_int8_tile_into(packed: torch.Tensor, sp: torch.Tensor, zp: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_int4_int8_tile(packed, sp, zp))


def int4_int8_tile(packed: torch.Tensor, sp: torch.Tensor, zp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """_int4_int8_tile written into out ([in, rows] int8, contiguous; returned), compiled for these very shapes
    and strides (compiled for symbolic ones, the bf16 tile kernel before it was a scalar loop, 10x slower). Into a
    buffer the caller reuses, not a tensor of its own: a bf16 tile allocated per call is what glibc may give back
    and fault in again, and x[128] @ W.T on 4096 x 4096 codes took 7.91-8.42 ms that way against 7.33-7.84 with
    the buffer reused (four pairs of processes, m2_into.py, the bf16 tiles)."""
    _get(_int4_int8_tile_into, dynamic=False)(packed, sp, zp, out)
    return out


class NativeRows(NamedTuple):
    """A resident file's row pieces W = [W0; W1; ...] (wqkv, wo, the head's output), bf16 tensors or int4 codes
    (quant.Int4Weight), with what one native call needs to take them all at one row (native.table)."""
    pieces: list
    table: torch.Tensor
    rows: int
    group: int = 0  # int4's group; 0: bf16

    def at_once(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [1, in] @ W.T in one native call, each row as one piece's own call gives it; None where x takes the
        pieces one at a time: more rows, or no native kernels."""
        if x.shape[0] != 1:
            return None
        y = torch.empty(1, self.rows, dtype=x.dtype)
        return y if native.gemv_pieces(self.table, x[0].contiguous(), y, self.group) else None


class NativeFFN(NamedTuple):
    """A resident file's FFN slices (w1 [c, dim], w3 [c, dim], w2 [dim, c] each; bf16 or int4 as NativeRows), with
    what two native calls need to take them all at one row: every w1 then every w3 (up), and every w2 with an
    input and an output row each (down)."""
    slices: list[tuple]
    up: torch.Tensor
    down: torch.Tensor
    hidden: int  # every slice's rows
    group: int = 0

    def at_once(self, x: torch.Tensor) -> torch.Tensor | None:
        """model.feed_forward of x [1, dim] with the same numbers, every slice's products in two native calls; None
        where x takes the slices one at a time, as NativeRows.at_once."""
        if x.shape[0] != 1:
            return None
        n, dim = len(self.slices), x.shape[1]
        a = torch.empty(2 * self.hidden, dtype=x.dtype)  # every w1's rows, then every w3's
        if not native.gemv_pieces(self.up, x[0].contiguous(), a, self.group):
            return None
        h = (F.silu(a[:self.hidden]) * a[self.hidden:]).view(n, -1)
        parts = torch.empty(n, dim, dtype=x.dtype)
        native.gemv_pieces(self.down, h, parts, self.group)
        y = torch.zeros(1, dim, dtype=torch.float32)
        for part in parts:  # added up in slice order, as the slices' partial products are
            y += part
        return y.to(x.dtype)


def native_rows(pieces: list) -> NativeRows | None:
    """Row pieces (bf16 tensors, or int4 codes: quant.Int4Weight) as NativeRows, or None where the native kernels
    cannot take them."""
    if (tab := _table(pieces)) is None:
        return None
    return NativeRows(pieces, tab, int(tab[2].sum()), _group(pieces))


def native_ffn(slices: list[tuple]) -> NativeFFN | None:
    """FFN slices as NativeFFN, or None where the native kernels cannot take them."""
    up, down = [t[0] for t in slices] + [t[1] for t in slices], [t[2] for t in slices]
    if (tu := _table(up)) is None or (td := _table(down)) is None:  # w2s [dim, c]: an output row each
        return None
    return NativeFFN(slices, tu, td, int(tu[2].sum()) // 2, _group(up))


def _group(pieces: list) -> int:
    return 0 if isinstance(pieces[0], torch.Tensor) else pieces[0].group


def _table(pieces: list) -> torch.Tensor | None:
    if isinstance(pieces[0], torch.Tensor):
        return native.table(pieces) if all(w.dtype == torch.bfloat16 for w in pieces) else None
    return native.int4_table(pieces)
