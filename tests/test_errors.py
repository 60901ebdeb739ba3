"""Bad input and faults through the CLI: non-zero exit, one line naming the problem, no traceback,
and nothing left behind that looks complete. The commands run in this process where they can (see cli)."""
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from conftest import GQA, make_split
from streamer.cli import main as cli_main
from streamer.layout import MANIFEST
from streamer.split import PARTIAL
from streamer.synthetic import write_checkpoint

BIG = {**GQA, "dim": 256, "n_layers": 8, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 4096}


def cli(*args, limit_file_size=None, timeout=300, process=False):
    """`streamer ARGS`, in this process: a new one spends 2 s importing torch, and these tests check what the
    command answers, not how a process ends (test_cli.py runs the real command line). A subprocess where a
    file size limit must apply, or where the test reads the library's logged warnings (process=True)."""
    if limit_file_size is None and not process:
        return in_process(*args)

    def preexec():
        if limit_file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))
    return subprocess.run([sys.executable, "-m", "streamer", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def in_process(*args) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            rc = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def fails(r, *words):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if "warn" not in l.lower()]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def meta(tmp_path):
    return write_checkpoint(tmp_path / "meta", GQA, torch.float32, tokenizer=False)


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    return make_split(tmp_path_factory.mktemp("m"), GQA)


# --- split: bad sources -------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    fails(cli("split", tmp_path / "nope", tmp_path / "out"), "nope", "no such folder")


def test_folder_without_params(tmp_path, meta):
    (meta / "params.json").unlink()
    fails(cli("split", meta, tmp_path / "out"), "params.json", "not found")


def test_params_not_json(tmp_path, meta):
    (meta / "params.json").write_text("{dim: 64,")
    fails(cli("split", meta, tmp_path / "out"), "params.json", "not valid JSON")


@pytest.mark.parametrize("bad,word", [({"dim": -64}, "dim"), ({"n_heads": 0}, "n_heads"), ({"n_heads": 7}, "divisible")])
def test_absurd_params(tmp_path, meta, bad, word):
    (meta / "params.json").write_text(json.dumps({**GQA, **bad}))
    fails(cli("split", meta, tmp_path / "out"), "params.json", word)


def _resave(meta, edit):
    state = torch.load(meta / "consolidated.00.pth", weights_only=True)
    edit(state)
    torch.save(state, meta / "consolidated.00.pth")


def test_key_missing(tmp_path, meta):
    _resave(meta, lambda s: s.pop("layers.1.feed_forward.w3.weight"))
    fails(cli("split", meta, tmp_path / "out"), "consolidated.00.pth", "layers.1.feed_forward.w3.weight", "missing")


def test_wrong_shape(tmp_path, meta):
    _resave(meta, lambda s: s.update({"layers.0.attention.wk.weight": torch.zeros(8, 64)}))
    fails(cli("split", meta, tmp_path / "out"), "layers.0.attention.wk.weight", "[8, 64]")


def test_unknown_key_is_skipped_with_a_warning(tmp_path, meta):
    _resave(meta, lambda s: s.update({"rope.freqs": torch.zeros(4)}))
    r = cli("split", meta, tmp_path / "out", "--quiet", process=True)
    assert r.returncode == 0 and "rope.freqs" in r.stderr


def test_truncated_pth(tmp_path, meta):
    path = meta / "consolidated.00.pth"
    os.truncate(path, path.stat().st_size // 2)
    fails(cli("split", meta, tmp_path / "out"), "consolidated.00.pth", "not a PyTorch checkpoint")


def test_pth_not_a_zip(tmp_path, meta):
    (meta / "consolidated.00.pth").write_bytes(b"\x80\x02}q\x00." * 100)
    fails(cli("split", meta, tmp_path / "out"), "consolidated.00.pth", "not a PyTorch checkpoint")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/streamer-pwned",))


def test_pickle_with_code_is_refused(tmp_path, meta):
    _resave(meta, lambda s: s.update({"evil": Evil()}))
    fails(cli("split", meta, tmp_path / "out"), "consolidated.00.pth", "refused")


def test_destination_is_a_file(tmp_path, meta):
    (tmp_path / "out").write_text("x")
    fails(cli("split", meta, tmp_path / "out"), "out", "not a folder")


def test_disk_fills_during_split(tmp_path):
    meta = write_checkpoint(tmp_path / "meta", BIG, torch.float32, tokenizer=False)
    out = tmp_path / "out"
    fails(cli("split", meta, out, "--quiet", limit_file_size=3_000_000), "write failed", "File too large")
    assert not (out / MANIFEST).exists()
    assert not list(out.glob("*.tmp"))  # no half-written file is left
    r = cli("split", meta, out, "--quiet")  # with room again, the rerun completes
    assert r.returncode == 0 and (out / MANIFEST).exists(), r.stderr


def test_not_enough_space_is_refused_up_front(tmp_path):
    meta = write_checkpoint(tmp_path / "meta", BIG, torch.float32, tokenizer=False)
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        fails(cli("split", meta, small / "out"), "not enough disk space", "GB free")
        assert not (small / "out" / MANIFEST).exists()
    finally:
        subprocess.run(["umount", small])


def test_resumed_split_is_byte_identical(tmp_path):
    meta = write_checkpoint(tmp_path / "meta", BIG, torch.float32, tokenizer=False)
    ref = tmp_path / "ref"
    assert cli("split", meta, ref, "--quiet").returncode == 0
    out = tmp_path / "out"
    finished = lambda: len(json.loads((out / PARTIAL).read_text())["files"]) if (out / PARTIAL).exists() else 0
    for _ in range(2):  # each run is killed as soon as it has finished one more file
        before = finished()
        p = subprocess.Popen([sys.executable, "-m", "streamer", "split", meta, out, "--quiet"], stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while finished() == before and p.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL, "the split ended before the kill: the test proves nothing"
        assert before < finished() < BIG["n_layers"] + 2 and not (out / MANIFEST).exists()  # progress, then killed mid-run
    r = cli("split", meta, out, "--quiet")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name


# --- the split folder ------------------------------------------------------------------------------------

def _copy(layers, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(layers, dst)
    return dst


def test_truncated_layer_file(tmp_path, layers):
    m = _copy(layers, tmp_path)
    os.truncate(m / "block_001.safetensors", 1000)
    fails(cli("generate", m, "--prompt-ids", "1,2,3"), "block_001.safetensors", "truncated")
    fails(cli("verify", m), "block_001.safetensors", "truncated")


def test_header_claiming_offsets_beyond_the_file(tmp_path, layers):
    m = _copy(layers, tmp_path)
    path = m / "block_000.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    w2 = header["ffn.0.w2"]
    w2["shape"][1] *= 1000  # a consistent entry that claims far more data than the file holds
    w2["data_offsets"][1] = w2["data_offsets"][0] + w2["shape"][0] * w2["shape"][1] * 4
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    manifest = json.loads((m / MANIFEST).read_text())  # the manifest agrees on the size: only the header lies
    next(f for f in manifest["files"] if f["name"] == path.name)["bytes"] = path.stat().st_size
    (m / MANIFEST).write_text(json.dumps(manifest))
    fails(cli("generate", m, "--prompt-ids", "1,2,3"), "block_000.safetensors", "'ffn.0.w2'", "truncated")


def test_flipped_byte_found_by_full_verify(tmp_path, layers):
    m = _copy(layers, tmp_path)
    path = m / "block_002.safetensors"
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert cli("verify", m).returncode == 0  # sizes and headers are still fine
    fails(cli("verify", m, "--full"), "block_002.safetensors", "sha256")


def test_manifest_from_the_future(tmp_path, layers):
    m = _copy(layers, tmp_path)
    manifest = json.loads((m / MANIFEST).read_text())
    manifest["format_version"] = 99
    (m / MANIFEST).write_text(json.dumps(manifest))
    fails(cli("generate", m, "--prompt-ids", "1,2"), "format version 99", "upgrade")


def test_folder_never_split(meta):
    fails(cli("generate", meta, "--prompt-ids", "1,2"), "streamer split")


# --- generate: bad requests -------------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--prompt-ids", "1,512"], ["512", "vocabulary"]),
    (["--prompt-ids=-3,4"], ["-3", "vocabulary"]),
    (["--prompt-ids", ""], ["prompt is empty"]),
    (["--prompt-ids", "1,2,3,4,5,6", "--max-seq-len", "4"], ["--max-seq-len 4 is too short"]),
    (["--prompt-ids", "1,2", "--max-new-tokens", "0"], ["--max-new-tokens must be a positive integer, got 0"]),
    (["--prompt-ids", "1,2", "--temperature", "-0.5"], ["--temperature must be >= 0"]),
    (["--prompt-ids", "1,2", "--top-p", "0"], ["--top-p must be in (0, 1]"]),
    (["--prompt-ids", "1,2", "--top-p", "1.5"], ["--top-p must be in (0, 1]"]),
    (["--prompt", "hello"], ["no tokenizer", "prompt ids"]),
    (["--prompt", "hello", "--prompt-ids", "1"], ["--prompt", "--prompt-ids", "one of them"]),
    (["--prompt", ""], ["prompt is empty"]),
])
def test_bad_generate_requests(layers, args, words):
    fails(cli("generate", layers, *args), *words)


def test_kv_dir_on_a_full_disk(tmp_path, layers):
    kv = tmp_path / "kv"
    kv.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", kv], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        fails(cli("generate", layers, "--prompt-ids", "1,2,3", "--max-new-tokens", "2000", "--kv-dir", kv / "c"),
              "KV cache", "No space left")
    finally:
        subprocess.run(["umount", kv])


def test_read_only_model_folder_and_concurrent_runs(tmp_path, layers):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", layers, ro], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", ro], check=True)
        cmd = [sys.executable, "-m", "streamer", "generate", ro, "--prompt-ids", "1,5,9", "--max-new-tokens", "8",
               "--dtype", "float32", "--json"]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        a, b = (json.loads(o[0])["tokens"] for o in outs)
        assert a == b and len(a) == 8
    finally:
        subprocess.run(["umount", ro])


