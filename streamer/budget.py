"""The memory budget: how the RAM a run may use is split between the weight ring, resident blocks and
activations, and what that predicts for peak memory and bytes read per step (`streamer plan`)."""
from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .errors import StreamerError
from .layout import ModelFiles
from .runner import MAX_PASS_TOKENS
from .stream import file_pieces, min_ring_bytes
from .weights import drop_cache

BASELINE = 224 << 20  # Python + torch + tokenizer, private, measured at setup: ~200 MiB
RING_CAP = 1 << 30  # a ring beyond ~2 files' worth no longer speeds up streaming (measured: 1 GiB reads at the floor)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise StreamerError(f"memory size {text!r}: expected e.g. 512M, 4G, 1.5G")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def cgroup_limit_files() -> list[Path]:
    """The files holding this process's memory cgroup limit (cgroup v1 or v2)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            found.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes")
        elif controllers == "":
            found.append(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max")
    return [f for f in found if f.exists()]


def cgroup_limit() -> int | None:
    """This process's memory cgroup limit, if any."""
    for f in cgroup_limit_files():
        try:
            raw = f.read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            return int(raw)
    return None


HEADROOM = 0.85  # of the memory the kernel calls available
CODE_CACHE = 160 << 20  # page cache the runtime's code needs (torch's libraries): counted by a cgroup, measured ~100-150 MiB


def available_memory() -> int:
    """What this run may use by default: its memory cgroup's limit, or most of the available memory."""
    avail = int(HEADROOM * psutil.virtual_memory().available)
    limit = cgroup_limit()
    return min(avail, limit) if limit else avail


@dataclass
class Plan:
    budget: int
    ring_bytes: int
    resident: list[str]
    max_pass_tokens: int
    activations: int
    kv_mapped: int
    bytes_per_step: int  # weight bytes read from disk per decode step
    file_bytes: dict[str, int] = field(default_factory=dict)

    def runner_kwargs(self) -> dict:
        return {"ring_bytes": self.ring_bytes, "resident": self.resident, "max_pass_tokens": self.max_pass_tokens}

    @property
    def predicted_peak(self) -> int:
        cache = min(CODE_CACHE, max(0, self.budget - BASELINE - self.kv_mapped - self.activations - self.ring_bytes))
        return (BASELINE + cache + self.ring_bytes + sum(self.file_bytes[n] for n in self.resident)
                + self.activations + self.kv_mapped)


