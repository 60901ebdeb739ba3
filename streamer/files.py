"""File helpers every module shares: atomic writes, page-cache eviction, checksums, and the clock."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

CHUNK = 64 << 20  # bytes per read or write: bounds the buffers a split or a checksum holds


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to NAME.tmp, fsync, rename over `path`: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode())


def drop_cache(fd: int) -> None:
    """Ask the kernel to drop this file's clean pages from the page cache (dirty ones start writeback)."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
        drop_cache(f.fileno())
    return digest.hexdigest()


def now() -> float:
    """The one clock every timing uses."""
    return time.perf_counter()