# --- refuse what streamer cannot run correctly ------------------------------------------------------------

def hf_folder(tmp_path, config_edit=None, extra_tensors=None):
    """A real HF Llama folder (transformers' save_pretrained), then edited as another model's would be."""
    from conftest import load_meta_state, params_of
    from references import hf_model
    meta = write_checkpoint(tmp_path / "meta", GQA, torch.float32, tokenizer=False)
    hf_model(params_of(meta), load_meta_state(meta)).save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **(config_edit or {})}))
    if extra_tensors:
        from safetensors.torch import save_file
        save_file(extra_tensors, tmp_path / "hf" / "model-extra.safetensors")
    return tmp_path / "hf"


@pytest.mark.parametrize("edit,extra,words", [
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, None, ["model_type 'qwen2'", "not supported"]),
    ({"model_type": "llama", "architectures": ["MistralForCausalLM"]}, None, ["MistralForCausalLM", "not supported"]),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, None, ["rope scaling type 'dynamic'"]),
    ({"attention_bias": True}, None, ["attention_bias = True"]),
    ({"hidden_act": "gelu"}, None, ["hidden_act = 'gelu'"]),
    (None, {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, ["unexpected tensor", "q_proj.bias", "model-extra"]),
])
def test_unsupported_hf_checkpoints_are_refused(tmp_path, edit, extra, words):
    out = tmp_path / "out"
    fails(cli("split", hf_folder(tmp_path, edit, extra), out), *words)
    assert not (out / MANIFEST).exists()


