"""`streamer memcap SIZE -- COMMAND`: run a command inside a memory cgroup, as on a machine with that much RAM.

The page cache the command fills counts against the cap, so a model that does not fit cannot hide in the
cache. cgroup v2 (memory.max, swap off) or v1 (memory.limit_in_bytes), whichever holds the memory
controller here; both need root. After the command ends it prints, on stderr, one line that the tools parse:

    memcap: limit=512M peak=498M peak_bytes=522190848 oom_kills=0 exit=0
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .budget import parse_size
from .errors import StreamerError

ROOT = Path("/sys/fs/cgroup")


def iec(n: int) -> str:
    """512M, 1.5G: sizes as memcap's SIZE argument takes them."""
    unit = ""
    for u in "KMGT":
        if n < 1024:
            break
        n, unit = n / 1024, u
    return f"{n:.4g}{unit}"


@dataclass
class Cgroup:
    path: Path
    v2: bool

    @classmethod
    def create(cls, limit: int, root: Path = ROOT) -> "Cgroup":
        """A new memory cgroup with `limit` bytes (swap off); a clear error when this machine cannot make one."""
        v1 = root / "memory"
        if (root / "cgroup.controllers").is_file() and "memory" in (root / "cgroup.controllers").read_text().split():
            base, v2 = root, True
        elif v1.is_dir():
            base, v2 = v1, False
        else:
            raise StreamerError(f"no memory cgroup controller on this machine (neither {root}/cgroup.controllers "
                                f"lists memory nor is there {v1})")
        if os.geteuid() != 0:
            raise StreamerError("making a memory cgroup needs root (run memcap as root)")
        cg = cls(base / f"streamer-memcap-{os.getpid()}-{uuid.uuid4().hex[:6]}", v2)
        try:
            if v2 and "memory" not in (base / "cgroup.subtree_control").read_text().split():
                (base / "cgroup.subtree_control").write_text("+memory")
            cg.path.mkdir()
        except OSError as e:
            raise StreamerError(f"{base}: cannot make a memory cgroup ({e.strerror})") from None
        try:
            cg._write("memory.max" if v2 else "memory.limit_in_bytes", str(limit))
            if v2:
                cg._write("memory.swap.max", "0", optional=True)
            else:
                cg._write("memory.swappiness", "0", optional=True)
        except BaseException:
            cg.remove()
            raise
        return cg

    def _write(self, name: str, value: str, optional: bool = False) -> None:
        try:
            (self.path / name).write_text(value)
        except OSError as e:
            if not optional:
                raise StreamerError(f"{self.path / name}: cannot set it ({e.strerror})") from None

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def join(self) -> None:
        """Move the calling process in (a child calls this before it execs the command)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        raw = self._read("memory.peak" if self.v2 else "memory.max_usage_in_bytes").strip()
        return int(raw) if raw.isdigit() else 0

    def oom_kills(self) -> int:
        text = self._read("memory.events" if self.v2 else "memory.oom_control")
        return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")), 0)

    def remove(self) -> None:
        """Remove the (empty) cgroup; page cache still charged to it moves to the parent."""
        for _ in range(10):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if not self.v2:
                    self._write("memory.force_empty", "1", optional=True)
                time.sleep(0.1)


def available() -> tuple[bool, str]:
    """Whether memcap can run here, and if not, why (for tests that skip)."""
    try:
        Cgroup.create(1 << 30).remove()
        return True, ""
    except StreamerError as e:
        return False, str(e)


def run(limit: int, command: list[str]) -> tuple[int, dict]:
    """Run `command` under a cap of `limit` bytes: (its exit status, {limit, peak, oom_kills})."""
    cg = Cgroup.create(limit)
    try:
        try:
            proc = subprocess.Popen(command, preexec_fn=cg.join)
        except (OSError, subprocess.SubprocessError) as e:
            raise StreamerError(f"{command[0]}: cannot run it ({getattr(e, 'strerror', None) or e})") from None
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            code = proc.wait()
        return code, {"limit": limit, "peak": cg.peak(), "oom_kills": cg.oom_kills()}
    finally:
        cg.remove()


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("size", help="the memory cap, e.g. 512M, 2G (page cache included)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND", help="-- then the command and its arguments")
    return p


def main(args: argparse.Namespace) -> int:
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise StreamerError("give the command after --, e.g. streamer memcap 2G -- streamer demo")
    limit = parse_size(args.size, "SIZE")
    code, r = run(limit, command)
    shown = code if code >= 0 else 128 - code
    print(f"memcap: limit={iec(limit)} peak={iec(r['peak'])} peak_bytes={r['peak']} oom_kills={r['oom_kills']} "
          f"exit={shown}", file=sys.stderr)
    return shown
