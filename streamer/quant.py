"""Weight-only quantization, done once at split time and computed on directly with torch's CPU kernels.

int8: symmetric, one scale per output row:  w ~ q * scale,           q in [-127, 127]
int4: asymmetric, per group of `group` inputs: w ~ (q - 8) * s + z,  q in [0, 15],
      packed by torch._convert_weight_to_int4pack_for_cpu (the layout its matmul kernel reads).
A quantized matrix is stored as NAME (the codes) followed by NAME.scale (int8) or NAME.sz (int4:
scales and zeros, [in / group, out, 2]); nothing is ever dequantized to a full matrix (at many rows, one
piece of at most 16 MiB of codes at a time is converted to the compute dtype for F.linear's GEMM).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

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


INT8_DEQUANT_ROWS = 16  # from this many rows, int8 codes are converted to x's dtype and multiplied by F.linear
INT4_DEQUANT_ROWS = 256  # the same for int4 (its conversion costs more: unpacking, a scale and zero per group)


def int4_codes(packed: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    """The [out, inp] codes (0..15, uint8) in torch's CPU int4 kernel layout as torch 2.x packs it: rows in
    blocks of 64, each input k's 32 bytes holding row i (low nibble) and row i + 32 (high); then the last
    out % 64 rows, each k's bytes holding rows 2j (low) and 2j + 1 (high). `int4_layout_known` checks it."""
    flat = packed.reshape(-1)
    full = out // 64 * 64
    parts = []
    if full:
        b = flat[:full * inp // 2].reshape(full // 64, inp, 32)
        parts.append(torch.cat([b & 0xF, b >> 4], dim=2).permute(0, 2, 1).reshape(full, inp))
    if out > full:
        b = flat[full * inp // 2:].reshape(inp, (out - full) // 2)
        parts.append(torch.stack([b & 0xF, b >> 4], -1).reshape(inp, out - full).T)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@functools.cache
def int4_layout_known() -> bool:
    """Whether this torch packs int4 codes as int4_codes reads them (checked once, on a small matrix with a
    block of 64 rows and a tail); if not, int4 stays on torch's kernel at every row count."""
    q = torch.randint(0, 16, (80, 128), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    return torch.equal(int4_codes(torch._convert_weight_to_int4pack_for_cpu(q, 1), 80, 128).to(torch.int32), q)


def dequantize_int4(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] matrix (q - 8) * scale + zero in dtype, as q * scale + (zero - 8 * scale)."""
    out, inp, g = w.sz.shape[1], 2 * w.packed.shape[1], w.group
    codes = int4_codes(w.packed, out, inp).view(out, inp // g, g).to(dtype)
    scale = w.sz[..., 0].T[..., None]
    return (codes * scale.to(dtype)).add_((w.sz[..., 1].T[..., None] - 8 * scale).to(dtype)).view(out, inp)


def qlinear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ W.T on quantized codes, in x's dtype. torch's int8 kernel costs ~0.2 ms more per row on a 2048 x 4096
    piece (one row 0.42 ms, 16 rows 3.3, 64 rows 14.3, 2 threads), while converting the piece's codes and using
    F.linear's GEMM costs 1.4-6.4 ms from 1 to 64 rows: the two cross between 8 and 16 rows. So prefill (and
    big batches) take the GEMM, with the row scales applied to its output. torch's int4 kernel takes 2-3x
    bf16's time from 16 rows (2048 x 4096, 2 threads: 6.6-7.5 against 3.2 ms at 64 rows, 51.8-57.5 against
    20.3-21.9 at 512), and unpacking the piece then F.linear took 22-29 ms at 256 rows (the kernel 25.6-29.8)
    and 28-45 ms at 512, so int4 takes the GEMM from INT4_DEQUANT_ROWS."""
    if isinstance(w, Int8Weight):
        # torch 2.13's int8 kernel crashes (SIGSEGV) on 2 or more rows when the input width is not a multiple of
        # 16 (stories260K's FFN, 172): those take the GEMM too
        if x.shape[0] >= INT8_DEQUANT_ROWS or (x.shape[0] > 1 and w.q.shape[1] % 16):
            return torch.nn.functional.linear(x, w.q.to(x.dtype)) * w.scale.to(x.dtype)
        return torch._weight_int8pack_mm(x, w.q, w.scale.to(x.dtype))
    if x.shape[0] >= INT4_DEQUANT_ROWS and int4_layout_known():
        return torch.nn.functional.linear(x, dequantize_int4(w, x.dtype))
    return torch._weight_int4pack_mm_for_cpu(x, w.packed, w.group, w.sz.to(x.dtype))


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
