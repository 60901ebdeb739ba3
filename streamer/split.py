"""`streamer split SRC DST`: shard a Meta or Hugging Face checkpoint, or a GGUF file, into one safetensors
file per block, one file at a time, resumably."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import MetaCheckpoint, infer_rope_factor
from .errors import StreamerError
from .files import drop_cache, sha256_file, write_atomic, write_json_atomic
from .gguf_source import GGUFCheckpoint
from .hf import HFCheckpoint
from .layout import FORMAT, FORMAT_VERSION, LAYOUT, MANIFEST, PARTIAL, check_file, file_tensors
from .memory import return_freed_memory
from .quant import SCHEMES
from .tokenizer import TOKENIZER_FILES
from .weights import file_size_for, write_safetensors

log = logging.getLogger(__name__)
DTYPE_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def open_source(path: Path):
    """A Meta checkpoint folder, a Hugging Face one (config.json + model*.safetensors), or a GGUF file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFCheckpoint(path)
    if not path.is_dir():
        raise StreamerError(f"{path}: no such folder" + ("" if path.exists() else " or GGUF file"))
    if (path / "params.json").exists() or any(path.glob("consolidated.*.pth")):
        return MetaCheckpoint(path)
    if (path / "config.json").exists():
        return HFCheckpoint(path)
    if (path / "original" / "params.json").exists():
        return MetaCheckpoint(path / "original")
    if (path / MANIFEST).exists():
        raise StreamerError(f"{path}: this is already a split model; `streamer generate {path}` runs it")
    raise StreamerError(f"{path}: neither a Meta checkpoint (params.json + consolidated.*.pth) nor a Hugging Face "
                        "one (config.json + model*.safetensors); params.json not found")


