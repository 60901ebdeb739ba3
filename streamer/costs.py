"""What a pass over the weights costs on this machine, and the sizes chosen from it.

A pass of N tokens takes about max(read, N·F / rate(N)): the weights it reads (streamed files from disk,
while earlier blocks compute), and F FLOPs per token (2 per weight) at the matmul rate of N rows, which
grows with N up to a few hundred rows. `PassTarget` picks how many tokens a batch pass packs, and
`choose_batch` how many sequences a batch runs, from those costs (`--batch-size auto`).
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import StreamerError

log = logging.getLogger(__name__)
ROWS = (1, 8, 32, 64, 128, 256, 512)  # matmul row counts measured; rates between them are interpolated (rate_at)
EFFICIENT = 0.85  # of the best matmul rate: more rows per pass no longer pay beyond it
AUTO_BATCH_MAX = 512
AUTO_TOLERANCE = 0.95  # the smallest batch within this share of the best tokens/s (less memory, sooner results)


def flops_per_token(args) -> float:
    """FLOPs of one token through every block and the head (2 per weight; attention's own is left out)."""
    hd, ffn = args.head_dim, args.ffn_dim
    block = args.dim * (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd * args.dim + 3 * args.dim * ffn
    return 2.0 * (args.n_layers * block + args.dim * args.vocab_size)


@functools.lru_cache(maxsize=None)
def matmul_rate(dim: int, dtype: torch.dtype, rows: int = 32) -> float:
    """FLOP/s of [rows, dim] x [dim, dim] matmuls in dtype, the best of a few (measured once per process)."""
    x, w = torch.randn(rows, dim).to(dtype), torch.randn(dim, dim).to(dtype)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * rows * dim * dim / max(best, 1e-9)


def rate_at(dim: int, dtype: torch.dtype, rows: int) -> float:
    """The matmul rate for `rows` rows: interpolated (in log rows) between the two measured row counts around
    it, or the nearest one beyond ROWS."""
    rows = min(max(rows, ROWS[0]), ROWS[-1])
    lo, hi = max(r for r in ROWS if r <= rows), min(r for r in ROWS if r >= rows)
    if lo == hi:
        return matmul_rate(dim, dtype, lo)
    w = math.log(rows / lo) / math.log(hi / lo)
    return (1 - w) * matmul_rate(dim, dtype, lo) + w * matmul_rate(dim, dtype, hi)


def efficient_rows(dim: int, dtype: torch.dtype) -> int:
    """The fewest rows (of ROWS, from 8) whose matmul rate is within EFFICIENT of the best measured."""
    rates = {r: matmul_rate(dim, dtype, r) for r in ROWS if r >= 8}
    best = max(rates.values())
    return min(r for r, v in rates.items() if v >= EFFICIENT * best)


class PassTarget:
    """Tokens per batch pass: decode tokens first, then chunks of the prompts still prefilling.

    A pass pays off up to T = max(the tokens whose compute fills its read, efficient_rows): below T a token
    rides under the read or speeds the matmuls up, beyond it each costs the same whenever it runs. So
    prompt chunks fill a pass up to T, or with T decode tokens already in it, add T more (prompts keep
    entering; the cost per token is the same), within the plan's `limit` on tokens per pass (memory).
    Read-bound passes observed set the read time."""

    def __init__(self, args, dtype: torch.dtype, limit: int, read_s: float = 0.0):
        self.dim, self.dtype, self.limit, self.read = args.dim, dtype, limit, read_s
        self.per_token = flops_per_token(args)
        self.efficient = efficient_rows(args.dim, dtype)

    def compute_s(self, tokens: int) -> float:
        return tokens * self.per_token / rate_at(self.dim, self.dtype, tokens)

    def observe(self, seconds: float, tokens: int) -> None:
        if seconds > 1.2 * self.compute_s(tokens):  # read-bound: the pass took its read
            self.read = seconds

    def tokens(self) -> int:
        free = next((n for n in _doublings(self.limit) if self.compute_s(n) >= self.read), self.limit)
        return max(1, min(self.limit, max(free, self.efficient)))

    def prefill_room(self, decode: int) -> int:
        """How many prompt tokens a pass carrying `decode` decode tokens takes."""
        target = self.tokens()
        room = target - decode if decode < target else target
        return max(0, min(room, self.limit - decode))


def _doublings(limit: int):
    n = 1
    while n < limit:
        yield n
        n *= 2
    yield limit


@dataclass
class BatchCost:
    """One candidate of `choose_batch`: its plan's costs per decode step."""
    batch: int
    read_s: float  # streamed weights and on-disk KV rows, at the disk's rate
    compute_s: float  # batch rows at the matmul rate of that many rows
    kv_disk_bytes: int

    @property
    def step_s(self) -> float:
        return max(self.read_s, self.compute_s)

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_s


def choose_batch(files, budget: int | None, n: int, context: int, dtype: torch.dtype, keep_resident: bool = True,
                 draft=None, disk_gbps: float | None = None) -> tuple[int, list[BatchCost]]:
    """The batch size for `n` sequences of up to `context` tokens with the most decode tokens/s under the
    budget's plan at each size (1, 2, 4, ... up to AUTO_BATCH_MAX, and n), the smallest within AUTO_TOLERANCE of
    the best; and every candidate's costs. Each size is planned with its KV cache in RAM before resident
    blocks (plan's kv_first), and a step reads the streamed files (at the disk's rate, measured when some
    candidate reads any) while its rows compute. Only sizes whose whole KV cache fits in RAM are candidates,
    when any is: on-disk KV rows are read a sequence and a block at a time, before the block computes, at far
    below the disk's rate (8B, 512 sequences of ~300 tokens under memcap 8G: 0.12 GB/s, over two minutes a
    step). Where none is (keep_resident=False), they count at the disk's rate."""
    from .budget import measure_disk, plan

    plans = {}
    for b in _doublings(min(n, AUTO_BATCH_MAX)):
        try:
            plans[b] = plan(files, budget, b, context, keep_resident, draft=draft, kv_first=True)
        except StreamerError:
            break  # a bigger batch needs even more memory
    if not plans:
        return 1, []  # let the run's own plan name what does not fit
    in_ram = {b: p for b, p in plans.items() if p.kv_slots == b}
    plans = in_ram or plans
    a = files.args  # each on-disk sequence's whole KV (its block's share, in every block) is read each step
    reads = {b: p.bytes_per_step + (b - p.kv_slots) * (p.kv_block // b) * a.n_layers for b, p in plans.items()}
    if disk_gbps is None and any(reads.values()):
        disk_gbps = measure_disk(files)
    costs = [BatchCost(b, reads[b] / (disk_gbps or 1) / 1e9, b * flops_per_token(a) / rate_at(a.dim, dtype, b),
                       reads[b] - plans[b].bytes_per_step) for b in plans]
    best = max(c.tokens_per_s for c in costs)
    pick = next(c for c in costs if c.tokens_per_s >= AUTO_TOLERANCE * best)
    log.debug(f"batch size auto: {pick.batch} ({pick.tokens_per_s:.1f} decode tokens/s predicted)")
    return pick.batch, costs
