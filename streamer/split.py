"""`streamer split SRC DST`: shard a Meta checkpoint into one safetensors file per block, one at a time."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import MetaCheckpoint
from .errors import StreamerError
from .layout import FORMAT, FORMAT_VERSION, MANIFEST, file_plan, write_json_atomic
from .weights import drop_cache, file_size_for, sha256_file, write_safetensors

PARTIAL = ".manifest.partial.json"  # what an interrupted split had finished; a rerun keeps those files
DTYPE_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def split(src: Path, dst: Path, dtype: str | None = None, progress: bool = True) -> Path:
    """Split a Meta checkpoint folder into DST; returns the manifest path. Resumes an interrupted split."""
    src, dst = Path(src), Path(dst)
    ckpt = MetaCheckpoint(src)
    out_dtype = DTYPE_CHOICES[dtype] if dtype else ckpt.dtype
    if dst.exists() and not dst.is_dir():
        raise StreamerError(f"{dst}: destination exists and is not a folder")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands
    plan = [(name, {k: (out_dtype, _shape(ckpt, keys)) for k, keys in tensors.items()}, tensors)
            for name, tensors in file_plan(ckpt.args)]
    identity = {"args": ckpt.args.to_dict(), "dtype": str(out_dtype).removeprefix("torch."),
                "source": [(p.name, p.stat().st_size) for p in ckpt.paths]}
    done = _resume(dst, identity)
    _check_space(dst, sum(file_size_for(spec) for name, spec, _ in plan if name not in done))
    bar = _progress(sum(file_size_for(spec) for _, spec, _ in plan), progress)
    for name, spec, tensors in plan:
        if name not in done:
            parts = {k: [_cast(p, out_dtype) for key in keys for p in ckpt.parts(key)] for k, keys in tensors.items()}
            try:
                size, sha = write_safetensors(dst / name, parts)
            except OSError as e:
                raise StreamerError(f"{dst / name}: write failed ({e.strerror}); finished files are kept, "
                                    "rerun to resume") from None
            done[name] = {"name": name, "bytes": size, "sha256": sha}
            write_json_atomic(dst / PARTIAL, {**identity, "files": list(done.values())})
            for path in ckpt.paths:  # the source pages we just read are not needed again
                with open(path, "rb") as f:
                    drop_cache(f.fileno())
        bar.update(done[name]["bytes"])
    bar.close()
    extras = [ckpt.params_path] + ([ckpt.tokenizer_path] if ckpt.tokenizer_path else [])
    for path in extras:
        try:
            _copy_atomic(path, dst / path.name)
        except OSError as e:
            raise StreamerError(f"{dst / path.name}: write failed ({e.strerror})") from None
        done[path.name] = {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(dst / path.name)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **identity,
                "source_folder": str(src.resolve()), "layout": "fused: wqkv=[wq;wk;wv], w13=[w1;w3]", "files": list(done.values())}
    write_json_atomic(dst / MANIFEST, manifest)
    (dst / PARTIAL).unlink(missing_ok=True)
    return dst / MANIFEST


def _shape(ckpt: MetaCheckpoint, keys: list[str]) -> tuple[int, ...]:
    first = ckpt.shapes[keys[0]]
    return (sum(ckpt.shapes[k][0] for k in keys), *first[1:])


def _cast(part, dtype):
    return part if part.dtype == dtype else part.to(dtype)


def _resume(dst: Path, identity: dict) -> dict[str, dict]:
    """Files an interrupted split finished, checked by size and sha256; anything else is redone."""
    try:
        partial = json.loads((dst / PARTIAL).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if any(partial.get(k) != json.loads(json.dumps(v)) for k, v in identity.items()):
        return {}
    kept = {}
    for entry in partial.get("files", []):
        path = dst / entry["name"]
        if path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]:
            kept[entry["name"]] = entry
    if kept:
        print(f"resuming: {len(kept)} finished file(s) in {dst} kept", file=sys.stderr)
    return kept


def _check_space(dst: Path, needed: int) -> None:
    free = shutil.disk_usage(dst).free
    if needed > free:
        raise StreamerError(f"{dst}: not enough disk space: the split needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc="split", disable=not enabled, file=sys.stderr)


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("src", type=Path, help="Meta checkpoint folder (consolidated.*.pth, params.json, tokenizer.model)")
    p.add_argument("dst", type=Path, help="output folder for the layer files and manifest")
    p.add_argument("--dtype", choices=sorted(DTYPE_CHOICES), help="store weights in this dtype (default: the source's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    manifest = split(args.src, args.dst, args.dtype, progress=not args.quiet)
    print(f"wrote {manifest.parent} ({json.loads(manifest.read_text())['args']['n_layers']} blocks)", file=sys.stderr)
    return 0
