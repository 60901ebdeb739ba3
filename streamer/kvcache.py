"""KV caches. While block i runs, the runner holds only block i's cache for the sequences of the pass;
the block math gets it as a tensor and does no I/O.

Each block's cache is laid out as
    [2 (keys after RoPE, values), slots, max_seq, n_kv_heads, head_dim]   in the compute dtype,
so a sequence's positions are contiguous. DiskKVCache keeps one sparse, preallocated file per block
(only written positions take disk space) plus a small JSON header naming the model, dtype, layout and
the token ids each slot holds, so that a kept cache can be resumed and a foreign one refused. It reads
exactly the cached positions a pass attends over and writes back exactly the new ones (pread/pwrite:
a mapping would read ahead megabytes around every touched page), then drops them from the page cache.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from .args import ModelArgs
from .errors import StreamerError
from .files import drop_cache, write_json_atomic

KV_FORMAT = "streamer-kv"
KV_VERSION = 1
LAYOUT = "[2, slots, max_seq, n_kv_heads, head_dim]"
HEADER = "kv.json"


class KVCache:
    """Interface: `layer(i)` yields block i's cache tensor; `tokens[slot]` lists the ids it holds."""

    def __init__(self, args: ModelArgs, slots: int, max_seq: int, dtype: torch.dtype):
        self.args, self.slots, self.max_seq, self.dtype = args, slots, max_seq, dtype
        self.shape = (2, slots, max_seq, args.n_kv_heads, args.head_dim)
        self.tokens: list[list[int]] = [[] for _ in range(slots)]
        self._scratch: torch.Tensor | None = None  # layer()'s copy of a block's cache, kept for the next block

    @property
    def layer_bytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize

    @contextlib.contextmanager
    def layer(self, i: int, seqs: list[tuple[int, int, int]]):
        """Block i's cache for the pass's sequences (slot, start, end): a tensor [2, rows, max end, KV, hd]
        in which sequence k's row is rows(slots)[k], holding positions [0, start) of each; the block writes
        [start, end), saved on exit. Positions past a sequence's end hold finite values, zeros or keys it no
        longer holds (decode attention masks them, and a masked NaN would still spread). Where the slots'
        cache is in RAM it is the cache itself (_view: the slots from the lowest to the highest), written in
        place: no copies. Else a copy, one row per sequence, in a buffer kept for the next block (a new one
        every block faulted in 160 MiB at 128 sequences of 320 tokens, 8B shapes)."""
        shape = (2, len(seqs), max(e for _, _, e in seqs), self.args.n_kv_heads, self.args.head_dim)
        slots = [slot for slot, _, _ in seqs]
        if self._in_ram(slots):
            yield self._view(i, min(slots), max(slots) + 1, shape[2])
            return
        kv = self._buffer(shape)
        for row, (slot, start, end) in enumerate(seqs):
            if start:
                self._read(i, slot, 0, start, kv[:, row, :start])
            kv[:, row, end:].zero_()
        yield kv
        for row, (slot, start, end) in enumerate(seqs):
            self._write(i, slot, start, kv[:, row, start:end])
        self._done(i)

    def rows(self, slots: list[int]) -> list[int]:
        """Each slot's row in the tensor layer() yields for a pass over these slots: its offset from the lowest
        slot where that tensor is the cache itself (_in_ram), else its place in the pass."""
        lo = min(slots)
        return [s - lo for s in slots] if self._in_ram(slots) else list(range(len(slots)))

    def _in_ram(self, slots: list[int]) -> bool:
        """Whether all these slots' cache is in RAM, so that _view gives it without copying."""
        return False

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        if self._scratch is None or self._scratch.numel() < n:
            self._scratch = None  # the old one goes before the new one comes
            self._scratch = torch.empty(n, dtype=self.dtype)
        return self._scratch[:n].view(shape)

    def _done(self, i: int) -> None:
        pass

    def _view(self, i: int, lo: int, hi: int, end: int) -> torch.Tensor:
        """Block i's cache of slots lo..hi-1, first `end` positions, itself (only where _in_ram)."""
        raise NotImplementedError

    def keep_rows(self, slot: int, start: int, rows: list[int]) -> None:
        """Keep, after the slot's first `start` positions, only the given rows of those that follow (ascending
        offsets from start), moved up to sit right after them: the accepted path of a draft tree, whose
        rejected branches leave nothing behind. Then commit."""
        held = self.tokens[slot]
        if rows != list(range(len(rows))):  # a path off the first branch: move its keys and values up
            self._copy(slot, start, slot, start, rows)
        elif len(held) == start + len(rows):
            return
        self.tokens[slot] = held[:start] + [held[start + r] for r in rows]
        self.commit()

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Give slot dst the first n positions of slot src (a prompt prefix both share)."""
        self._copy(src, 0, dst, 0, list(range(n)))
        self.tokens[dst] = self.tokens[src][:n]

    def _copy(self, src: int, begin: int, dst: int, at: int, rows: list[int]) -> None:
        """In every block: positions begin + rows of slot src, to at, at + 1, ... of slot dst."""
        span = rows[-1] + 1
        for i in range(self.args.n_layers):
            kv = torch.empty(2, span, self.args.n_kv_heads, self.args.head_dim, dtype=self.dtype)
            self._read(i, src, begin, begin + span, kv)
            self._write(i, dst, at, kv if len(rows) == span else kv[:, rows])
            self._done(i)

    def reserve(self, slot: int, length: int) -> None:
        """Make room for `length` positions in `slot` before any work starts."""
        if length > self.max_seq:
            raise StreamerError(f"{self.max_seq} is too short for a sequence of {length} tokens (prompt + new tokens)",
                                param="max_seq_len")

    def commit(self) -> None:
        """Called after every forward pass, once all blocks hold the new positions."""

    def close(self) -> None:
        pass


class MemoryKVCache(KVCache):
    """The cache in RAM: for tests and references."""

    def __init__(self, args, slots, max_seq, dtype):
        super().__init__(args, slots, max_seq, dtype)
        self.layers = [torch.zeros(self.shape, dtype=dtype) for _ in range(args.n_layers)]

    def _read(self, i, slot, begin, end, out):
        out.copy_(self.layers[i][:, slot, begin:end])

    def _write(self, i, slot, start, new):
        self.layers[i][:, slot, start:start + new.shape[1]] = new

    def _in_ram(self, slots):
        return True

    def _view(self, i, lo, hi, end):
        return self.layers[i][:, lo:hi, :end]


class SplitKVCache(KVCache):
    """The first `ram_slots` slots' keys and values in RAM, the other slots' on disk (a temporary DiskKVCache):
    what the plan places when the whole cache does not fit the budget but some sequences' rows do."""

    def __init__(self, ram: MemoryKVCache, disk: "DiskKVCache"):
        super().__init__(ram.args, ram.slots + disk.slots, min(ram.max_seq, disk.max_seq), ram.dtype)
        self.ram, self.disk = ram, disk

    def _part(self, slot: int) -> tuple[KVCache, int]:
        return (self.ram, slot) if slot < self.ram.slots else (self.disk, slot - self.ram.slots)

    def _read(self, i, slot, begin, end, out):
        cache, s = self._part(slot)
        cache._read(i, s, begin, end, out)

    def _write(self, i, slot, start, new):
        cache, s = self._part(slot)
        cache._write(i, s, start, new)

    def _done(self, i):
        self.disk._done(i)

    def _in_ram(self, slots):
        return max(slots) < self.ram.slots

    def _view(self, i, lo, hi, end):
        return self.ram._view(i, lo, hi, end)

    def reserve(self, slot, length):
        super().reserve(slot, length)
        cache, s = self._part(slot)
        cache.reserve(s, length)

    def close(self):
        self.disk.close()