def activation_bytes(files: ModelFiles, tokens: int, batch: int, context: int) -> int:
    """A generous bound on the activations of one pass of `tokens` rows (compute dtype bf16, fp32 sums)."""
    a = files.args
    qkv = (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
    per_token = 2 * (5 * a.dim + qkv + 4 * 1024) + 4 * a.dim + 16 * a.head_dim
    attention = 4 * a.n_heads * min(tokens, 1024) * context if tokens > 1 else 0  # SDPA tiles
    return tokens * per_token + attention + batch * a.vocab_size * 8


def plan(files: ModelFiles, budget: int | None = None, batch: int = 1, context: int = 2048) -> Plan:
    """Split `budget` (default: the available memory) into activations, the ring and resident files;
    refuse, naming what does not fit, when it cannot work."""
    budget = available_memory() if budget is None else budget
    names = files.step_files()
    sizes = {n: files.files[n]["bytes"] for n in names}
    ring_min = min_ring_bytes([p for n in names for p in file_pieces(files.folder / n, files.headers[n])])
    a = files.args
    kv_mapped = 2 * batch * context * a.n_kv_heads * a.head_dim * 2  # one block's cache, mapped while it runs
    room = budget - BASELINE - kv_mapped
    tokens = min(MAX_PASS_TOKENS, batch * context)  # a pass never holds more than every sequence's whole context
    while tokens > batch and activation_bytes(files, tokens, batch, context) > max(room - ring_min, 0) / 2:
        tokens //= 2
    tokens = max(tokens, batch)
    act = activation_bytes(files, tokens, batch, context)
    if room - act < ring_min:
        raise StreamerError(
            f"a memory budget of {budget / 2**20:.0f} MiB cannot work: the runtime needs ~{BASELINE / 2**20:.0f} MiB, "
            f"activations for batch {batch} ~{act / 2**20:.0f} MiB, one block's KV cache {kv_mapped / 2**20:.0f} MiB and the "
            f"smallest weight ring {ring_min / 2**20:.0f} MiB ({(BASELINE + act + kv_mapped + ring_min) / 2**20:.0f} MiB in all)")
    spare = room - act - CODE_CACHE  # the runtime's code pages come first; below that, steps slow down but run
    resident: list[str] = []
    if spare >= sum(sizes.values()):  # everything fits: nothing streams
        resident = list(names)
        ring = 0
    else:
        ring = min(spare, RING_CAP, 2 * max(sizes.values()))
        left = spare - ring
        for n in sorted(names, key=lambda n: sizes[n]):  # as many files as fit beside the ring
            if sizes[n] <= left and len(resident) < len(names) - 1:
                resident.append(n)
                left -= sizes[n]
        ring = max(ring, ring_min)
    if spare < ring_min:
        print(f"plan: a budget of {budget / 2**20:.0f} MiB leaves torch's code pages too little page cache; "
              f"expect slower steps below ~{(BASELINE + CODE_CACHE + act + kv_mapped + ring_min) / 2**20:.0f} MiB", file=sys.stderr)
    resident.sort(key=names.index)
    streamed = sum(sizes[n] for n in names if n not in resident)
    return Plan(budget, ring, resident, tokens, act, kv_mapped, streamed, sizes)


def measure_disk(files: ModelFiles, nbytes: int = 1 << 30) -> float:
    """A quick read test (GB/s) over the model's own files, with their pages dropped first."""
    done, t0 = 0, time.perf_counter()
    buf = bytearray(16 << 20)
    for n in files.step_files():
        with open(files.folder / n, "rb", buffering=0) as f:
            drop_cache(f.fileno())
            while done < nbytes and (k := f.readinto(buf)):
                done += k
            drop_cache(f.fileno())
        if done >= nbytes:
            break
    return done / (time.perf_counter() - t0) / 1e9


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", type=Path)
    p.add_argument("--memory", required=True, help="the memory budget, e.g. 512M, 4G")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence (prompt + new)")
    p.add_argument("--disk-gbps", type=float, help="disk read bandwidth (default: a quick read test)")
    return p


def main(args: argparse.Namespace) -> int:
    files = ModelFiles(args.model)
    if args.batch <= 0 or args.context <= 0:
        raise StreamerError("--batch and --context must be positive")
    p = plan(files, parse_size(args.memory), args.batch, args.context)
    gbps = args.disk_gbps or measure_disk(files)
    mib = lambda b: f"{b / 2**20:,.0f} MiB"
    blocks = [n for n in p.resident if n.startswith("block_")]
    print(f"memory budget {mib(p.budget)} for batch {args.batch}, context {args.context}:")
    print(f"  predicted peak   {mib(p.predicted_peak)} (runtime {mib(BASELINE)} + its code {mib(CODE_CACHE)}, weight ring {mib(p.ring_bytes)}, "
          f"resident {mib(sum(p.file_bytes[n] for n in p.resident))}, activations {mib(p.activations)}, "
          f"KV of one block {mib(p.kv_mapped)})")
    print(f"  resident         {len(blocks)} of {files.args.n_layers} blocks" + (", and the head" if "head.safetensors" in p.resident else "")
          + (f" ({blocks[0]} .. {blocks[-1]})" if blocks else ""))
    print(f"  read per step    {p.bytes_per_step / 1e9:.2f} GB; prefill passes of up to {p.max_pass_tokens} tokens")
    print(f"  disk-bound floor {p.bytes_per_step / 1e9 / gbps:.2f} s per decode step at {gbps:.2f} GB/s"
          + ("" if args.disk_gbps else " (measured)"))
    return 0
