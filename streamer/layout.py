"""The split model folder: file names, what each file holds, and the versioned manifest.

A folder holds embedding.safetensors, block_000.safetensors .. block_NNN.safetensors, head.safetensors,
params.json, optionally tokenizer.model, and manifest.json, written last. Blocks store fused matrices:
wqkv = [wq; wk; wv] and w13 = [w1; w3] (concatenated along the output dim), so a block is 4 matmuls.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .args import ModelArgs
from .errors import StreamerError
from .weights import MappedFile, read_header

FORMAT = "streamer-split"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def block_name(i: int) -> str:
    return f"block_{i:03d}.safetensors"


def file_plan(args: ModelArgs) -> list[tuple[str, dict[str, list[str]]]]:
    """(file name, {stored tensor: [Meta keys concatenated along dim 0]}) for every weight file, in order."""
    plan = [("embedding.safetensors", {"tok_embeddings": ["tok_embeddings.weight"]})]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        plan.append((block_name(i), {
            "attention_norm": [p + "attention_norm.weight"],
            "wqkv": [p + "attention.wq.weight", p + "attention.wk.weight", p + "attention.wv.weight"],
            "wo": [p + "attention.wo.weight"],
            "ffn_norm": [p + "ffn_norm.weight"],
            "w13": [p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"],
            "w2": [p + "feed_forward.w2.weight"],
        }))
    plan.append(("head.safetensors", {"norm": ["norm.weight"], "output": ["output.weight"]}))
    return plan


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: Path) -> tuple[dict, bytes]:
    folder = Path(folder)
    if not folder.is_dir():
        raise StreamerError(f"{folder}: no such model folder")
    path = folder / MANIFEST
    if not path.is_file():
        hint = " (it looks like a Meta checkpoint: run `streamer split` on it first)" if any(folder.glob("*.pth")) else ""
        raise StreamerError(f"{folder}: not a split model, {MANIFEST} is missing{hint}; create one with `streamer split SRC {folder}`")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
        version, fmt = manifest["format_version"], manifest["format"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise StreamerError(f"{path}: corrupt manifest") from None
    if fmt != FORMAT:
        raise StreamerError(f"{path}: format {fmt!r} is not {FORMAT!r}")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StreamerError(f"{path}: format version {version} is newer than this streamer reads ({FORMAT_VERSION}); upgrade streamer")
    return manifest, raw


class ModelFiles:
    """A split model folder opened for reading. Nothing is ever written into it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.manifest, raw = read_manifest(self.folder)
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        self.args = ModelArgs.from_params(self.manifest["args"], source=str(self.folder / MANIFEST))
        self.files = {f["name"]: f for f in self.manifest["files"]}
        self.dtype = self.manifest["dtype"]
        for name, _ in file_plan(self.args):
            self._check(name)
        tok = self.folder / "tokenizer.model"
        self.tokenizer_path = tok if tok.is_file() else None

    def _check(self, name: str) -> None:
        """Size and header checks, so a truncated file is refused by name before any compute."""
        path = self.folder / name
        entry = self.files.get(name)
        if entry is None:
            raise StreamerError(f"{self.folder / MANIFEST}: does not list {name}")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise StreamerError(f"{path}: missing (run `streamer verify {self.folder}`)") from None
        if size != entry["bytes"]:
            raise StreamerError(f"{path}: is {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
        read_header(path, size)

    def open(self, name: str) -> MappedFile:
        return MappedFile(self.folder / name, self.files[name]["bytes"])

    def block(self, i: int) -> MappedFile:
        return self.open(block_name(i))