class DiskKVCache(KVCache):
    """One sparse file per block, read and written with pread/pwrite: only the running block's cached
    positions are in RAM, and its pages are dropped from the page cache when the block is done, so
    contexts need not fit in RAM. With `directory=None` it lives in a temporary folder removed on close;
    otherwise it is kept, with a header that lets a later run resume from it."""

    def __init__(self, args: ModelArgs, slots: int, max_seq: int, dtype: torch.dtype,
                 model_sha256: str, directory: Path | None = None):
        super().__init__(args, slots, max_seq, dtype)
        self.model_sha256 = model_sha256
        self._fds: dict[int, int] = {}
        self.keep = directory is not None
        self.dir = Path(directory) if self.keep else Path(tempfile.mkdtemp(prefix="streamer-kv-"))
        # a temporary folder goes with the cache even if close() is never called (garbage collection, exit)
        self._removal = None if self.keep else weakref.finalize(self, _remove, self._fds, self.dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise StreamerError(f"{self.dir}: exists and is not a folder (the KV cache needs a folder)")
        self.dir.mkdir(parents=True, exist_ok=True)
        header = self.dir / HEADER
        if header.exists():
            self._adopt(header)
        else:
            self._create()

    def _path(self, i: int) -> Path:
        return self.dir / f"block_{i:03d}.kv"

    def _header(self) -> dict:
        return {"format": KV_FORMAT, "version": KV_VERSION, "model_manifest_sha256": self.model_sha256,
                "dtype": str(self.dtype).removeprefix("torch."), "layout": LAYOUT, "shape": list(self.shape),
                "n_layers": self.args.n_layers, "tokens": self.tokens}

    def _create(self) -> None:
        try:
            for i in range(self.args.n_layers):
                with open(self._path(i), "wb") as f:
                    f.truncate(self.layer_bytes)  # sparse: disk is used only where positions are written
            if self.keep:
                write_json_atomic(self.dir / HEADER, self._header())
        except OSError as e:
            raise StreamerError(f"{self.dir}: cannot create the KV cache ({e.strerror})") from None

    def _adopt(self, path: Path) -> None:
        """Take over a kept cache, refusing one written for another model, dtype or layout."""
        try:
            h = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise StreamerError(f"{path}: unreadable KV cache header; remove {self.dir} to start afresh") from None
        want = self._header()
        for key in ("format", "version", "model_manifest_sha256", "dtype", "layout", "n_layers"):
            if h.get(key) != want[key]:
                raise StreamerError(f"{self.dir}: KV cache was written for another {key.replace('_', ' ')} "
                                    f"({h.get(key)!r}, this run needs {want[key]!r}); use another folder or remove it")
        if h.get("shape", [])[:2] != want["shape"][:2] or h["shape"][3:] != want["shape"][3:]:
            raise StreamerError(f"{self.dir}: KV cache has shape {h.get('shape')}, this run needs {want['shape']}")
        self.max_seq = h["shape"][2]
        self.shape = tuple(h["shape"])
        self.tokens = [list(t) for t in h["tokens"]]
        for i in range(self.args.n_layers):
            p = self._path(i)
            if not p.is_file() or p.stat().st_size != self.layer_bytes:
                raise StreamerError(f"{p}: missing or wrong size for the KV cache in {self.dir}")

    def reserve(self, slot: int, length: int) -> None:
        """Allocate the slot's disk blocks now, so a full disk is a clear error here, before any compute,
        and never a failed write in the middle of a pass."""
        super().reserve(slot, length)
        row = self.args.n_kv_heads * self.args.head_dim * self.dtype.itemsize
        try:
            for i in range(self.args.n_layers):
                fd = os.open(self._path(i), os.O_RDWR)
                try:
                    for kv in (0, 1):
                        os.posix_fallocate(fd, ((kv * self.slots + slot) * self.max_seq) * row, length * row)
                finally:
                    os.close(fd)
        except OSError as e:
            raise StreamerError(f"{self.dir}: cannot reserve {2 * length * row * self.args.n_layers / 1e6:.1f} MB "
                                f"for the KV cache ({e.strerror})") from None

    def _offset(self, kv: int, slot: int, pos: int) -> int:
        row = self.args.n_kv_heads * self.args.head_dim * self.dtype.itemsize
        return ((kv * self.slots + slot) * self.max_seq + pos) * row

    def _fd(self, i: int) -> int:
        if i not in self._fds:
            self._fds[i] = os.open(self._path(i), os.O_RDWR)
        return self._fds[i]

    def _read(self, i, slot, begin, end, out):
        fd = self._fd(i)
        for kv in (0, 1):
            buf = out[kv].view(-1).view(torch.uint8).numpy()  # a contiguous row of the slice: read in place
            if os.preadv(fd, [buf], self._offset(kv, slot, begin)) != buf.nbytes:
                raise StreamerError(f"{self._path(i)}: KV cache file is shorter than its header says")

    def _write(self, i, slot, start, new):
        fd = self._fd(i)
        try:
            for kv in (0, 1):
                os.pwritev(fd, [new[kv].contiguous().view(-1).view(torch.uint8).numpy()], self._offset(kv, slot, start))
        except OSError as e:
            raise StreamerError(f"{self._path(i)}: KV cache write failed ({e.strerror})") from None

    def _done(self, i: int) -> None:
        drop_cache(self._fd(i))  # clean pages leave now, written ones as soon as they are on disk

    def commit(self) -> None:
        if not self.keep:
            return
        try:
            for i in range(self.args.n_layers):
                os.fdatasync(self._fd(i))
            write_json_atomic(self.dir / HEADER, self._header())
        except OSError as e:
            raise StreamerError(f"{self.dir}: cannot save the KV cache ({e.strerror})") from None

    def close(self) -> None:
        if self._removal is not None:
            self._removal()  # closes the files and removes the temporary folder, once
        else:
            _close(self._fds)


def _close(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def _remove(fds: dict[int, int], folder: Path) -> None:
    _close(fds)
    shutil.rmtree(folder, ignore_errors=True)
