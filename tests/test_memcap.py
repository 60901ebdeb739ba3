"""`streamer memcap`: a command under a memory cgroup, its peak and OOM kills reported, clear refusals."""
import subprocess
import sys

import pytest

from streamer import StreamerError
from streamer.memcap import Cgroup, available

OK, WHY = available()
needs_cgroup = pytest.mark.skipif(not OK, reason=f"memcap cannot run here: {WHY}")


def memcap(size, code):
    return subprocess.run([sys.executable, "-m", "streamer", "memcap", size, "--", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=120)


def report(r):
    line = next(l for l in r.stderr.splitlines() if l.startswith("memcap: "))
    return dict(kv.split("=") for kv in line.split()[1:])


@needs_cgroup
def test_peak_and_oom_kills():
    ok = memcap("256M", "x = bytearray(64 << 20); x[::4096] = b'1' * len(x[::4096]); print('done')")
    assert ok.returncode == 0 and ok.stdout.strip() == "done", ok.stderr
    r = report(ok)
    assert r["limit"] == "256M" and r["oom_kills"] == "0" and r["exit"] == "0"
    assert 64 << 20 <= int(r["peak_bytes"]) <= 256 << 20
    killed = memcap("96M", "x = bytearray(256 << 20); x[::4096] = b'1' * len(x[::4096])")
    assert killed.returncode == 137 and report(killed)["oom_kills"] != "0" and report(killed)["exit"] == "137"


@needs_cgroup
def test_page_cache_counts(tmp_path):
    """Reading a file through the page cache charges the cgroup: a model cannot hide in the cache."""
    big = tmp_path / "big"
    big.write_bytes(b"\1" * (48 << 20))
    subprocess.run(["sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches"], check=False)
    r = memcap("512M", f"f = open({str(big)!r}, 'rb'); [None for _ in iter(lambda: f.read(1 << 20), b'')]")  # 1 MiB at a time
    assert r.returncode == 0 and int(report(r)["peak_bytes"]) >= 48 << 20


def test_clear_errors_when_no_cgroup_can_be_made(tmp_path, monkeypatch):
    with pytest.raises(StreamerError, match="no memory cgroup controller"):
        Cgroup.create(1 << 30, root=tmp_path)
    (tmp_path / "memory").mkdir()  # a v1 memory controller, but we are not root
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(StreamerError, match="needs root"):
        Cgroup.create(1 << 30, root=tmp_path)
    r = subprocess.run([sys.executable, "-m", "streamer", "memcap", "1G"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "give the command after --" in r.stderr and "Traceback" not in r.stderr