# --- faults while running ----------------------------------------------------------------------------------

def test_layer_file_truncated_after_opening(tmp_path, layers):
    """The runner checked the file, then someone truncated it: the reader thread's short read reaches the caller."""
    from streamer import Engine, StreamerError
    m = _copy(layers, tmp_path)
    with Engine(m, dtype="float32", keep_resident=False) as engine:
        engine.runner(1, 64)  # files checked, opened, readers started
        os.truncate(m / "block_002.safetensors", 4096)
        with pytest.raises(StreamerError, match=r"block_002.safetensors: file ended early while reading"):
            engine.generate(prompt_ids=[1, 2, 3], max_new_tokens=2)


def test_reader_io_error_reaches_the_caller(tmp_path, layers, monkeypatch):
    """An EIO in a reader thread becomes one clear error naming the file, in the calling thread."""
    import errno
    from streamer import Engine, StreamerError
    real = os.preadv

    def failing(fd, buffers, offset, *rest):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("block_001.safetensors"):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset, *rest)

    monkeypatch.setattr(os, "preadv", failing)
    with Engine(layers, dtype="float32", keep_resident=False) as engine:
        with pytest.raises(StreamerError, match=r"block_001.safetensors: read failed \(Input/output error\)"):
            engine.generate(prompt_ids=[1, 2, 3], max_new_tokens=2)
