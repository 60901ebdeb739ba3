"""`streamer verify MODEL [--full]` and `streamer info MODEL`: check a split folder, describe it."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from .errors import StreamerError
from .layout import ModelFiles, check_file, read_manifest
from .files import sha256_file


def verify(folder: Path, full: bool = False, progress: Callable[[str], None] | None = None) -> int:
    """Raise on the first file that is missing, of the wrong size, has a bad header or (full) a bad sha256.
    Returns the number of files checked."""
    folder = Path(folder)
    manifest, _ = read_manifest(folder)
    for entry in manifest["files"]:
        path = folder / entry["name"]
        check_file(path, entry["bytes"])
        if full:
            if progress:
                progress(entry["name"])
            if sha256_file(path) != entry["sha256"]:
                raise StreamerError(f"{path}: sha256 does not match the manifest (corrupted)")
    return len(manifest["files"])


def info(folder: Path) -> dict:
    files = ModelFiles(folder)
    a, m = files.args, files.manifest
    sizes = {f["name"]: f["bytes"] for f in m["files"]}
    blocks = [sizes[n] for n in sizes if n.startswith("block_")]
    return {"folder": str(files.folder), "format_version": m["format_version"], "dtype": files.dtype,
            "args": a.to_dict(), "head_dim": a.head_dim, "ffn_dim": a.ffn_dim,
            "rope_scaling": ({"factor": a.rope_scale_factor, "low_freq_factor": a.rope_low_freq_factor,
                              "high_freq_factor": a.rope_high_freq_factor,
                              "original_max_position_embeddings": a.rope_original_max_pos} if a.use_scaled_rope else None),
            "bytes_per_block": max(blocks), "bytes_total": sum(sizes.values()),
            "tokenizer": files.tokenizer_path.name if files.tokenizer_path else None}


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", type=Path, help="a folder written by `streamer split`")
    p.add_argument("--full", action="store_true", help="also check every file's sha256 (reads everything)")
    return p


def main(args: argparse.Namespace) -> int:
    show = (lambda name: print(f"sha256 {name}", file=sys.stderr)) if sys.stderr.isatty() else None
    n = verify(args.model, args.full, progress=show)
    print(f"{args.model}: {n} files OK ({'sizes, headers and sha256' if args.full else 'sizes and headers'})")
    return 0


def setup_info_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", type=Path, help="a folder written by `streamer split`")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def info_main(args: argparse.Namespace) -> int:
    d = info(args.model)
    if args.json:
        print(json.dumps(d))
        return 0
    a = d["args"]
    print(f"{d['folder']}  (format v{d['format_version']}, {d['dtype']})")
    print(f"  dim {a['dim']}, {a['n_layers']} blocks, {a['n_heads']} heads / {a['n_kv_heads']} kv heads, head_dim {d['head_dim']}, "
          f"ffn {d['ffn_dim']}, vocab {a['vocab_size']}, context {a['max_seq_len']}, rope theta {a['rope_theta']:g}")
    print(f"  rope scaling: {d['rope_scaling'] or 'none'}")
    print(f"  {d['bytes_per_block'] / 2**20:.1f} MiB per block, {d['bytes_total'] / 2**30:.2f} GiB in all; "
          f"tokenizer: {d['tokenizer'] or 'none (use --prompt-ids)'}")
    return 0
