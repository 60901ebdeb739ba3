"""The memory budget: how the RAM a run may use is split between the weight ring, resident blocks and
activations, and what that predicts for peak memory and bytes read per step (`streamer plan`)."""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import native, quant
from .errors import StreamerError
from .layout import ModelFiles
from .runner import MAX_PASS_TOKENS
from .stream import file_pieces, min_ring_bytes
from .files import drop_cache, now

log = logging.getLogger(__name__)
BASELINE = 224 << 20  # Python + torch + tokenizer, private, measured at setup: ~200 MiB
RING_CAP = 256 << 20  # a larger ring reads no faster, and what it would take keeps blocks resident instead. Measured
# on the 8B bf16: the stream alone read 3.15-3.24 GB/s with rings of 160 to 872 MiB; at 96, 128 and 160 sequences
# (reads and compute about even) decode steps took the same with 256 MiB as with 1 GiB, within 1%; under memcap
# 2G, 256 MiB left room for 3 resident blocks against 1, and steps of 4.15 and 4.30 s against 4.71 and 4.56


def parse_size(text: str, param: str | None = None) -> int:
    """512M, 4G, 1.5GiB -> bytes; an error names `param` (the option that gave it) when there is one."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise StreamerError(f"must be a memory size such as 512M, 4G or 1.5G, got {text!r}", param=param)
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def cgroup_limit_files(proc_cgroup: str | None = None, root: Path = Path("/sys/fs/cgroup")) -> list[Path]:
    """The files holding this process's memory cgroup limit: cgroup v1's memory.limit_in_bytes under
    ROOT/memory, or v2's memory.max under ROOT (or ROOT/unified in hybrid setups). `proc_cgroup` is the text
    of /proc/self/cgroup (read when not given)."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return []
    found = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(","):
            found.append(root / "memory" / path.lstrip("/") / "memory.limit_in_bytes")
        elif controllers == "":
            found += [root / path.lstrip("/") / "memory.max", root / "unified" / path.lstrip("/") / "memory.max"]
    return [f for f in found if f.is_file()]


