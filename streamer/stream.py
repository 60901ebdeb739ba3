"""Weight streaming: a reader thread keeps the next pieces of the model coming into a bounded ring buffer.

The runner consumes tensors in exactly the order the files store them (layout.py), step after step.
A filler thread walks that same order, cyclically and across token steps, and reads each piece into
the ring as soon as there is room, with large aligned preads split over a few reader threads
(O_DIRECT where the filesystem allows it, so the page cache is neither filled nor charged). The ring's
size is the memory the weights may take; blocks kept resident (a memory budget) are read once and
never again: into private memory under a memory cgroup, whose limit they must count against honestly, or
else as the file's own mapped pages, which cost one cold read and no copy.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import kernels, quant
from .errors import StreamerError
from .quant import Int4Weight, Int8Weight
from .files import drop_cache
from .weights import PAD

ALIGN = 4096
READ_CHUNK = 16 << 20  # bytes per pread; measured here: 16 MiB over 4 readers matched a cold sequential read
MADV_POPULATE_READ = 22  # Linux 5.14+; not in Python's mmap module


@dataclass
class Piece:
    file: int  # index into the stream's files
    name: str
    dtype: torch.dtype
    shape: tuple
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def span(self) -> tuple[int, int]:
        """The aligned byte range that holds it."""
        return self.offset // ALIGN * ALIGN, -(-(self.offset + self.nbytes) // ALIGN) * ALIGN


@dataclass
class _Region:
    piece: Piece
    start: int  # where its span starts in the ring
    length: int
    ready: threading.Event = field(default_factory=threading.Event)
    pending: int = 0
    error: BaseException | None = None


def file_pieces(path: Path, header) -> list[Piece]:
    index, data_start = header
    items = sorted(index.items(), key=lambda kv: kv[1][2])
    return [Piece(-1, n, dt, shape, data_start + b, e - b) for n, (dt, shape, b, e) in items if not n.startswith(PAD)]


def min_ring_bytes(pieces: list[Piece]) -> int:
    """The smallest ring that cannot deadlock, doubled so reading can overlap compute: the consumer holds
    at most one group at a time (a piece, or an FFN slice's three), and a piece that does not fit before
    the end of the ring wraps to its start, wasting less than its own size."""
    spans = {q.name: q.span[1] - q.span[0] for q in pieces}
    biggest = max(spans.values(), default=ALIGN)
    group = max((sum(v for k, v in spans.items() if k.startswith(g + ".")) for g in
                 {n.rsplit(".", 1)[0] for n in spans if n.startswith("ffn.")}), default=0)
    return 2 * (max(group, biggest) + biggest) + 4 * ALIGN


def pread_full(fd: int, dst: memoryview, offset: int) -> int:
    """Fill `dst` from `offset`, retrying short reads; returns the bytes read (fewer only at the end of the file,
    where an aligned read's padding is missing)."""
    got = 0
    while got < len(dst) and (n := os.preadv(fd, [dst[got:]], offset + got)):
        got += n
    return got


def _open(path: Path, direct: bool) -> tuple[int, bool]:
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass
    return os.open(path, os.O_RDONLY), False


class WeightStream:
    """Pieces of `files` (in order, cyclically) read ahead into a ring of `ring_bytes`."""

    def __init__(self, files: list[tuple[Path, list[Piece]]], ring_bytes: int, readers: int = 4, direct: bool = True):
        self.paths = [p for p, _ in files]
        self.order = [Piece(i, q.name, q.dtype, q.shape, q.offset, q.nbytes) for i, (_, ps) in enumerate(files) for q in ps]
        self.size = max(int(ring_bytes) // ALIGN * ALIGN, min_ring_bytes(self.order))
        # private anonymous memory, page aligned as O_DIRECT needs; in huge pages where the kernel has them, and
        # touched now: first-touch faults cost ~0.3 s per GiB, which would otherwise land in the first step
        self.ring = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.ring.madvise(mmap.MADV_HUGEPAGE)
        self.view = torch.frombuffer(self.ring, dtype=torch.uint8)
        self.view.fill_(0)
        opened = [_open(p, direct) for p in self.paths]
        self.fds = [fd for fd, _ in opened]
        self.direct = all(d for _, d in opened)
        self.pool = ThreadPoolExecutor(max_workers=max(1, readers), thread_name_prefix="streamer-read")
        self.cond = threading.Condition()
        self.regions: list[_Region] = []  # ring regions allocated and not yet released, oldest first
        self.taken: list[_Region] = []
        self._queued = 0
        self._stop = False
        self.filler = threading.Thread(target=self._fill, name="streamer-fill", daemon=True)  # starts at the first take

    # --- producer ---------------------------------------------------------------------------------------
    def _room(self, length: int) -> int | None:
        """Ring offset for `length` bytes after the newest region, if free (regions are freed oldest first)."""
        if not self.regions:
            return 0
        head = self.regions[-1].start + self.regions[-1].length
        tail = self.regions[0].start
        if head > tail:  # in use: [tail, head); free: [head, size) and [0, tail)
            if head + length <= self.size:
                return head
            return 0 if length <= tail else None
        return head if head + length <= tail else None  # wrapped: free is [head, tail)

    def _fill(self) -> None:
        n = len(self.order)
        while True:
            piece = self.order[self._queued % n]
            a, b = piece.span
            with self.cond:
                while not self._stop and (pos := self._room(b - a)) is None:
                    self.cond.wait()
                if self._stop:
                    return
                region = _Region(piece, pos, b - a)
                self.regions.append(region)
                self._queued += 1
                self.cond.notify_all()
            chunks = [(off, min(READ_CHUNK, b - off)) for off in range(a, b, READ_CHUNK)]
            region.pending = len(chunks)
            for off, length in chunks:
                self.pool.submit(self._read, region, off, length)

    def _read(self, region: _Region, off: int, length: int) -> None:
        try:
            fd = self.fds[region.piece.file]
            got = pread_full(fd, memoryview(self.ring)[region.start + off - region.piece.span[0]:][:length], off)
            if not self.direct:
                os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
            if off + got < region.piece.offset + region.piece.nbytes and got < length:
                raise StreamerError(f"{self.paths[region.piece.file]}: file ended early while reading {region.piece.name!r}")
        except BaseException as e:  # surfaced to the consumer, which names the file
            region.error = e if isinstance(e, StreamerError) else StreamerError(
                f"{self.paths[region.piece.file]}: read failed ({getattr(e, 'strerror', None) or e})")
        with self.cond:
            region.pending -= 1
            if region.pending == 0:
                region.ready.set()

    # --- consumer ---------------------------------------------------------------------------------------
    def take(self, name: str) -> torch.Tensor:
        """The next piece in stream order, which must be `name`; waits until it has been read."""
        if self.filler.ident is None:
            self.filler.start()
        with self.cond:
            while len(self.regions) <= len(self.taken):  # not even queued yet
                self.cond.wait()
            region = self.regions[len(self.taken)]
        if region.piece.name != name:
            raise StreamerError(f"{self.paths[region.piece.file]}: expected tensor {name!r} next, the file has "
                                f"{region.piece.name!r} (a layout from another streamer version?)")
        region.ready.wait()
        if region.error:
            raise region.error
        self.taken.append(region)
        q = region.piece
        begin = region.start + q.offset - q.span[0]
        return self.view[begin:begin + q.nbytes].view(q.dtype).view(q.shape)

    def release(self) -> None:
        """Everything taken so far is no longer used: its ring space goes back to the reader."""
        with self.cond:
            del self.regions[:len(self.taken)]
            self.taken.clear()
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        if self.filler.ident is not None:
            self.filler.join()
        self.pool.shutdown(wait=True)
        for fd in self.fds:
            os.close(fd)
        # give the ring's memory back now, not when the last tensor viewing it is collected
        self.ring.madvise(mmap.MADV_DONTNEED)


class FileView:
    """One file's tensors by name, in file order. A name stored in pieces ("wqkv" as wqkv.0, wqkv.1, ...)
    yields its pieces; "ffn" yields (w1, w3, w2) per hidden slice. Asking for the next name, or the next
    piece, releases what was taken before: the block math never reuses a weight it has moved past."""

    def __init__(self, pieces: list[Piece]):
        every = [p.name for p in pieces]
        self.companions = {n: c for n in every for c in (n + ".scale", n + ".sz") if c in every}
        self.names = [n for n in every if not n.endswith((".scale", ".sz"))]
        self.pieced: dict[str, list[str]] = {}  # "wqkv" -> ["wqkv.0", "wqkv.1", ...]
        for n in self.names:
            self.pieced.setdefault(n.rsplit(".", 1)[0], []).append(n)
        self.ffn = sorted({n.rsplit(".", 1)[0] for n in self.names if n.startswith("ffn.")}, key=lambda g: int(g.split(".")[1]))

    def _weight(self, name: str):
        """A tensor, or quantized codes with their scales (quant.py)."""
        w = self._take(name)
        c = self.companions.get(name)
        if c is None:
            return w
        return (Int8Weight if c.endswith(".scale") else Int4Weight)(w, self._take(c))

    def __getitem__(self, name: str):
        if name == "ffn":
            return self._group(self.ffn, (".w1", ".w3", ".w2"))
        if name in self.pieced and name not in self.names:
            return self._group(self.pieced[name], ("",))
        self._release()
        return self._weight(name)

    def _group(self, prefixes, suffixes):
        for prefix in prefixes:
            self._release()
            got = tuple(self._weight(prefix + s) for s in suffixes)
            yield got if len(got) > 1 else got[0]

    def done(self) -> None:
        self._release()

    def drain(self) -> None:
        """Skip this file's tensors (nothing needs them this pass) while keeping the stream in order."""
        for name in self.names:
            self._release()
            self._weight(name)
        self._release()


class StreamedFile(FileView):
    def __init__(self, stream: WeightStream, pieces: list[Piece]):
        super().__init__(pieces)
        self.stream = stream

    def _take(self, name: str) -> torch.Tensor:
        return self.stream.take(name)

    def _release(self) -> None:
        self.stream.release()


def read_whole(path: Path, readers: int = 4) -> torch.Tensor:
    """The whole file, as uint8, in private page-aligned memory, read like the ring: 16 MiB preads over
    `readers` threads, O_DIRECT where the filesystem allows it, so no page cache is filled, charged or copied
    from. No huge pages: with the kernel's usual defrag=madvise they compact memory synchronously, and loading
    the resident 8B took 22.9 s (40 s of system time) with them against 15.6-17.8 s without."""
    size = os.path.getsize(path)
    buf = mmap.mmap(-1, max(ALIGN, -(-size // ALIGN) * ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fd, direct = _open(path, direct=True)

    def read(off: int) -> None:
        got = pread_full(fd, memoryview(buf)[off:off + READ_CHUNK], off)
        if got < min(READ_CHUNK, size - off):
            raise StreamerError(f"{path}: file ended early at byte {off + got} of {size}")

    try:
        with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="streamer-load") as pool:
            list(pool.map(read, range(0, size, READ_CHUNK)))
    except OSError as e:
        raise StreamerError(f"{path}: read failed ({e.strerror or e})") from None
    finally:
        if not direct:
            drop_cache(fd)
        os.close(fd)
    return torch.frombuffer(buf, dtype=torch.uint8)[:size]


def map_whole(path: Path) -> torch.Tensor | None:
    """The whole file, as uint8, mapped copy-on-write and read in at once (MADV_POPULATE_READ, with the
    kernel's read-ahead): the pages stay the page cache's, so no copy is made and no memory zeroed, and the
    system time is a fraction of read_whole's (0.3-1 s against 16-20 s for the 8B). The kernel may drop such
    pages under pressure and read them again on use. None where the kernel cannot populate a mapping."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        raise StreamerError(f"{path}: cannot map ({e.strerror or e})") from None
    buf = torch.frombuffer(m, dtype=torch.uint8)
    # through ctypes, which lets go of the GIL (mmap.madvise holds it for the whole read)
    if _libc().madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(size), MADV_POPULATE_READ) != 0:
        return None
    return buf


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def touch_pages(buf: torch.Tensor) -> None:
    """Read one byte of every page. A mapped page's first access still cost ~0.25 s/GB here after the
    populate (the hypervisor's own mapping, it seems: no system time shows), and left to the first prefill
    it made that 11 s instead of 2.2 s. Through numpy, which lets go of the GIL while it reads (torch's
    eager ops hold it): the kernels compile meanwhile (Runner). ResidentFile touches what it keeps."""
    int(buf.numpy()[::mmap.PAGESIZE].sum())


class ResidentFile(FileView):
    """A file's bytes, read once and kept (a memory budget's resident blocks): mapped (map_whole) or in
    private memory (read_whole). Quantized weights' scales are converted to the compute dtype once, in
    place (a mapped file copies just those pages), rather than at every matmul: on the int4 kernel that
    took one-row throughput from 9-15 to 16-18 GB/s of codes; the whole pages of their unused second half go back to
    the kernel. Without the native int4 kernel, int4 matrices are copied into whole ones (_joined), so a mapped int4
    file's weights end up in private memory too."""

    def __init__(self, buf: torch.Tensor, pieces: list[Piece], dtype: torch.dtype | None = None,
                 mapped: bool = False):
        super().__init__(pieces)
        self.buf = buf
        self.t = {p.name: self.buf[p.offset:p.offset + p.nbytes].view(p.dtype).view(p.shape) for p in pieces}
        self.spans = {p.name: (p.offset, p.offset + p.nbytes) for p in pieces}
        for name in self.companions.values():
            t = self.t[name]
            if dtype is not None and t.dtype.itemsize > dtype.itemsize:
                converted = t.to(dtype)  # into the first bytes of its own storage, the rest given back
                self.t[name] = t.view(-1).view(torch.uint8)[:converted.numel() * dtype.itemsize].view(dtype).view(t.shape)
                self.t[name].copy_(converted)
                begin, end = self.spans[name]
                self._free(begin + converted.numel() * dtype.itemsize, end)
        self.joined = self._joined(dtype) if dtype is not None else {}
        if mapped:  # what is kept of a mapped file's pages (a joined piece's copy was its first read)
            for t in self.t.values():
                touch_pages(t.view(-1).view(torch.uint8))

    def _joined(self, dtype: torch.dtype) -> dict:
        """Row pieces and FFN slices grouped for one-row products: int8 ones with their scales joined once, for one
        epilogue each (quant.Int8Rows, quant.Int8FFN); bf16 ones, and int4 ones where the native int4 kernel runs
        (quant.int4_native), for one native call each (kernels.NativeRows, kernels.NativeFFN). The FFN's only where
        every slice is whole vectors (64 values; or one slice), so its SiLU rounds every value as the
        slice-at-a-time form does (tails take a scalar loop). Without the native kernel, int4 ones are copied,
        codes and all, into whole matrices for torch's kernel (quant.Int4Rows, quant.Int4FFN), each piece's pages in
        this file given back once it is copied (_give_back), so they take no more memory than before."""
        int8 = lambda ws: all(isinstance(w, Int8Weight) for w in ws)
        int4 = lambda ws: all(isinstance(w, Int4Weight) for w in ws)
        natively = lambda ws: (all(isinstance(w, torch.Tensor) and w.dtype == dtype for w in ws)
                               or (int4(ws) and dtype == torch.bfloat16 and quant.int4_native()))
        joined = {}
        for name, parts in self.pieced.items():
            if name in self.names or name.startswith("ffn."):
                continue
            if int8(ws := [self._weight(n) for n in parts]):
                joined[name] = quant.joined_rows(ws, dtype)
            elif natively(ws) and (rows := kernels.native_rows(ws)) is not None:
                joined[name] = rows
            elif int4(ws) and len(ws) > 1 and quant.int4_rows_joinable(ws):
                joined[name] = quant.join_int4_rows(ws, lambda i, n=parts: self._give_back(n[i]))
        slices = [tuple(self._weight(f + s) for s in (".w1", ".w3", ".w2")) for f in self.ffn]
        every = [w for t in slices for w in t]
        up, down = [t[0] for t in slices] + [t[1] for t in slices], [t[2] for t in slices]
        rows = lambda w: (w.q if isinstance(w, Int8Weight) else w.packed if isinstance(w, Int4Weight) else w).shape[0]
        whole = bool(slices) and (len(slices) == 1 or rows(up[0]) % 64 == 0)
        if whole and int8(every):
            joined["ffn"] = quant.joined_ffn(slices, dtype)
        elif whole and natively(every) and (ffn := kernels.native_ffn(slices)) is not None:
            joined["ffn"] = ffn
        elif len(slices) > 1 and int4(every) and quant.int4_rows_joinable(up) and quant.int4_columns_joinable(down):
            names = [f + s for s in (".w1", ".w3") for f in self.ffn]
            joined["ffn"] = quant.Int4FFN(quant.join_int4_rows(up, lambda i: self._give_back(names[i])).whole,
                                          quant.join_int4_columns(down, lambda i: self._give_back(self.ffn[i] + ".w2")),
                                          up[0].packed.shape[0])
        return joined

    def _give_back(self, name: str) -> None:
        """name's codes and scales are copied elsewhere: their whole pages in this file's buffer go back to the
        kernel (MADV_DONTNEED: freed if private, dropped from this mapping if mapped), and the names are gone."""
        for n in (name, self.companions[name]):
            self._free(*self.spans.pop(n))
            del self.t[n]

    def _free(self, begin: int, end: int) -> None:
        """The whole pages of bytes [begin, end) of this file's buffer back to the kernel (MADV_DONTNEED: freed if
        private, dropped from this mapping if mapped); nothing may read them after."""
        base = self.buf.data_ptr()
        a, b = -(-(base + begin) // mmap.PAGESIZE) * mmap.PAGESIZE, (base + end) // mmap.PAGESIZE * mmap.PAGESIZE
        if b > a:
            _libc().madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), mmap.MADV_DONTNEED)

    def __getitem__(self, name: str):
        return self.joined[name] if name in self.joined else super().__getitem__(name)

    def _take(self, name: str) -> torch.Tensor:
        return self.t[name]

    def _release(self) -> None:
        pass

    def drain(self) -> None:
        pass
