"""The streaming runner: one block mapped at a time, applied to every sequence's rows, then evicted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import model
from .kvcache import KVCache
from .layout import ModelFiles
from .memory import MemoryMonitor
from .model import Seq


@dataclass
class IOStats:
    bytes_read: int = 0  # bytes of weight files touched, embedding rows included
    forwards: int = 0


class Runner:
    """Runs packed chunks of tokens through the streamed model, keeping keys and values in `cache`."""

    def __init__(self, files: ModelFiles, dtype: torch.dtype, monitor: MemoryMonitor | None = None,
                 prefetch: bool = True):
        self.files, self.args, self.dtype = files, files.args, dtype
        self.freqs = model.rope_frequencies(self.args)
        self.monitor = monitor
        self.prefetch = prefetch
        self.io = IOStats()

    def _phase(self, name: str) -> None:
        if self.monitor:
            self.monitor.set_phase(name)

    def forward(self, chunks: Sequence[tuple[int, Sequence[int]]], cache: KVCache, phase: str = "forward") -> torch.Tensor:
        """chunks: (slot, new token ids) per sequence; each continues where its slot's cache ends.
        Returns float32 logits [len(chunks), vocab] for the last new token of each chunk."""
        seqs, ids, positions, row = [], [], [], 0
        for slot, new in chunks:
            start = len(cache.tokens[slot])
            seqs.append(Seq(slot, start, slice(row, row + len(new))))
            ids += new
            positions += range(start, start + len(new))
            row += len(new)
        self._phase(phase)
        x = self._embed(torch.tensor(ids))  # [N, dim]
        rot = model.rope_rotations(self.freqs, torch.tensor(positions))  # [N, hd/2]
        f = self.files.block(0)
        for i in range(self.args.n_layers):
            nxt = self.files.block(i + 1) if i + 1 < self.args.n_layers else self.files.open("head.safetensors")
            if self.prefetch:
                nxt.prefetch()  # the kernel reads it while this block computes
            with cache.layer(i) as kv:
                x = model.block(x, f, rot, kv, seqs, self.args)
            self._done(f)
            f = nxt
        self._phase("head")
        last = torch.tensor([s.rows.stop - 1 for s in seqs])
        out = model.logits(x[last], f["norm"], f["output"], self.args.norm_eps)
        self._done(f)
        for (slot, new) in chunks:
            cache.tokens[slot] += list(new)
        cache.commit()
        self.io.forwards += 1
        return out

    def _done(self, f) -> None:
        f.evict()
        self.io.bytes_read += f.nbytes

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Gather only the needed rows of the mapped embedding table."""
        emb = self.files.open("embedding.safetensors")
        table = emb["tok_embeddings"]
        x = table[ids].to(self.dtype)
        self.io.bytes_read += ids.numel() * table.shape[1] * table.element_size()
        emb.evict()
        return x