def cgroup_limit(proc_cgroup: str | None = None, root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """This process's memory cgroup limit, if any ("max", or v1's huge number for none, mean no limit)."""
    for f in cgroup_limit_files(proc_cgroup, root):
        try:
            raw = f.read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            return int(raw)
    return None


HEADROOM = 0.85  # of the memory the kernel calls available
MARGIN = 0.05  # of the budget, held back for what the plan does not model: allocator slack, GEMM workspaces, page
# cache a cgroup reclaims late (batch prefills under 4G and 7G peaked 2-3% over plans that filled the whole budget)
CODE_CACHE = 160 << 20  # page cache the runtime's code needs (torch's libraries): counted by a cgroup, measured ~100-150 MiB
KERNELS = 192 << 20  # what a run that compiles its kernels keeps for them (inductor, their code): a first compile of
# one kernel raised private memory by 152 MiB for good; the 8B int4 at batch 128 under memcap 4G, planned without
# it, was OOM-killed when it compiled with an empty inductor cache


def available_memory() -> int:
    """What this run may use by default: its memory cgroup's limit, or most of the available memory."""
    avail = int(HEADROOM * psutil.virtual_memory().available)
    limit = cgroup_limit()
    return min(avail, limit) if limit else avail


@dataclass
class Plan:
    """How a memory budget is spent for `batch` sequences of up to `context` tokens."""
    budget: int
    batch: int
    context: int
    ring_bytes: int
    resident: list[str]
    max_pass_tokens: int
    activations: int
    kv_block: int  # one block's KV cache for the whole batch, held in RAM while that block runs
    code_cache: int  # page cache left for the runtime's code (a cgroup charges it)
    bytes_per_step: int  # weight bytes read from disk per decode step
    file_bytes: dict[str, int] = field(default_factory=dict)
    kv_ram: int = 0  # the whole KV cache, when it fits beside the weights: kept in RAM (else on disk)
    mapped: bool = False  # resident files as their mapped file pages (no memory cgroup), else private copies
    draft: int = 0  # a speculative draft model kept in RAM beside it: weights, activations, KV (draft_bytes)
    kv_slots: int = 0  # sequences whose whole KV cache is in RAM (kv_ram); the others' is on disk
    kernels: int = 0  # compiled kernels, when the run compiles them (KERNELS)

    def runner_kwargs(self) -> dict:
        return {"ring_bytes": self.ring_bytes, "resident": self.resident, "max_pass_tokens": self.max_pass_tokens,
                "mapped": self.mapped}

    @property
    def resident_bytes(self) -> int:
        return sum(self.file_bytes[n] for n in self.resident)

    def breakdown(self) -> dict[str, int]:
        """The parts of the predicted peak; they add up to it."""
        return {"runtime": BASELINE, "code page cache": self.code_cache, "weight ring": self.ring_bytes,
                "resident weights": self.resident_bytes, "activations": self.activations, "KV of one block": self.kv_block,
                "KV cache in RAM": self.kv_ram, "draft model": self.draft, "compiled kernels": self.kernels}

    @property
    def predicted_peak(self) -> int:
        return sum(self.breakdown().values())


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def activation_bytes(files: ModelFiles, tokens: int, batch: int, context: int) -> int:
    """A generous bound on the activations of one pass of `tokens` rows (compute dtype bf16, fp32 sums)."""
    a = files.args
    qkv = (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
    per_token = 2 * (5 * a.dim + qkv + 4 * 1024) + 4 * a.dim + 16 * a.head_dim
    attention = 4 * a.n_heads * min(tokens, 1024) * context if tokens > 1 else 0  # SDPA tiles
    # resident int4 FFNs, joined (without the native int4 kernel), take the whole hidden dim at once below torch's
    # int4 kernel's last row count: [w1; w3]'s output, its SiLU and their product (quant.Int4FFN.at_once)
    joined = (2 * 4 * a.ffn_dim * min(tokens, quant.INT4_DEQUANT_ROWS - 1)
              if files.quantize == "int4" and not quant.int4_native() else 0)
    return tokens * per_token + attention + joined + batch * a.vocab_size * 8


def draft_bytes(files: ModelFiles, context: int, batch: int = 1) -> int:
    """What a draft model kept wholly in RAM adds to a run's memory: its weights, activations and KV cache
    for `batch` sequences (the runtime and its code are the target's)."""
    p = plan(files, 1 << 62, batch, context)
    return p.predicted_peak - BASELINE - p.code_cache


def private_pages_faster(files: ModelFiles) -> bool:
    """Whether the native kernels read this split's resident matrices (int8, or int4 in torch's layout), which
    they read faster from private memory than from the file's mapped pages (plan)."""
    return files.quantize == "int8" and native.available() or files.quantize == "int4" and quant.int4_native()


def plan(files: ModelFiles, budget: int | None = None, batch: int = 1, context: int = 2048,
         keep_resident: bool = True, draft: ModelFiles | None = None, kv_first: bool = False, kernels: int = 0) -> Plan:
    """Split `budget` (default: the available memory) into activations, the ring and resident files, and keep
    the whole KV cache in RAM when it fits in what they leave, else as many sequences' as fit; refuse, naming what does not fit, when it cannot
    work. keep_resident=False streams every file. A draft model (speculative decoding) is kept whole in RAM and
    takes its share first. kv_first=True keeps as many sequences' KV cache in RAM as fit before any block is
    made resident (a big batch, whose KV rows on disk would cost more per step than streaming those blocks).
    kernels: the memory compiled kernels keep (KERNELS, for a run that compiles them)."""
    budget = available_memory() if budget is None else budget
    usable = int(budget * (1 - MARGIN))
    held = draft_bytes(draft, context, batch) if draft is not None else 0
    names = files.step_files()
    sizes = {n: files.files[n]["bytes"] for n in names}
    ring_min = min_ring_bytes([p for n in names for p in file_pieces(files.folder / n, files.headers[n])])
    a = files.args
    kv_block = 2 * batch * context * a.n_kv_heads * a.head_dim * 2
    room = usable - BASELINE - kv_block - held - kernels
    tokens = min(MAX_PASS_TOKENS, batch * context)  # a pass never holds more than every sequence's whole context
    while tokens > batch and activation_bytes(files, tokens, batch, context) > max(room - ring_min, 0) / 2:
        tokens //= 2
    tokens = max(tokens, batch)
    act = activation_bytes(files, tokens, batch, context)
    if room - act < ring_min:
        need = {"runtime": BASELINE, "weight ring": ring_min, "activations": act, "KV of one block": kv_block,
                **({f"draft model ({draft.folder.name}, whole)": held} if held else {}),
                **({"compiled kernels": kernels} if kernels else {})}
        raise StreamerError(f"a memory budget of {mib(budget)} cannot work for batch {batch}, context {context}: it needs "
                            f"at least {mib(sum(need.values()) / (1 - MARGIN))} = " + " + ".join(f"{k} {mib(v)}" for k, v in need.items())
                            + f" (the smallest ring), with {MARGIN:.0%} of the budget held back")
    code = min(CODE_CACHE, room - act - ring_min)  # the runtime's code pages come first; below that, steps slow down
    spare = room - act - code
    if code < CODE_CACHE:
        log.warning(f"a memory budget of {mib(budget)} leaves torch's code only {mib(code)} of page cache; "
                    f"expect slower steps below ~{mib(BASELINE + CODE_CACHE + act + kv_block + ring_min)}")
    resident: list[str] = []
    per_slot = a.n_layers * kv_block // batch  # one sequence's whole KV cache
    if keep_resident and spare >= sum(sizes.values()) + (batch * per_slot if kv_first else 0):  # nothing streams
        resident, ring = list(names), 0
    else:
        ring = max(min(spare, RING_CAP, 2 * max(sizes.values())), ring_min)
        left = spare - ring if keep_resident else 0
        if kv_first:
            left -= min(batch, max(left, 0) // per_slot) * per_slot
        for n in sorted(names, key=lambda n: sizes[n]):  # as many files as fit beside the ring
            if sizes[n] <= left and len(resident) < len(names) - 1:
                resident.append(n)
                left -= sizes[n]
    resident.sort(key=names.index)
    streamed = sum(sizes[n] for n in names if n not in resident)
    left = spare - ring - sum(sizes[n] for n in resident)
    kv_slots = min(batch, max(left, 0) // per_slot) if keep_resident else 0  # as many sequences' as fit, in RAM
    kv_ram = kv_slots * per_slot
    # Resident files: under a memory cgroup, private copies, which the kernel cannot drop, so the budget holds
    # honestly; with none, the files' own mapped pages: loading costs one cold read instead of two to six. Quantized
    # files excepted where the native kernels read them, which read private pages faster: all resident, the 8B int4
    # stepped in 0.146 s on mapped pages against 0.130 on private ones (medians of 8 rounds, a7_private.py), the 8B
    # int8 in 0.214 against 0.184 (medians of 24 steps, a8_int8_private.py; alternating in one process each)
    mapped = cgroup_limit() is None and not private_pages_faster(files)
    return Plan(budget, batch, context, ring, resident, tokens, act, kv_block, code, streamed, sizes, kv_ram, mapped, held,
                kv_slots, kernels)


def measure_disk(files: ModelFiles, nbytes: int = 1 << 30) -> float:
    """A quick read test (GB/s) over the model's own files, with their pages dropped first."""
    done, t0 = 0, now()
    buf = bytearray(16 << 20)
    for n in files.step_files():
        with open(files.folder / n, "rb", buffering=0) as f:
            drop_cache(f.fileno())
            while done < nbytes and (k := f.readinto(buf)):
                done += k
            drop_cache(f.fileno())
        if done >= nbytes:
            break
    return done / (now() - t0) / 1e9


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", type=Path, help="a folder written by `streamer split`")
    p.add_argument("--memory-budget", metavar="SIZE", help="the RAM a run may use, e.g. 512M, 4G "
                   "(default: the memory cgroup's limit, or 85%% of the available memory)")
    p.add_argument("--batch-size", default="1", help="sequences that share each pass over the weights, or auto: the "
                   "batch size `streamer batch` would pick for as many prompts (each candidate's predicted step shown)")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence (prompt + new)")
    p.add_argument("--draft", type=Path, metavar="MODEL", help="a speculative draft model, kept whole in RAM: its share "
                   "comes out of the budget first")
    p.add_argument("--disk-gbps", type=float, help="disk read bandwidth in GB/s for the floor (default: a quick read test)")
    return p


def main(args: argparse.Namespace) -> int:
    if args.context <= 0:
        raise StreamerError(f"must be a positive integer, got {args.context}", param="context")
    auto = args.batch_size == "auto"
    if not auto and (not args.batch_size.isdigit() or int(args.batch_size) <= 0):
        raise StreamerError(f"must be a positive integer or auto, got {args.batch_size!r}", param="batch_size")
    files = ModelFiles(args.model)
    draft = ModelFiles(args.draft) if args.draft else None
    budget = parse_size(args.memory_budget, "memory_budget") if args.memory_budget else None
    gbps = args.disk_gbps or measure_disk(files)
    batch = _auto_batch(files, budget, args.context, draft, gbps) if auto else int(args.batch_size)
    from .engine import pick_dtype, plan_run  # planned as a run with the defaults plans, compiled kernels and all
    p, _ = plan_run(files, budget, batch, args.context, "auto", pick_dtype("auto"), draft=draft, kv_first=auto)
    blocks = [n for n in p.resident if n.startswith("block_")]
    print(f"memory budget {mib(p.budget)} for batch {batch}, context {args.context}:")
    print(f"  predicted peak   {mib(p.predicted_peak)} = " + " + ".join(f"{k} {mib(v)}" for k, v in p.breakdown().items())
          + f"; {MARGIN:.0%} of the budget held back")
    head = ", and the head" if "head.safetensors" in p.resident else ""
    print(f"  resident         {len(blocks)} of {files.args.n_layers} blocks{head}"
          + (f" ({blocks[0]} .. {blocks[-1]})" if blocks else "")
          + ("" if not p.resident else ", as mapped file pages (no memory cgroup)" if p.mapped
             else ", in private memory (a memory cgroup's limit applies)" if cgroup_limit() is not None
             else f", in private memory ({files.quantize}'s native kernel reads private pages faster)")
          + ("; their int4 matrices copied whole into private memory"
             if p.resident and files.quantize == "int4" and not quant.int4_native() else ""))
    print(f"  read per step    {p.bytes_per_step / 1e9:.2f} GB; prefill passes of up to {p.max_pass_tokens} tokens")
    if draft:
        print(f"  draft model      {draft.folder.name}, whole in RAM: {mib(p.draft)} (weights, activations, KV)")
    whole = files.args.n_layers * p.kv_block
    print("  KV cache         " + (f"in RAM ({mib(p.kv_ram)})" if p.kv_slots == p.batch else
                                    f"{p.kv_slots} of {p.batch} sequences' in RAM ({mib(p.kv_ram)}), the rest on disk "
                                    f"({mib(whole - p.kv_ram)}), one block's in RAM at a time" if p.kv_slots else
                                    f"on disk ({mib(whole)}), one block's in RAM at a time"))
    print(f"  disk-bound floor {p.bytes_per_step / 1e9 / gbps:.2f} s per decode step at {gbps:.2f} GB/s"
          + ("" if args.disk_gbps else " (measured)"))
    return 0


def _auto_batch(files: ModelFiles, budget: int | None, context: int, draft, gbps: float) -> int:
    """Print what `--batch-size auto` weighs for a large job (costs.choose_batch) and return its pick."""
    from .costs import AUTO_BATCH_MAX, choose_batch
    from .engine import pick_dtype
    dtype = pick_dtype("auto")
    size, costs = choose_batch(files, budget, AUTO_BATCH_MAX, context, dtype, draft=draft, disk_gbps=gbps)
    print(f"batch size auto, for {AUTO_BATCH_MAX} or more prompts of up to {context} tokens ({str(dtype).removeprefix('torch.')}, "
          f"disk {gbps:.2f} GB/s): {size}")
    print("  batch  read s  matmul s  step s  decode tokens/s  KV read from disk")
    for c in costs:
        print(f"  {c.batch:>5}  {c.read_s:>6.2f}  {c.compute_s:>8.2f}  {c.step_s:>6.2f}  {c.tokens_per_s:>15.2f}  "
              f"{mib(c.kv_disk_bytes) if c.kv_disk_bytes else '-'}" + ("  <- picked" if c.batch == size else ""))
    return size
