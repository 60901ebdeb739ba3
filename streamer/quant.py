"""Weight-only quantization, done once at split time and computed on directly with torch's CPU kernels.

int8: symmetric, one scale per output row:  w ~ q * scale,           q in [-127, 127]
int4: asymmetric, per group of `group` inputs: w ~ (q - 8) * s + z,  q in [0, 15],
      packed by torch._convert_weight_to_int4pack_for_cpu (the layout its matmul kernel reads).
A quantized matrix is stored as NAME (the codes) followed by NAME.scale (int8) or NAME.sz (int4:
scales and zeros, [in / group, out, 2]); nothing is ever dequantized to a full matrix (int4 at many rows
converts a tile of at most DEQUANT_TILE codes at a time to the compute dtype for F.linear's GEMM).

int8 multiplies int8 by int8 (int8_matmul) at one row and from INT8_GEMM_ROWS rows: each row of x is
quantized on the fly, symmetric with its own scale (llama.cpp's Q8_0 does the same per block of 32), and torch's
integer matmul sums exact int32 products, at about twice bf16's rate (AVX512-VNNI). A row's result does not
depend on the other rows, since the sums are exact.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import kernels

SCHEMES = ("int8", "int4")
GROUP = 64


class Int8Weight(NamedTuple):
    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] float32


class Int4Weight(NamedTuple):
    packed: torch.Tensor  # [out, in / 2] uint8, kernel layout
    sz: torch.Tensor  # [in / group, out, 2] float32: scale, zero

    @property
    def group(self) -> int:
        return 2 * self.packed.shape[1] // self.sz.shape[0]


def int4_group(shape: tuple[int, int], group: int = GROUP) -> int | None:
    """The group size for an [out, in] matrix, or None when torch's int4 kernel cannot take it (it needs
    out divisible by 16 and in by the group): such a matrix is stored int8 instead."""
    out, inp = shape
    if out % 16:
        return None
    return next((g for g in (group, 128, 64, 32) if inp % g == 0), None)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return Int8Weight(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale)


def quantize_int4(w: torch.Tensor, group: int) -> Int4Weight:
    out, inp = w.shape
    wg = w.float().reshape(out, inp // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(out, inp)
    zero = lo + 8 * scale
    return Int4Weight(torch._convert_weight_to_int4pack_for_cpu(q, 1),
                      torch.stack([scale, zero], -1).transpose(0, 1).contiguous())


INT8_GEMM_ROWS = 6  # int8 at 2 .. this - 1 rows takes torch's int8-by-float kernel; at 1 and from here, int8_matmul
INT4_DEQUANT_ROWS = 256  # from this many rows, int4 codes are converted to x's dtype a tile at a time for F.linear
INT4_COMPILED_ROWS = 64  # the same from this many where the tiles take the compiled kernel (kernels.int4_compiled)


def int4_codes_t(packed: torch.Tensor, out: int, inp: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """The codes (0..15) transposed, [inp, out], into `into` (any dtype) if given, else uint8. torch 2.x packs
    rows in blocks of 64, each input k's 32 bytes holding row i (low nibble) and row i + 32 (high); then the last
    out % 64 rows, each k's bytes holding rows 2j (low) and 2j + 1 (high). So W.T comes out in runs of 32 (or 2)
    rows with no bytes transposed: 0.42 against 0.76 ns a code for W in a scratch run (2 threads, 4096 x 4096,
    bf16, scales applied). `int4_layout_known` checks the layout."""
    y = torch.empty(inp, out, dtype=torch.uint8) if into is None else into
    flat, full = packed.reshape(-1), out // 64 * 64
    if full:
        b = flat[:full * inp // 2].view(full // 64, inp, 32).permute(1, 0, 2)
        v = y[:, :full].unflatten(1, (full // 64, 2, 32))
        v[:, :, 0].copy_(b & 0xF)
        v[:, :, 1].copy_(b >> 4)
    if out > full:
        b = flat[full * inp // 2:].view(inp, (out - full) // 2)
        v = y[:, full:].unflatten(1, ((out - full) // 2, 2))
        v[..., 0].copy_(b & 0xF)
        v[..., 1].copy_(b >> 4)
    return y


@functools.cache
def int4_layout_known() -> bool:
    """Whether this torch packs int4 codes as int4_codes_t reads them (checked once, on a small matrix with a
    block of 64 rows and a tail); if not, int4 stays on torch's kernel at every row count."""
    q = torch.randint(0, 16, (80, 128), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    return torch.equal(int4_codes_t(torch._convert_weight_to_int4pack_for_cpu(q, 1), 80, 128).T.to(torch.int32), q)


def dequantize_int4_t(w: Int4Weight, dtype: torch.dtype, into: torch.Tensor | None = None) -> torch.Tensor:
    """W.T, [in, out], in dtype: (q - 8) * scale + zero, as q * scale + (zero - 8 * scale); into `into` if given."""
    rows, inp, g = w.sz.shape[1], 2 * w.packed.shape[1], w.group
    y = int4_codes_t(w.packed, rows, inp, torch.empty(inp, rows, dtype=dtype) if into is None else into)
    scale = w.sz[..., 0].contiguous()  # [in / group, out]; contiguous, or the products below take a slow strided path
    zero = (w.sz[..., 1] - 8 * scale).to(dtype)
    v = y.view(inp // g, g, rows)
    return torch.addcmul(zero[:, None], v, scale.to(dtype)[:, None], out=v).view(inp, rows)  # one pass, not two


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as int8 codes and a float32 scale per row [M, 1]: x ~ codes * scale, codes in [-127, 127]."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / 127).clamp(min=1e-30)
    return torch.div(x, scale).round_().to(torch.int8), scale


_last_rows = None  # (x, x._version, codes, scales) of the latest quantize_rows through _rows_of


def _rows_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows(x), reusing the latest result when x is the same unchanged tensor: wqkv's pieces, and w1 and
    w3 of every FFN slice, multiply the same x (28 of a block's 42 int8 matmuls on the 8B split)."""
    global _last_rows
    last = _last_rows  # one read: another thread may replace it meanwhile
    if last is not None and last[0] is x and last[1] == x._version:
        return last[2], last[3]
    xq, sx = quantize_rows(x)
    _last_rows = (x, x._version, xq, sx)
    return xq, sx


def int8_matmul(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x @ W.T with x quantized per row (quantize_rows): exact int32 sums of int8 products, then
    (sum * weight scale) * row scale in float32, rounded to x's dtype once (weight_scale, _scaled).
    One row takes torch._int_mm(x, W.T); more take it as (W @ x.T).T, 1.1-3.4x faster there, and the product is
    exact either way."""
    xq, sx = _rows_of(x)
    sw = weight_scale(w, x.dtype)
    if x.shape[0] == 1:
        return _scaled(torch._int_mm(xq, w.q.t()), sw, sx, x.dtype)
    return _scaled(torch._int_mm(w.q, xq.t()), sw[:, None], sx.t(), x.dtype).t().contiguous()


class Int8Rows(NamedTuple):
    """An int8 matrix kept in RAM as row pieces W = [W0; W1; ...] (a resident file's wqkv, wo, output), with the
    pieces' scales joined once (weight_scale)."""
    pieces: list[Int8Weight]
    scale: torch.Tensor  # [out] float32


class Int8FFN(NamedTuple):
    """A resident file's int8 FFN slices: every slice's w1 [c, dim], then every slice's w3, as one Int8Rows
    [2 * hidden, dim]; each slice's w2 [dim, c], with their scales stacked [slices, dim]."""
    up: Int8Rows
    down: list[Int8Weight]
    s2: torch.Tensor

    @property
    def slices(self) -> list[tuple[Int8Weight, Int8Weight, Int8Weight]]:
        """(w1, w3, w2) of each slice, as a file view's "ffn" yields them."""
        n = len(self.down)
        return list(zip(self.up.pieces[:n], self.up.pieces[n:], self.down))


def weight_scale(w: Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    """w's scales as int8_matmul multiplies by them: rounded to the compute dtype, then float32, so a resident
    file (scales converted at load) gives the very same numbers as a streamed one."""
    return w.scale.to(dtype).float()


def _scaled(acc: torch.Tensor, sw: torch.Tensor, sx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact int32 sums scaled back: (sum * weight scale) * row scale in float32, rounded to dtype once, as the
    second product is written (no float32 result made, then converted)."""
    return torch.mul(torch.mul(acc, sw), sx, out=torch.empty(acc.shape, dtype=dtype))


def joined_rows(pieces: list[Int8Weight], dtype: torch.dtype) -> Int8Rows:
    return Int8Rows(pieces, torch.cat([weight_scale(w, dtype) for w in pieces]))


def joined_ffn(slices: list[tuple[Int8Weight, Int8Weight, Int8Weight]], dtype: torch.dtype) -> Int8FFN:
    return Int8FFN(joined_rows([t[0] for t in slices] + [t[1] for t in slices], dtype), [t[2] for t in slices],
                   torch.stack([weight_scale(t[2], dtype) for t in slices]))


def int8_rows_one_row(x: torch.Tensor, w: Int8Rows) -> torch.Tensor:
    """x [1, in] @ W.T: int8_matmul of each piece, their int32 sums side by side in one buffer, with one epilogue
    over all of them instead of one each (the same numbers: the epilogue is elementwise). With int8_ffn_one_row,
    an all-resident 8B int8 decode step took 0.368-0.403 s against 0.443-0.452 (`tools/bench.py MODEL --cap none
    --cases membw,resident`, 2 rounds)."""
    xq, sx = _rows_of(x)
    acc, a = torch.empty(1, w.scale.shape[0], dtype=torch.int32), 0
    for p in w.pieces:
        torch._int_mm(xq, p.q.t(), out=acc[:, a:a + p.q.shape[0]])
        a += p.q.shape[0]
    return _scaled(acc, w.scale, sx, x.dtype)


def int8_ffn_one_row(x: torch.Tensor, w: Int8FFN) -> torch.Tensor:
    """model.feed_forward of one row on resident int8 slices, with the same numbers: every slice's w1 and w3
    products in one int8_rows_one_row, every slice's h quantized (per slice, as its own matmul would) in one
    call, and w2's partial products with one epilogue, added up in slice order in float32. On the 8B's FFN (14
    slices of 1024) a block took 6.9-7.3 ms against 8.0-8.2 (`m4_ffn.py`), the bare integer matmuls ~7.0."""
    a = int8_rows_one_row(x, w.up)
    hidden = a.shape[1] // 2
    hq, sh = quantize_rows((torch.nn.functional.silu(a[:, :hidden]) * a[:, hidden:]).view(len(w.down), -1))
    acc = torch.empty(len(w.down), x.shape[1], dtype=torch.int32)
    for j, w2 in enumerate(w.down):
        torch._int_mm(hq[j:j + 1], w2.q.t(), out=acc[j:j + 1])
    y = torch.zeros(1, x.shape[1], dtype=torch.float32)
    for part in _scaled(acc, w.s2, sh, x.dtype):
        y += part
    return y.to(x.dtype)


def qlinear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ W.T on quantized codes, in x's dtype. On 4096 x 4096 codes and bf16 x, 2 threads (`tools/bench.py
    MODEL --cases qmatmul`):
    - int8: int8_matmul at 1 row and from INT8_GEMM_ROWS rows, torch's int8-by-float kernel between (at 2-5
      rows the integer matmul takes as long as at 16: ~45 ms on 8 x 14336 x 4096 codes against the kernel's
      23-30). The integer matmul took 0.23-0.37x bf16's time at 1 row, 0.61-0.88x at 16-32 rows, and from 64
      rows 0.58-0.71x in two of five runs, 0.86-1.01x in the other three (each process kept its own level).
    - int4: torch's kernel below INT4_DEQUANT_ROWS, or below INT4_COMPILED_ROWS in a compiled run (bf16 or
      fp16), else the codes converted a tile at a time into x's dtype for the GEMM (_tiled), by a compiled loop
      in a compiled run (kernels.int4_tile). In two runs (another machine than the int8 figures, faster),
      torch's int4 kernel took 3.25-3.33 / 6.4-6.6 / 12.8-12.9 / 25.7-25.9 / 51.3-52.0 ms at 32 / 64 / 128 /
      256 / 512 rows; compiled tiles 3.35-3.40 / 4.9-5.1 / 7.4-7.9 / 12.1-12.2 / 22.7-22.9; eager tiles at 256
      and 512 14.7-15.1 / 23.9-24.6; bf16 2.1 / 3.1-3.2 / 5.3-5.4 / 9.7-9.9 / 19.0-19.1. An earlier machine
      ran an all-resident 8B step at 128 rows in 8.7-13.7 s on eager tiles (five runs) against the kernel's
      11.8-12.1 (three), so eager tiles start at 256."""
    if isinstance(w, Int8Weight):
        # torch 2.13's int8 kernel crashes (SIGSEGV) on 2 or more rows when the input width is not a multiple of
        # 16 (stories260K's FFN, 172): those take the integer matmul too
        if x.shape[0] == 1 or x.shape[0] >= INT8_GEMM_ROWS or w.q.shape[1] % 16:
            return int8_matmul(x, w)
        return torch._weight_int8pack_mm(x, w.q, w.scale.to(x.dtype))
    compiled = kernels.int4_compiled(x.dtype)
    if x.shape[0] >= (INT4_COMPILED_ROWS if compiled else INT4_DEQUANT_ROWS) and int4_layout_known():
        return _tiled(x, w.sz.shape[1], 64, _int4_rows_t(w, x.dtype, compiled))
    return torch._weight_int4pack_mm_for_cpu(x, w.packed, w.group, w.sz.to(x.dtype))


def _int4_rows_t(w: Int4Weight, dtype: torch.dtype, compiled: bool):
    """convert(j, k, buf) for _tiled: rows j..k-1 of W, transposed, in dtype. With `compiled`, whole blocks of 64
    rows go through the compiled kernel (kernels.int4_tile: dequantize_int4_t's numbers), given W's scales and
    zero - 8 * scale in dtype, converted once for all its tiles (per tile, those small ops took 0.7 ms of a
    4096 x 4096 matrix's ~8.5 at 128 rows); else dequantize_int4_t into buf."""
    if compiled:
        scale = w.sz[..., 0].to(dtype).contiguous()  # a resident file's are in dtype already: to() keeps their strides
        zero = torch.add(w.sz[..., 1], w.sz[..., 0], alpha=-8, out=torch.empty(w.sz.shape[:2], dtype=dtype))

    def convert(j: int, k: int, buf: torch.Tensor) -> torch.Tensor:
        if compiled and (k - j) % 64 == 0:
            return kernels.int4_tile(w.packed[j:k], scale[:, j:k], zero[:, j:k], buf)
        return dequantize_int4_t(Int4Weight(w.packed[j:k], w.sz[:, j:k]), dtype, buf)
    return convert


DEQUANT_TILE = 1 << 21  # codes converted at a time: a 4 MiB bf16 tile, reused, that the GEMM reads from cache


def tile_rows(out: int, inp: int, align: int) -> int:
    """The rows of W [out, in] that _tiled converts at a time."""
    return min(out, max(align, DEQUANT_TILE // inp // align * align))


def int4_tile_shapes(out: int, inp: int, group: int) -> set[tuple[int, int, int, int]]:
    """The (rows, in, group, out) of the tiles of whole 64-row blocks that qlinear converts an int4 W [out, in]
    in (out too: the compiled kernel is specialised to its inputs' strides, which W's row count sets)."""
    rows = tile_rows(out, inp, 64)
    return {(r, inp, group, out) for r in (rows, out % rows) if r and r % 64 == 0}


def _tiled(x: torch.Tensor, out: int, align: int, convert) -> torch.Tensor:
    """x @ W.T for W [out, in] given a tile of rows at a time: convert(j, k, buf) gives rows j..k-1 of W,
    transposed and in x's dtype, [in, k - j], written into buf or a tensor of its own. Converting a whole 16 MiB
    piece into a fresh tensor, then multiplying, took 21.3 ms at 128 rows on 4096 x 4096 int8 codes, against 10.9
    ms for the GEMM alone: the new tensor's pages fault in, and the GEMM reads it back from RAM. In tiles of 512
    rows it took 11.8 ms (2 threads; tiles of 128-1024 rows 11.6-12.9 ms, the GEMM alone 10.8-11.1 in the same
    runs)."""
    inp = x.shape[1]
    rows = tile_rows(out, inp, align)
    buf = torch.empty(inp * rows, dtype=x.dtype)
    y = torch.empty(x.shape[0], out, dtype=x.dtype)
    for j in range(0, out, rows):
        k = min(out, j + rows)
        torch.mm(x, convert(j, k, buf[:inp * (k - j)].view(inp, k - j)), out=y[:, j:k])
    return y


def stored(name: str, shape: tuple[int, int], scheme: str):
    """The tensors a quantized matrix is stored as: [(name, dtype, shape, pick)], pick(Int?Weight) -> tensor."""
    out, inp = shape
    g = int4_group(shape) if scheme == "int4" else None
    if g is None:
        return [(name, torch.int8, (out, inp), lambda qw: qw.q), (name + ".scale", torch.float32, (out,), lambda qw: qw.scale)]
    return [(name, torch.uint8, (out, inp // 2), lambda qw: qw.packed),
            (name + ".sz", torch.float32, (inp // g, out, 2), lambda qw: qw.sz)]


def quantize(w: torch.Tensor, scheme: str):
    g = int4_group(tuple(w.shape)) if scheme == "int4" else None
    return quantize_int8(w) if g is None else quantize_int4(w, g)
