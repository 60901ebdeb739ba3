"""The streaming runner: blocks arrive through the weight stream, each is applied to every sequence's
rows at once, and its buffer goes back to the reader for the blocks ahead."""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch

from . import kernels, model, quant
from .kvcache import KVCache
from .layout import ModelFiles
from .memory import MemoryMonitor, trim_page_cache
from .model import Seq
from .stream import ResidentFile, StreamedFile, WeightStream, file_pieces, map_whole, read_whole

MAX_PASS_TOKENS = 4096  # longer prompts are prefilled in several passes, bounding activation memory


@dataclass
class IOStats:
    bytes_read: int = 0  # weight bytes read from disk: resident files once, streamed files every pass, embedding rows
    resident_bytes: int = 0  # of which: files read once and kept in RAM
    forwards: int = 0  # forward() calls
    passes: int = 0  # passes over the weights (a long prompt may take several per forward)
    tokens: int = 0  # tokens run through the blocks


class Runner:
    """Runs packed chunks of tokens through the streamed model, keeping keys and values in `cache`.

    ring_bytes bounds the memory the streamed weights take; `resident` names files kept in RAM;
    compile=True runs the one-row matmuls, the decode attention and int4 tiles on the compiled kernels
    (kernels.py), once they are compiled (in the background, from the start; a decode pass waits for them, a
    prefill does not; compile_first=True waits for them before loading resident files, for a budget that leaves
    the compiler no room beside those, Engine's COMPILE_MEMORY);
    mapped=True keeps resident files as their mapped pages instead of private copies
    (stream.map_whole); batch, the most sequences a pass decodes (0: any), spares a batch of one the compile
    of a kernel it never calls (kernels.warm_up)."""

    def __init__(self, files: ModelFiles, dtype: torch.dtype, monitor: MemoryMonitor | None = None,
                 ring_bytes: int = 0, readers: int = 4, resident: Sequence[str] = (),
                 max_pass_tokens: int = MAX_PASS_TOKENS, compile: bool = False, compile_first: bool = False,
                 mapped: bool = False, batch: int = 0):
        self.files, self.args, self.dtype = files, files.args, dtype
        self.freqs = model.rope_frequencies(self.args)
        self.monitor = monitor
        self.io = IOStats()
        self.max_pass_tokens = max_pass_tokens
        self.compiled = compile
        self.names = files.step_files()  # blocks, then the head
        pieces = {n: file_pieces(files.folder / n, files.headers[n]) for n in self.names}
        self.resident = [n for n in self.names if n in resident]
        streamed = [n for n in self.names if n not in resident]
        self.stream = (WeightStream([(files.folder / n, pieces[n]) for n in streamed], ring_bytes, readers)
                       if streamed else None)
        # each file's view, built once: resident files hold their tensors, streamed ones take from the ring
        # the decode kernels compile while the files load, not in the first decode step (6-8 s there before)
        heads = (self.args.n_heads, self.args.n_kv_heads, self.args.head_dim)
        self._warm = None
        if compile:
            tiles = _int4_tiles(files.headers[n] for n in self.names)
            self._warm = _background(kernels.warm_up, self.args.dim, dtype, heads, tiles, batch)
            if compile_first and self.resident:
                self._warm.result()
        loaded = {}
        with ThreadPoolExecutor(1, thread_name_prefix="streamer-load") as reader:  # reads ahead while each file
            for n, (buf, was_mapped) in zip(self.resident, reader.map(              # read is taken in here
                    lambda n: _load(files.folder / n, mapped), self.resident)):
                loaded[n] = ResidentFile(buf, pieces[n], dtype, mapped=was_mapped)
        self.views = {n: loaded[n] if n in loaded else StreamedFile(self.stream, pieces[n]) for n in self.names}
        self.streamed_bytes = sum(files.files[n]["bytes"] for n in streamed)
        self.io.resident_bytes = self.io.bytes_read = sum(files.files[n]["bytes"] for n in self.resident)
        index, start = files.headers["embedding.safetensors"]
        dt, shape, begin, _ = index["tok_embeddings"]
        self._emb = (os.open(files.folder / "embedding.safetensors", os.O_RDONLY), dt, shape[1], start + begin)
        trim_page_cache()

    def _phase(self, name: str) -> None:
        if self.monitor:
            self.monitor.set_phase(name)

    def forward(self, chunks: Sequence[tuple[int, Sequence[int]]], cache: KVCache, phase: str = "forward",
                every: bool = False) -> torch.Tensor:
        """chunks: (slot, new token ids) per sequence; each continues where its slot's cache ends.
        Returns float32 logits [len(chunks), vocab] for the last new token of each chunk, or with every=True
        for every new token, [total new tokens, vocab] in order (one pass: speculative verification).
        With every=True a chunk may be (slot, ids, positions, mask): its tokens' positions, and the keys each
        sees (bool [len(ids), cached + len(ids)]), for a tree of drafts (speculative.tree_layout)."""
        if every:
            n = sum(len(c[1]) for c in chunks)
            if n > self.max_pass_tokens:
                raise ValueError(f"every=True needs one pass: {n} tokens > {self.max_pass_tokens}")
            logits = self._pass(chunks, cache, phase, list(range(len(chunks))), every)
            cache.commit()
            self.io.forwards += 1
            return logits
        out = torch.empty(len(chunks), self.args.vocab_size)
        decode = all(len(ids) == 1 for _, ids in chunks)  # one new token per sequence: no prefill in this forward
        if self._warm is not None and (decode or self._warm.done()):  # the first token never waits for compiling
            self._warm, warm = None, self._warm
            warm.result()
        for part in _passes(chunks, self.max_pass_tokens):
            want = [i for i, (_, _, last) in enumerate(part) if last]
            with kernels.use_compiled(self.compiled and self._warm is None):
                logits = self._pass([c for _, c, _ in part], cache, phase, want)
            for i, row in zip(want, logits):
                out[part[i][0]] = row
        cache.commit()
        self.io.forwards += 1
        return out

    def _pass(self, chunks, cache: KVCache, phase: str, want: list[int], every: bool = False) -> torch.Tensor:
        seqs, spans, ids, positions, row = [], [], [], [], 0
        kv_rows = cache.rows([slot for slot, *_ in chunks])  # each sequence's row in the blocks' cache tensors
        for k, (slot, new, *tree) in enumerate(chunks):
            start = len(cache.tokens[slot])
            where, mask = tree or (range(start, start + len(new)), None)
            seqs.append(Seq(kv_rows[k], start, slice(row, row + len(new)), mask))
            spans.append((slot, start, start + len(new)))
            ids += new
            positions += where
            row += len(new)
        self._phase(phase)
        x = self._embed(ids)  # [N, dim]
        rot = model.rope_rotations(self.freqs, torch.tensor(positions))  # [N, hd/2]
        for i in range(self.args.n_layers):
            w = self.views[self.names[i]]
            with cache.layer(i, spans) as kv:
                x = model.block(x, w, rot, kv, seqs, self.args)
            w.done()
        self._phase("head")
        head = self.views["head.safetensors"]
        if want:
            last = (torch.tensor([r for i in want for r in range(seqs[i].rows.start, seqs[i].rows.stop)]) if every
                    else torch.tensor([seqs[i].rows.stop - 1 for i in want]))
            logits = model.logits(x[last], head, self.args.norm_eps)
        else:
            head.drain()
            logits = torch.empty(0, self.args.vocab_size)
        head.done()
        for slot, new, *_ in chunks:
            cache.tokens[slot] += list(new)
        self.io.bytes_read += self.streamed_bytes
        self.io.passes += 1
        self.io.tokens += len(ids)
        return logits

    def _embed(self, ids: list[int]) -> torch.Tensor:
        """Read only the needed rows of the embedding table."""
        fd, dt, dim, start = self._emb
        row = dim * dt.itemsize
        buf = bytearray(row * len(ids))
        for k, t in enumerate(ids):
            os.preadv(fd, [memoryview(buf)[k * row:(k + 1) * row]], start + t * row)
        self.io.bytes_read += len(buf)
        return torch.frombuffer(buf, dtype=dt).view(len(ids), dim).to(self.dtype)

    def close(self) -> None:
        if self.stream:
            self.stream.close()
            self.stream = None
        self.views = {}  # resident blocks go with them
        os.close(self._emb[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _passes(chunks, limit: int):
    """Split chunks into passes of at most `limit` tokens; a sequence may continue in the next pass.
    Yields lists of (chunk index, (slot, ids), is_its_last_part)."""
    part, used = [], 0
    for k, (slot, ids) in enumerate(chunks):
        ids = list(ids)
        while ids:
            take = ids[:max(1, limit - used)] if used < limit else []
            if not take:
                yield part
                part, used = [], 0
                continue
            ids = ids[len(take):]
            part.append((k, (slot, take), not ids))
            used += len(take)
    if part:
        yield part


def _int4_tiles(headers) -> set[tuple[int, int, int, int]]:
    """The (rows, in, group, out) of the tiles the files' int4 matrices are converted in at many rows (quant.qlinear):
    each NAME.sz [in / group, out, 2] beside its codes NAME [out, in / 2]."""
    tiles = set()
    for index, _ in headers:
        for name, (_, shape, *_) in index.items():
            if name.endswith(".sz"):
                inp = 2 * index[name.removesuffix(".sz")][1][1]
                tiles |= quant.int4_tile_shapes(shape[1], inp, inp // shape[0])
    return tiles


def _load(path, mapped: bool) -> tuple[torch.Tensor, bool]:
    """A resident file's bytes: its mapped pages where asked and the kernel can populate them, else a private copy."""
    buf = map_whole(path) if mapped else None
    return (buf, True) if buf is not None else (read_whole(path), False)


def _background(fn, *args) -> Future:
    pool = ThreadPoolExecutor(1, thread_name_prefix="streamer-warm-up")
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future
