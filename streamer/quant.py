"""Quantized weights, made once at split time and computed on directly with torch's CPU kernels.

int8: symmetric, one scale per output row:  w ~ q * scale,           q in [-127, 127]
int4: asymmetric, per group of `group` inputs: w ~ (q - 8) * s + z,  q in [0, 15],
      packed by torch._convert_weight_to_int4pack_for_cpu (the layout its matmul kernel reads).
A quantized matrix is stored as NAME (the codes) followed by NAME.scale (int8) or NAME.sz (int4:
scales and zeros, [in / group, out, 2]); nothing is ever dequantized to a full matrix.

int8 multiplies int8 by int8 (int8_matmul) at one row and from INT8_GEMM_ROWS rows: each row of x is
quantized on the fly, symmetric with its own scale (llama.cpp's Q8_0 does the same per block of 32), and torch's
integer matmul sums exact int32 products, at about twice bf16's rate (AVX512-VNNI). A row's result does not
depend on the other rows, since the sums are exact.

int4 takes torch's int4 kernel at few rows, on whole matrices where a resident file has joined its pieces
(Int4Rows, Int4FFN). At many, where that kernel costs 2.4-2.7x bf16's GEMM, its codes
are requantized to int8 a tile of at most DEQUANT_TILE codes at a time, with one scale per output row, and
multiplied as int8 ones are: a second rounding, of at most half a step of 1/127 of the row's largest weight,
on top of int4's own of half a step of 1/15 of its group's range. On stories260K (real weights), one pass of
300 tokens moved from float by a KL of 0.0350 against 0.0345 with bf16 tiles (float32; bf16: 0.0358 against
0.0353), its top-1 agreement with float 0.917 either way (0.920 against 0.914 in bf16; q1_quality.py).
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import NamedTuple

import torch

from . import kernels, native

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
INT4_DEQUANT_ROWS = 128  # from this many rows, int4 codes are requantized to int8 a tile at a time (qlinear)
INT4_COMPILED_ROWS = 48  # the same from this many where the tiles take the compiled kernel (kernels.int4_compiled)


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


def int4_int8_scales(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For int4 codes with a (scale s, zero z) per group, sz [in / g, rows, 2] (a weight is q * s + z - 8 s, q in
    0..15): each group's scale and code-0 value in units of its row's int8 step ([in / g, rows] each), so that
    round(q * sp + zp) is the weight's int8 code, and that step ([rows]): the row's largest |weight| over 127 (the
    values at codes 0 and 15 are each group's least and greatest). All in float32."""
    s = sz[..., 0].float()
    z = sz[..., 1].float() - 8 * s
    bound = torch.maximum(z.abs(), (z + 15 * s).abs()).amax(0).clamp(min=1e-30)
    inv = 127 / bound  # |q * sp + zp| is at most 127 and a rounding error, so the codes round into [-127, 127]
    return s * inv, z * inv, bound / 127


