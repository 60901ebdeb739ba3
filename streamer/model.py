"""The pure block math of Llama 3: no I/O, no device choice. Weights and the KV cache come in as arguments.

Tokens of all sequences in a step are packed along one axis (N rows); `seqs` says which rows belong
to which cache slot and at what position they start, so matmuls see the whole batch at once while
attention stays per sequence and never mixes them.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .args import ModelArgs
from .kernels import decode_attention, linear_one_row, prefill_attention
from .quant import JOINED_FFN, JOINED_ROWS, qlinear


class Seq(NamedTuple):
    kv_row: int  # its row in this pass's KV cache tensor (KVCache.rows)
    start: int  # position of its first row in this step (= tokens already cached)
    rows: slice  # its rows in the packed [N, dim] activations
    mask: torch.Tensor | None = None  # bool [rows, start + rows]: the keys each row sees (a draft tree); None: causal


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight.to(x.dtype)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim/2], float32, with Llama 3.1's apply_scaling or linear scaling
    (every frequency divided by the factor) when set."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if args.rope_linear_factor is not None:
        freqs = freqs / args.rope_linear_factor
    if not args.use_scaled_rope:
        return freqs
    factor, low, high, old = (args.rope_scale_factor, args.rope_low_freq_factor,
                              args.rope_high_freq_factor, args.rope_original_max_pos)
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > old / low, freqs / factor, freqs)
    smooth = (old / wavelen - low) / (high - low)
    mid = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_rotations(freqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Unit complex rotations [N, head_dim/2] for integer positions [N]."""
    angles = torch.outer(positions.float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Meta's apply_rotary_emb: rotate interleaved pairs (2i, 2i+1). x [N, heads, hd], rot [N, hd/2]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [N, heads, hd/2]
    return torch.view_as_real(xc * rot[:, None, :]).flatten(-2).type_as(x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention of one sequence's chunk (decode rows go to attend_decode). q [T, H, hd]
    at positions start..start+T-1; k, v [start+T, KV, hd]. Query head h reads kv head h // (H/KV). Returns [T, H*hd].
    mask (bool [T, start+T]) replaces causality: the rows of a draft tree see their ancestors only."""
    T, H, hd = q.shape
    if mask is None and (out := prefill_attention(q, k, v, start)) is not None:
        return out
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (heads, T|S, hd)
    causal = mask is None and T > 1 and start == 0
    if mask is None and T > 1 and start > 0:  # query t sees keys 0..start+t
        mask = torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                         is_causal=causal, enable_gqa=H != k.shape[0])
    return out[0].transpose(0, 1).reshape(T, H * hd)


def attention(x, w, rot, kv, seqs: list[Seq], args: ModelArgs) -> torch.Tensor:
    """x [N, dim] (already normed) -> [N, dim]. Writes this step's keys (after RoPE) and values into
    kv [2, seqs, positions, KV, hd] at each sequence's positions, then attends over the cached prefix."""
    N, H, KV, hd = x.shape[0], args.n_heads, args.n_kv_heads, args.head_dim
    qkv = linear_rows(x, w["wqkv"])  # [N, (H + 2 KV) hd]
    q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
    q = apply_rope(q.reshape(N, H, hd), rot)
    k = apply_rope(k.reshape(N, KV, hd), rot)
    v = v.reshape(N, KV, hd)
    out = torch.empty(N, H * hd, dtype=x.dtype)
    one = [s.rows.stop - s.rows.start == 1 and s.mask is None for s in seqs]  # a decode row: all of them at once
    if decode := [s for s, d in zip(seqs, one) if d]:
        rows = torch.tensor([s.rows.start for s in decode])
        slots, starts = torch.tensor([s.kv_row for s in decode]), torch.tensor([s.start for s in decode])
        kv[0, slots, starts], kv[1, slots, starts] = k[rows], v[rows]
        out[rows] = attend_decode(q[rows], kv, [s.kv_row for s in decode], starts + 1)
    for s in (s for s, d in zip(seqs, one) if not d):  # prompt chunks and draft trees: one sequence at a time
        end = s.start + (s.rows.stop - s.rows.start)
        kv[0, s.kv_row, s.start:end] = k[s.rows]
        kv[1, s.kv_row, s.start:end] = v[s.rows]
        out[s.rows] = attend(q[s.rows], kv[0, s.kv_row, :end], kv[1, s.kv_row, :end], s.start, s.mask)
    return linear_rows(out, w["wo"])


def attend_decode(q: torch.Tensor, kv: torch.Tensor, slots: list[int], ends: torch.Tensor) -> torch.Tensor:
    """Decode attention of D sequences, one new token each: q [D, H, hd]; sequence d reads positions
    [0, ends[d]) of row slots[d] of kv [2, n, S, KV, hd] (positions past its end hold finite values, masked).
    Native or compiled (kernels.decode_attention) where those run; else one bmm per kv head over all
    sequences, on strided views of the cache. Rows in a run with gaps (fewer than D rows not in this pass)
    attend over the whole run, on views: a gather of these rows copied 160 MiB a block at 128 sequences of
    320 positions (8B shapes), faulted in anew every block. At 256 sequences, 8B shapes, 2 threads, a layer took
    (`tools/bench.py MODEL --cases attention`): at 8 positions 3.5 ms per kv head, 2.5 compiled; at 320, 149 and
    54. The loop over sequences this replaced took 24.6 and 166 ms in a scratch run of the same shapes."""
    D, H, hd = q.shape
    S, lo, hi = int(ends.max()), min(slots), max(slots)
    if slots == list(range(lo, lo + D)):
        return _attend_decode(q, kv[0, lo:lo + D, :S], kv[1, lo:lo + D, :S], ends)  # [D, S, KV, hd], views
    if hi - lo < 2 * D:  # a run with gaps (slots not in this pass): attend over the whole run on views, not
        rows = torch.tensor(slots) - lo  # on copies of these rows, and keep these rows' outputs
        qs, es = q.new_zeros(hi - lo + 1, H, hd), torch.ones(hi - lo + 1, dtype=ends.dtype)
        qs[rows], es[rows] = q, ends
        return _attend_decode(qs, kv[0, lo:hi + 1, :S], kv[1, lo:hi + 1, :S], es)[rows]
    return _attend_decode(q, kv[0, slots, :S], kv[1, slots, :S], ends)


def _attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """attend_decode on q [D, H, hd] and each sequence's own keys and values k, v [D, S, KV, hd]."""
    D, H, hd = q.shape
    S, KV = k.shape[1], k.shape[2]
    if (part := decode_attention(q, k, v, ends)) is not None:
        return part
    if D == 1:  # one sequence: one bmm over its kv heads (0.6 against 1.0 ms a layer at 320 positions, 8B shapes)
        scores = torch.bmm(q[0].view(KV, H // KV, hd), k[0].permute(1, 2, 0)) / math.sqrt(hd)  # (KV, H/KV, S)
        probs = torch.softmax(scores.float(), dim=-1).type_as(q)
        return torch.bmm(probs, v[0].transpose(0, 1)).reshape(1, H * hd)
    qh = q.view(D, KV, H // KV, hd)
    scores = torch.stack([torch.bmm(qh[:, h], k[:, :, h].transpose(1, 2)) for h in range(KV)], 1) / math.sqrt(hd)
    if int(ends.min()) < S:
        scores.masked_fill_((torch.arange(S) >= ends[:, None])[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)  # [D, KV, H/KV, S]
    return torch.stack([torch.bmm(probs[:, h], v[:, :, h]) for h in range(KV)], 1).reshape(D, H * hd)


def feed_forward(x: torch.Tensor, pieces) -> torch.Tensor:
    """SwiGLU w2(silu(w1 x) * w3 x), one slice j of the hidden dim at a time: pieces yields
    (w1[j] [c, dim], w3[j] [c, dim], w2[:, j] [dim, c]). Partial sums accumulate in float32."""
    if isinstance(pieces, JOINED_FFN):  # a resident quantized file's slices, joined (quant.py)
        if (y := pieces.at_once(x)) is not None:
            return y
        pieces = pieces.slices
    y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    for w1, w3, w2 in pieces:
        h = F.silu(linear(x, w1)) * linear(x, w3)  # [N, c]; at one row, three compiled matmuls where they run
        y += linear(h, w2)
    return y.to(x.dtype)


def block(x: torch.Tensor, w, rot: torch.Tensor, kv: torch.Tensor, seqs: list[Seq], args: ModelArgs) -> torch.Tensor:
    """One Transformer block on packed rows x [N, dim]: pre-norm attention, then pre-norm SwiGLU.
    w gives tensors by name in file order; w["ffn"] yields the FFN slices."""
    h = x + attention(rms_norm(x, w["attention_norm"], args.norm_eps), w, rot, kv, seqs, args)
    return h + feed_forward(rms_norm(h, w["ffn_norm"], args.norm_eps), w["ffn"])


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ weight.T, converting this one matrix to the compute dtype if it is stored in another;
    quantized weights go straight to their kernels."""
    if not isinstance(weight, torch.Tensor):
        return qlinear(x, weight)
    if x.shape[0] == 1:  # batch-1 decode: reading the weights is the whole cost (kernels.py)
        return linear_one_row(x, weight)
    return F.linear(x, weight.to(x.dtype))


def linear_rows(x: torch.Tensor, pieces) -> torch.Tensor:
    """x @ W.T for W given whole or as row pieces (W = [W0; W1; ...]): the outputs concatenate."""
    if isinstance(pieces, JOINED_ROWS):  # a resident quantized file's pieces, joined (quant.py)
        if (y := pieces.at_once(x)) is not None:
            return y
        pieces = iter(pieces.pieces)
    if not isinstance(pieces, Iterator):  # a tensor, or quantized codes with their scales
        return linear(x, pieces)
    return torch.cat([linear(x, w) for w in pieces], dim=-1)


def logits(h: torch.Tensor, head, eps: float) -> torch.Tensor:
    """Final norm and output head for h [M, dim] -> float32 [M, vocab]; head["output"] may come in row pieces."""
    h = rms_norm(h, head["norm"], eps)
    return linear_rows(h, head["output"]).float()
