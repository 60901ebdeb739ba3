"""Measuring our own memory honestly: RSS, private (anonymous) and file-backed pages, per phase.

RSS alone misleads: mapped file pages (torch's libraries) count in it, yet the kernel can drop
them at will. Private pages are what a machine must really have; file-backed ones are reclaimable.
"""
from __future__ import annotations

import copy
import os
import resource
import threading
from dataclasses import dataclass, field

from .files import drop_cache

KINDS = ("rss", "private", "file")
NOTE = ("Peak RSS can exceed --memory-budget: it also counts file-backed pages (torch's libraries and other mapped "
        "files), which the kernel may drop and read again. The budget bounds private memory (ring, resident blocks, "
        "activations, the running block's KV cache) plus page cache for the code; under a memory cgroup both count.")


@dataclass
class MemoryReport:
    peak: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))  # bytes
    peak_phase: dict[str, str] = field(default_factory=lambda: dict.fromkeys(KINDS, ""))
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> kind -> peak bytes
    ru_maxrss: int = 0  # the kernel's own high-water mark of RSS, bytes

    def as_dict(self) -> dict:
        return {"peak_rss": self.peak["rss"], "peak_private": self.peak["private"], "peak_file": self.peak["file"],
                "peak_phase": self.peak_phase, "ru_maxrss": self.ru_maxrss, "phases": self.phases}

    def table(self) -> str:
        rows = [f"{'phase':<10} {'peak RSS':>10} {'private':>10} {'file':>10}"]
        for phase, p in self.phases.items():
            rows.append(f"{phase:<10} " + " ".join(f"{p[k] / 2**20:>8.1f}Mi" for k in KINDS))
        rows.append(f"{'overall':<10} " + " ".join(f"{self.peak[k] / 2**20:>8.1f}Mi" for k in KINDS)
                    + f"   (ru_maxrss {self.ru_maxrss / 2**20:.1f}Mi)")
        return "\n".join(rows + [NOTE])

    def summary(self) -> str:
        return ", ".join(f"peak {k} {self.peak[k] / 2**20:.0f} MiB ({self.peak_phase[k]})" for k in KINDS)


class MemoryMonitor:
    """A sampler thread; the runner names the current phase, and every sample is filed under it."""

    def __init__(self, interval: float = 0.01):
        self.phase = "setup"
        self.report = MemoryReport()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        parts = rss_parts()
        with self._lock:
            per = self.report.phases.setdefault(self.phase, dict.fromkeys(KINDS, 0))
            for k, v in parts.items():
                per[k] = max(per[k], v)
                if v > self.report.peak[k]:
                    self.report.peak[k], self.report.peak_phase[k] = v, self.phase

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def set_phase(self, phase: str) -> None:
        self.sample()  # close the previous phase with a fresh sample
        self.phase = phase

    def snapshot(self) -> MemoryReport:
        """The report so far; sampling goes on."""
        self.sample()
        with self._lock:
            report = copy.deepcopy(self.report)
        report.ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return report

    def stop(self) -> MemoryReport:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.report.ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self.report


def rss_parts() -> dict[str, int]:
    """RSS split as the kernel counts it: private = RssAnon + RssShmem (must stay in RAM), file = RssFile
    (mapped file pages, which the kernel may drop and read again)."""
    kb = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":")
                kb[key] = int(value.split()[0]) * 1024
    private = kb.get("RssAnon", 0) + kb.get("RssShmem", 0)
    return {"rss": private + kb.get("RssFile", 0), "private": private, "file": kb.get("RssFile", 0)}


def trim_page_cache() -> None:
    """Drop the page cache of the files this process has mapped (torch's libraries, mostly), except the
    pages in use: what startup read ahead would otherwise sit in a small cgroup and be reclaimed under
    pressure at every allocation. Pages still mapped are kept (fadvise skips them)."""
    paths = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                paths.add(parts[5].strip())
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        drop_cache(fd)
        os.close(fd)


def return_freed_memory() -> None:
    """Have glibc serve allocations of 1 MiB and more from their own mappings, so a freed matrix goes back
    to the system. By default its threshold rises to 32 MiB after the first large free, and later matrices
    stay in its heap when freed: a split of an 8B GGUF peaked ~120 MB higher that way (RSS 590 MB, not 470).
    Process-wide; a no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