def int4_as_int8_t(packed: torch.Tensor, sp: torch.Tensor, zp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """W.T's int8 codes [in, rows], round(q * sp + zp) (int4_int8_scales), into out (returned). packed [rows, in / 2]
    holds W's int4 codes; kernels.int4_int8_tile gives the same numbers for whole blocks of 64 rows. Its float32
    scratch is allocated per call: reusing one across a matrix's tiles changed nothing measurable (a 512-token
    resident 8B int4 prefill, eager: 10.9-14.9 s either way, two rounds each, r1_work.log)."""
    rows, inp = packed.shape[0], 2 * packed.shape[1]
    v = int4_codes_t(packed, rows, inp, torch.empty(inp, rows)).view(sp.shape[0], -1, rows)
    return out.copy_(v.mul_(sp[:, None]).add_(zp[:, None]).round_().view(inp, rows))


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
    One row takes int8_one_row; more take it as (W @ x.T).T, 1.1-3.4x faster there, and the product is
    exact either way."""
    xq, sx = _rows_of(x)
    sw = weight_scale(w, x.dtype)
    if x.shape[0] == 1:
        return _scaled(int8_one_row(xq, w.q, torch.empty(1, w.q.shape[0], dtype=torch.int32)), sw, sx, x.dtype)
    return _scaled(torch._int_mm(w.q, xq.t()), sw[:, None], sx.t(), x.dtype).t().contiguous()


def int8_one_row(xq: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [1, rows] int32 = xq [1, in] @ q.T, exact: the native kernel where it runs (native.gemv_int8, the same
    sums, read faster), else torch._int_mm."""
    if not native.gemv_int8(xq[0], q, out[0]):
        torch._int_mm(xq, q.t(), out=out)
    return out


class Int8Rows(NamedTuple):
    """An int8 matrix kept in RAM as row pieces W = [W0; W1; ...] (a resident file's wqkv, wo, output), with the
    pieces' scales joined once (weight_scale)."""
    pieces: list[Int8Weight]
    scale: torch.Tensor  # [out] float32
    table: torch.Tensor | None = None  # the pieces for native.gemv_pieces, one after another

    def at_once(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ W.T in one go (int8_rows_one_row) at one row; None where x takes the pieces one at a time."""
        return int8_rows_one_row(x, self) if x.shape[0] == 1 else None


class Int8FFN(NamedTuple):
    """A resident file's int8 FFN slices: every slice's w1 [c, dim], then every slice's w3, as one Int8Rows
    [2 * hidden, dim]; each slice's w2 [dim, c], with their scales stacked [slices, dim]."""
    up: Int8Rows
    down: list[Int8Weight]
    s2: torch.Tensor
    table: torch.Tensor | None = None  # the slices' w2 for native.gemv_pieces (each [dim, c]: an output row each)

    @property
    def slices(self) -> list[tuple[Int8Weight, Int8Weight, Int8Weight]]:
        """(w1, w3, w2) of each slice, as a file view's "ffn" yields them."""
        n = len(self.down)
        return list(zip(self.up.pieces[:n], self.up.pieces[n:], self.down))

    def at_once(self, x: torch.Tensor) -> torch.Tensor | None:
        """The FFN of x in one go (int8_ffn_one_row) at one row; None where x takes the slices one at a time."""
        return int8_ffn_one_row(x, self) if x.shape[0] == 1 else None


def weight_scale(w: Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    """w's scales as int8_matmul multiplies by them: rounded to the compute dtype, then float32, so a resident
    file (scales converted at load) gives the very same numbers as a streamed one."""
    return w.scale.to(dtype).float()


def _scaled(acc: torch.Tensor, sw: torch.Tensor, sx: torch.Tensor, dtype: torch.dtype,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact int32 sums scaled back: (sum * weight scale) * row scale in float32, rounded to dtype once, as the
    second product is written (no float32 result made, then converted), into out if given."""
    return torch.mul(torch.mul(acc, sw), sx, out=torch.empty(acc.shape, dtype=dtype) if out is None else out)


def joined_rows(pieces: list[Int8Weight], dtype: torch.dtype) -> Int8Rows:
    return Int8Rows(pieces, torch.cat([weight_scale(w, dtype) for w in pieces]), native.table([w.q for w in pieces]))


def joined_ffn(slices: list[tuple[Int8Weight, Int8Weight, Int8Weight]], dtype: torch.dtype) -> Int8FFN:
    down = [t[2] for t in slices]
    return Int8FFN(joined_rows([t[0] for t in slices] + [t[1] for t in slices], dtype), down,
                   torch.stack([weight_scale(w, dtype) for w in down]), native.table([w.q for w in down]))


def int8_rows_one_row(x: torch.Tensor, w: Int8Rows) -> torch.Tensor:
    """x [1, in] @ W.T: int8_matmul of each piece, their int32 sums side by side in one buffer, with one epilogue
    over all of them instead of one each (the same numbers: the epilogue is elementwise). With int8_ffn_one_row,
    an all-resident 8B int8 decode step took 0.368-0.403 s against 0.443-0.452 (`tools/bench.py MODEL --cap none
    --cases membw,resident`, 2 rounds)."""
    xq, sx = _rows_of(x)
    acc, a = torch.empty(1, w.scale.shape[0], dtype=torch.int32), 0
    if w.table is not None and native.gemv_pieces(w.table, xq[0], acc):
        return _scaled(acc, w.scale, sx, x.dtype)
    for p in w.pieces:
        int8_one_row(xq, p.q, acc[:, a:a + p.q.shape[0]])
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
    if w.table is None or not native.gemv_pieces(w.table, hq, acc):
        for j, w2 in enumerate(w.down):
            int8_one_row(hq[j:j + 1], w2.q, acc[j:j + 1])
    y = torch.zeros(1, x.shape[1], dtype=torch.float32)
    for part in _scaled(acc, w.s2, sh, x.dtype):
        y += part
    return y.to(x.dtype)


class Int4Rows(NamedTuple):
    """An int4 matrix kept in RAM whole, joined once from its row pieces W = [W0; W1; ...] (a resident file's wqkv,
    wo, output; join_int4_rows): one call of torch's int4 kernel where that runs (int4_kernel_rows), the pieces
    (views) where tiles are requantized, so those keep the streamed pieces' shapes and numbers."""
    whole: Int4Weight
    rows: tuple[int, ...]  # each piece's

    @property
    def pieces(self) -> list[Int4Weight]:
        bounds = list(itertools.accumulate(self.rows, initial=0))
        return [Int4Weight(self.whole.packed[a:b], self.whole.sz[:, a:b]) for a, b in zip(bounds, bounds[1:])]

    def at_once(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ W.T in one call of torch's int4 kernel below int4_kernel_rows; None where tiles are requantized."""
        return qlinear(x, self.whole) if x.shape[0] < int4_kernel_rows() else None


class Int4FFN(NamedTuple):
    """A resident file's int4 FFN slices joined once: every slice's w1, then every slice's w3, as one matrix
    [2 * hidden, dim], and w2 whole [dim, hidden]. Where torch's int4 kernel runs, two calls of it
    (at_once) instead of three a slice: the 8B's FFN at one row took 2.4 against 2.9 ms a block (j1.py),
    joining w2 alone 2.7 (j4.py); its [4096, 1024] slices are the slowest shape the kernel reads. w2 then sums the
    whole hidden dim at once, rounding once where the slices round each partial product (0.4% of the largest
    output apart, j3.py). Where tiles are requantized, the slices again (`slices`), with the streamed slices'
    shapes and numbers."""
    up: Int4Weight
    down: Int4Weight
    rows: int  # hidden rows a slice

    @property
    def slices(self) -> Iterator[tuple[Int4Weight, Int4Weight, Int4Weight]]:
        """(w1, w3, w2) of each slice, as a file view's "ffn" yields them: w1 and w3 are views, w2 a copy of its
        columns (2 MiB for the 8B; a view would not be contiguous)."""
        dim, hidden, c = self.down.packed.shape[0], self.up.packed.shape[0] // 2, self.rows
        blocks, g = self.down.packed.view(dim // 64, hidden, 32), self.down.group
        for j in range(0, hidden, c):
            yield (Int4Weight(self.up.packed[j:j + c], self.up.sz[:, j:j + c]),
                   Int4Weight(self.up.packed[hidden + j:hidden + j + c], self.up.sz[:, hidden + j:hidden + j + c]),
                   Int4Weight(blocks[:, j:j + c].contiguous().view(dim, c // 2), self.down.sz[j // g:(j + c) // g]))

    def at_once(self, x: torch.Tensor) -> torch.Tensor | None:
        """model.feed_forward below int4_kernel_rows: [w1; w3] in one call of torch's int4 kernel, then w2 in
        another; None where tiles are requantized."""
        if x.shape[0] >= int4_kernel_rows():
            return None
        u = qlinear(x, self.up)
        hidden = u.shape[1] // 2
        return qlinear(torch.nn.functional.silu(u[:, :hidden]) * u[:, hidden:], self.down)


JOINED_ROWS = (Int8Rows, Int4Rows, kernels.NativeRows)  # a resident file's row pieces joined: at_once(x), else .pieces
JOINED_FFN = (Int8FFN, Int4FFN, kernels.NativeFFN)  # its FFN slices joined: at_once(x), else .slices


def int4_rows_joinable(pieces: list[Int4Weight]) -> bool:
    """Whether row pieces join into one matrix in torch's int4 layout: every piece but the last whole blocks of 64
    rows (int4_codes_t), and one group size."""
    return (int4_layout_known() and len({p.group for p in pieces}) == 1
            and all(p.packed.shape[0] % 64 == 0 for p in pieces[:-1]))


def int4_columns_joinable(pieces: list[Int4Weight]) -> bool:
    """Whether column pieces W = [W0 W1 ...] join into one: the same rows, whole blocks of 64 of them, one group."""
    rows = {p.packed.shape[0] for p in pieces}
    return int4_layout_known() and len(rows) == 1 and rows.pop() % 64 == 0 and len({p.group for p in pieces}) == 1


def join_int4_rows(pieces: list[Int4Weight], done=lambda i: None) -> Int4Rows:
    """[W0; W1; ...] (int4_rows_joinable) copied into one matrix, calling done(i) once piece i is copied (a resident
    file gives its pages back). A 64-row block's codes are contiguous, so the codes join as rows do."""
    out = sum(p.packed.shape[0] for p in pieces)
    packed = torch.empty(out, pieces[0].packed.shape[1], dtype=torch.uint8)
    sz = torch.empty(pieces[0].sz.shape[0], out, 2, dtype=pieces[0].sz.dtype)
    a = 0
    for i, p in enumerate(pieces):
        b = a + p.packed.shape[0]
        packed[a:b].copy_(p.packed)
        sz[:, a:b].copy_(p.sz)
        done(i)
        a = b
    return Int4Rows(Int4Weight(packed, sz), tuple(p.packed.shape[0] for p in pieces))


def join_int4_columns(pieces: list[Int4Weight], done=lambda i: None) -> Int4Weight:
    """[W0 W1 ...] (int4_columns_joinable) copied into one matrix, as join_int4_rows does. A block of 64 rows holds
    each input k's 32 bytes in turn (int4_codes_t), so the codes join along that k."""
    out, g = pieces[0].packed.shape[0], pieces[0].group
    inp = sum(2 * p.packed.shape[1] for p in pieces)
    packed = torch.empty(out, inp // 2, dtype=torch.uint8)
    sz = torch.empty(inp // g, out, 2, dtype=pieces[0].sz.dtype)
    k = 0
    for i, p in enumerate(pieces):
        n = 2 * p.packed.shape[1]
        packed.view(out // 64, inp, 32)[:, k:k + n].copy_(p.packed.view(out // 64, n, 32))
        sz[k // g:(k + n) // g].copy_(p.sz)
        done(i)
        k += n
    return Int4Weight(packed, sz)


def int4_native() -> bool:
    """Whether one-row int4 products take the native kernel (native.gemv_int4): then a resident int4 file keeps its
    pieces as they are (read into private memory: budget.plan), rather than joined into whole matrices for torch's
    kernel."""
    return int4_layout_known() and native.available()


def int4_kernel_rows() -> int:
    """The rows from which qlinear requantizes int4 tiles instead of taking torch's int4 kernel."""
    if not int4_layout_known():
        return 1 << 62
    return INT4_COMPILED_ROWS if kernels.int4_compiled() else INT4_DEQUANT_ROWS


def qlinear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ W.T on quantized codes, in x's dtype. On 4096 x 4096 codes and bf16 x, 2 threads (`tools/bench.py
    MODEL --cases qmatmul`):
    - int8: int8_matmul at 1 row and from INT8_GEMM_ROWS rows, torch's int8-by-float kernel between (at 2-5
      rows the integer matmul takes as long as at 16: ~45 ms on 8 x 14336 x 4096 codes against the kernel's
      23-30). The integer matmul took 0.23-0.37x bf16's time at 1 row, 0.61-0.88x at 16-32 rows, and from 64
      rows 0.58-0.71x in two of five runs, 0.86-1.01x in the other three (each process kept its own level).
    - int4: at one row, the native kernel where it runs (native.gemv_int4: x quantized to int8 a group at a time,
      as llama.cpp's Q4_0 x Q8_0; 60-62 GB/s of codes against torch's kernel's 40-42 on the 8B's FFN-up, k13.py).
      Else torch's kernel below INT4_DEQUANT_ROWS, or below INT4_COMPILED_ROWS in a compiled run, else the
      codes requantized to int8 a tile at a time for the integer matmul (_int4_as_int8_matmul), by a compiled
      loop in a compiled run (kernels.int4_int8_tile). ms per 4096 x 4096 of weights, on the 8B's shapes (wo,
      an FFN slice's w1 and w2; a4_rows.py, one run), at 64 / 128 / 256 / 512 rows: torch's int4 kernel
      6.2-6.3 / 12.5-12.8 / 24.9-25.6 / 49.3-50.8; compiled int8 tiles 3.9-4.4 / 5.0-5.3 / 7.5-7.8 / 12.5-14.1;
      eager ones 5.7-9.3 / 7.4-7.8 / 10.2-12.0 / 15.1-17.3; bf16 3.0-3.2 / 5.2-5.3 / 9.4-9.5 / 18.3-18.7. The
      compiled tiles it replaced, converted to bf16 for bf16's GEMM, took 4.4-5.1 / 6.6-7.2 / 10.6-11.7 /
      19.4-21.3 in the same run. At 8 / 32 / 48 / 64 rows the compiled int8 tiles took 3.0 / 3.5 / 3.6 / 4.1 ms,
      the kernel 0.8 / 3.1 / 4.6 / 6.2 (a5_low.py)."""
    if isinstance(w, Int8Weight):
        # torch 2.13's int8 kernel crashes (SIGSEGV) on 2 or more rows when the input width is not a multiple of
        # 16 (stories260K's FFN, 172): those take the integer matmul too
        if x.shape[0] == 1 or x.shape[0] >= INT8_GEMM_ROWS or w.q.shape[1] % 16:
            return int8_matmul(x, w)
        return torch._weight_int8pack_mm(x, w.q, w.scale.to(x.dtype))
    if x.shape[0] >= int4_kernel_rows():
        return _int4_as_int8_matmul(x, w, kernels.int4_compiled())
    if x.shape[0] == 1 and int4_native() and (y := native.gemv_int4(x[0], w)) is not None:
        return y[None]
    return torch._weight_int4pack_mm_for_cpu(x, w.packed, w.group, w.sz.to(x.dtype))


DEQUANT_TILE = 1 << 21  # int4 codes requantized at a time: a 2 MiB int8 tile, reused, that the matmul reads from cache


def tile_rows(out: int, inp: int, align: int) -> int:
    """The rows of W [out, in] that _int4_as_int8_matmul requantizes at a time."""
    return min(out, max(align, DEQUANT_TILE // inp // align * align))


def int4_tile_shapes(out: int, inp: int, group: int) -> set[tuple[int, int, int, int]]:
    """The (rows, in, group, out) of the tiles of whole 64-row blocks that qlinear converts an int4 W [out, in]
    in (out too: the compiled kernel is specialised to its inputs' strides, which W's row count sets)."""
    rows = tile_rows(out, inp, 64)
    return {(r, inp, group, out) for r in (rows, out % rows) if r and r % 64 == 0}


def _int4_as_int8_matmul(x: torch.Tensor, w: Int4Weight, compiled: bool) -> torch.Tensor:
    """x @ W.T for many rows of x: W's codes requantized to int8 a tile of rows at a time (int4_as_int8_t, or
    with `compiled` kernels.int4_int8_tile for whole blocks of 64 rows), x quantized per row (quantize_rows), and
    torch's integer matmul on the two, its exact int32 sums scaled back by the tile's row scales and x's, rounded
    to x's dtype once. The tile is reused, and small enough for the matmul to read it from cache."""
    out, inp = w.sz.shape[1], x.shape[1]
    xq, sx = _rows_of(x)
    # from the scales as torch's int4 kernel takes them, in x's dtype (a resident file's are already)
    sp, zp, scale = int4_int8_scales(w.sz.to(x.dtype))
    rows = tile_rows(out, inp, 64)
    buf = torch.empty(inp * rows, dtype=torch.int8)
    y = torch.empty(x.shape[0], out, dtype=x.dtype)
    for j in range(0, out, rows):
        k = min(out, j + rows)
        convert = kernels.int4_int8_tile if compiled and (k - j) % 64 == 0 else int4_as_int8_t
        tile = convert(w.packed[j:k], sp[:, j:k], zp[:, j:k], buf[:inp * (k - j)].view(inp, k - j))
        _scaled(torch._int_mm(xq, tile), scale[j:k], sx, x.dtype, out=y[:, j:k])
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
