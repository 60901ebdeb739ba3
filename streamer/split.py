"""`streamer split SRC DST`: shard a Meta checkpoint into one safetensors file per block, one at a time."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import infer_rope_factor, open_source
from .errors import StreamerError
from .quant import SCHEMES
from .layout import FORMAT, FORMAT_VERSION, LAYOUT, MANIFEST, file_plan, write_json_atomic
from .weights import drop_cache, file_size_for, sha256_file, write_atomic, write_safetensors

PARTIAL = ".manifest.partial.json"  # what an interrupted split had finished; a rerun keeps those files
DTYPE_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def split(src: Path, dst: Path, dtype: str | None = None, progress: bool = True,
          rope_scaling_factor: float | None = None, quantize: str | None = None) -> Path:
    """Split a Meta (or Hugging Face) checkpoint folder into DST; returns the manifest path.
    Resumes an interrupted split."""
    src, dst = Path(src), Path(dst)
    ckpt = open_source(src)
    _choose_rope_factor(ckpt, rope_scaling_factor)
    out_dtype = DTYPE_CHOICES[dtype] if dtype else ckpt.dtype
    if dst.exists() and not dst.is_dir():
        raise StreamerError(f"{dst}: destination exists and is not a folder")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands
    if quantize not in (None, *SCHEMES):
        raise StreamerError(f"--quantize must be one of {', '.join(SCHEMES)}, got {quantize!r}")
    plan = [(name, {e[0]: (e[3] if len(e) > 3 else out_dtype, e[1]) for e in entries}, entries)
            for name, entries in file_plan(ckpt.args, quantize)]
    identity = {"args": ckpt.args.to_dict(), "dtype": str(out_dtype).removeprefix("torch."), "quantize": quantize,
                "source": [(p.name, p.stat().st_size) for p in ckpt.paths]}
    done = _resume(dst, identity)
    _check_space(dst, sum(file_size_for(spec) for name, spec, _ in plan if name not in done))
    bar = _progress(sum(file_size_for(spec) for _, spec, _ in plan), progress)
    for name, spec, entries in plan:
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
        bar.update(done[name]["bytes"])
    bar.close()
    extras = {"params.json": ckpt.params_json()}
    if ckpt.tokenizer_path:
        extras["tokenizer.model"] = ckpt.tokenizer_path.read_bytes()
    else:
        print(ckpt.missing_tokenizer_hint(), file=sys.stderr)
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


def _choose_rope_factor(ckpt, given: float | None) -> None:
    """Record Llama 3.1/3.2 RoPE scaling explicitly: the factor given, the HF config's, or inferred from the shape."""
    if not ckpt.args.use_scaled_rope:
        return
    if given is not None:
        factor, why = given, "given with --rope-scaling-factor"
    elif getattr(ckpt, "config", None) is not None:
        factor, why = ckpt.args.rope_scale_factor, "from config.json"
    else:
        factor, why = infer_rope_factor(ckpt.args)
    if not factor > 0:
        raise StreamerError(f"--rope-scaling-factor must be positive, got {factor}")
    ckpt.args = dataclasses.replace(ckpt.args, rope_scale_factor=float(factor))
    print(f"rope scaling: factor {factor:g} ({why})", file=sys.stderr)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc="split", disable=not enabled, file=sys.stderr)


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("src", type=Path, help="Meta checkpoint folder (consolidated.*.pth, params.json, tokenizer.model)")
    p.add_argument("dst", type=Path, help="output folder for the layer files and manifest")
    p.add_argument("--dtype", choices=sorted(DTYPE_CHOICES), help="store weights in this dtype (default: the source's)")
    p.add_argument("--rope-scaling-factor", type=float,
                   help="Llama 3.1+ RoPE scaling factor (default: 8 for 3.1, 32 for 3.2 1B/3B shapes, or config.json's)")
    p.add_argument("--quantize", choices=SCHEMES, help="int8: per-row scales; int4: groups of 64 (weight-only, packed now)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    manifest = split(args.src, args.dst, args.dtype, progress=not args.quiet, rope_scaling_factor=args.rope_scaling_factor,
                     quantize=args.quantize)
    print(f"wrote {manifest.parent} ({json.loads(manifest.read_text())['args']['n_layers']} blocks)", file=sys.stderr)
    return 0