def split(src: Path, dst: Path, dtype: str | None = None, progress: Callable[[int, int], None] | None = None,
          rope_scaling_factor: float | None = None, quantize: str | None = None) -> Path:
    """Split a Meta or Hugging Face checkpoint folder, or a GGUF file, into DST; returns the manifest path.
    Resumes an interrupted split; a finished split of the same source with the same options is left as it is.
    progress(done_bytes, total_bytes) is called as files are written."""
    src, dst = Path(src), Path(dst)
    if quantize not in (None, *SCHEMES):
        raise StreamerError(f"must be one of {', '.join(SCHEMES)}, got {quantize!r}", param="quantize")
    return_freed_memory()  # one dequantized or quantized matrix at a time must really be one
    ckpt = open_source(src)
    _choose_rope_factor(ckpt, rope_scaling_factor)
    out_dtype = DTYPE_CHOICES[dtype] if dtype else ckpt.dtype
    if hasattr(ckpt, "hold_dtype"):  # a GGUF holds a dequantized matrix at a time: in the dtype written, no wider
        ckpt.hold_dtype = out_dtype
    if dst.exists() and not dst.is_dir():
        raise StreamerError(f"{dst}: destination exists and is not a folder")
    contents = [(name, {e[0]: (e[3] if len(e) > 3 else out_dtype, e[1]) for e in entries}, entries)
                for name, entries in file_tensors(ckpt.args, quantize)]
    identity = {"args": ckpt.args.to_dict(), "dtype": str(out_dtype).removeprefix("torch."), "quantize": quantize,
                "source": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt.paths]}
    if _finished(dst, identity):
        log.info(f"{dst} already holds this split (same source files and options; sizes and headers checked): "
                 "nothing to do. `streamer verify --full` checks every byte.")
        return dst / MANIFEST
    dst.mkdir(parents=True, exist_ok=True)
    (dst / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands
    done = _resume(dst, identity)
    _check_space(dst, sum(file_size_for(spec) for name, spec, _ in contents if name not in done))
    total, written = sum(file_size_for(spec) for _, spec, _ in contents), 0
    for name, spec, entries in contents:
        if name not in done:
            tensors = {e[0]: (spec[e[0]][0], e[1], lambda make=e[2]: make(ckpt.tensor)) for e in entries}
            try:
                size, sha = write_safetensors(dst / name, tensors)
            except OSError as e:
                raise StreamerError(f"{dst / name}: write failed ({e.strerror}); finished files are kept, "
                                    "rerun to resume") from None
            done[name] = {"name": name, "bytes": size, "sha256": sha}
            write_json_atomic(dst / PARTIAL, {**identity, "files": list(done.values())})
            for path in ckpt.paths:  # the source pages we just read are not needed again
                with open(path, "rb") as f:
                    drop_cache(f.fileno())
        written += done[name]["bytes"]
        if progress:
            progress(written, total)
    extras = {"params.json": ckpt.params_json(), **ckpt.tokenizer_files()}
    if not any(name in extras for name in TOKENIZER_FILES):
        log.warning(ckpt.missing_tokenizer_hint())
    for name, data in extras.items():
        try:
            write_atomic(dst / name, data)
        except OSError as e:
            raise StreamerError(f"{dst / name}: write failed ({e.strerror})") from None
        done[name] = {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **identity,
                "source_folder": str(src.resolve()), "layout": LAYOUT, "files": list(done.values())}
    write_json_atomic(dst / MANIFEST, manifest)
    (dst / PARTIAL).unlink(missing_ok=True)
    return dst / MANIFEST


def _same(recorded: dict, identity: dict) -> bool:
    return all(recorded.get(k) == json.loads(json.dumps(v)) for k, v in identity.items())


def _finished(dst: Path, identity: dict) -> bool:
    """A complete split of the same source with the same options: manifest, every file of its size and header."""
    try:
        manifest = json.loads((dst / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not _same(manifest, identity):
        return False
    try:
        for entry in manifest["files"]:
            check_file(dst / entry["name"], entry["bytes"])
    except (StreamerError, KeyError, TypeError):
        return False
    return True


def _resume(dst: Path, identity: dict) -> dict[str, dict]:
    """Files an interrupted split finished, checked by size and sha256; anything else is redone."""
    try:
        partial = json.loads((dst / PARTIAL).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not _same(partial, identity):
        return {}
    kept = {}
    for entry in partial.get("files", []):
        path = dst / entry["name"]
        if path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]:
            kept[entry["name"]] = entry
    if kept:
        log.info(f"resuming: {len(kept)} finished file(s) in {dst} kept")
    return kept


def _check_space(dst: Path, needed: int) -> None:
    free = shutil.disk_usage(dst).free
    if needed > free:
        raise StreamerError(f"{dst}: not enough disk space: the split needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


def _choose_rope_factor(ckpt, given: float | None) -> None:
    """Record Llama 3.1/3.2 RoPE scaling explicitly: the factor given, the HF config's, or inferred from the shape."""
    if not ckpt.args.use_scaled_rope:
        return
    if given is not None:
        factor, why = given, "given with --rope-scaling-factor"
    elif ckpt.rope_factor_from is not None:
        factor, why = ckpt.args.rope_scale_factor, f"from {ckpt.rope_factor_from}"
    else:
        factor, why = infer_rope_factor(ckpt.args)
    if not factor > 0:
        raise StreamerError(f"must be positive, got {factor}", param="rope_scaling_factor")
    ckpt.args = dataclasses.replace(ckpt.args, rope_scale_factor=float(factor))
    log.info(f"rope scaling: factor {factor:g} ({why})")


def progress_bar(desc: str, enabled: bool = True):
    """A tqdm bar on stderr for split's progress callback (the CLI's, not the library's)."""
    from tqdm.auto import tqdm
    bars = []  # made at the first update, so a split that fails at once shows no bar

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, file=sys.stderr))
        bars[0].update(done - bars[0].n)
        if done >= total:
            bars[0].close()
    return update


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("src", type=Path, help="a Meta checkpoint folder (params.json, consolidated.*.pth, tokenizer.model), "
                   "a Hugging Face one (config.json, model*.safetensors, tokenizer.json; Meta's files in original/ "
                   "also work), or a GGUF file of the llama architecture (the first part of a split GGUF)")
    p.add_argument("dst", type=Path, help="output folder for the layer files and manifest")
    p.add_argument("--dtype", choices=sorted(DTYPE_CHOICES), help="store weights in this dtype (default: the source's)")
    p.add_argument("--rope-scaling-factor", type=float,
                   help="Llama 3.1+ RoPE scaling factor (default: 8 for 3.1, 32 for 3.2 1B/3B shapes, or config.json's)")
    p.add_argument("--quantize", choices=SCHEMES,
                   help="int8: per-row scales (activations quantized per row at 1 and 6+ rows); int4: groups of 64 "
                        "(requantized to int8, and activations quantized per row, at 48+ rows compiled, 128+ eager)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    manifest = split(args.src, args.dst, args.dtype, progress=progress_bar("split", not args.quiet),
                     rope_scaling_factor=args.rope_scaling_factor, quantize=args.quantize)
    print(f"{manifest.parent}: {json.loads(manifest.read_text())['args']['n_layers']} blocks", file=sys.stderr)
    return 0
