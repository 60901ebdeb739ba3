"""The split model folder: file names, what each file holds and in which order, and the versioned manifest.

A folder holds embedding.safetensors, block_000.safetensors .. block_NNN.safetensors, head.safetensors,
params.json, optionally the tokenizer (tokenizer.model, or llama2.c's tokenizer.bin), and manifest.json, written last. Tensors in a file are in the
order the block math consumes them, so a block streams front to back:

    attention_norm, wqkv.0, wqkv.1, ... (row pieces of [wq; wk; wv]), wo.0, ..., ffn_norm,
    ffn.0.w1, ffn.0.w3, ffn.0.w2, ffn.1.w1, ...   (w1/w3 rows and w2 columns of hidden slice j)

and the head is norm, output.0, output.1, ... No piece exceeds ~16 MiB in bf16, so a block runs in a
small buffer, and long prompts never build a [tokens, ffn_dim] activation.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from . import quant
from .args import ModelArgs
from .errors import StreamerError
from .tokenizer import find_tokenizer
from .weights import PAD, read_header

FORMAT = "streamer-split"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL = ".manifest.partial.json"  # what an interrupted split had finished; a rerun keeps those files
FFN_PIECE_ROWS = 1024  # hidden rows per FFN piece (3 x 8 MiB for 8B in bf16)
PIECE_BYTES = 16 << 20  # other matrices are stored in row pieces of at most this many bf16 bytes
LAYOUT = ("wqkv.k, wo.k, output.k: row pieces (wqkv = [wq; wk; wv]); "
          "ffn.j.{w1,w3,w2}: rows / columns j*c..(j+1)*c of the hidden dim")

Get = Callable[[str], torch.Tensor]  # Meta key -> full (merged) tensor
Entry = tuple  # (stored name, shape, producer(get) -> tensor[, dtype when not the model's])


def block_name(i: int) -> str:
    return f"block_{i:03d}.safetensors"


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def ffn_piece_rows(args: ModelArgs) -> int:
    return largest_divisor(args.ffn_dim, FFN_PIECE_ROWS)


def row_pieces(name: str, shape: tuple[int, int], keys: list[str]) -> list[Entry]:
    """The matrix [keys[0]; keys[1]; ...] stored as row pieces name.0, name.1, ... of at most PIECE_BYTES in bf16."""
    step = max(1, PIECE_BYTES // (2 * shape[1]))
    return [(f"{name}.{k}", (min(step, shape[0] - a), shape[1]), lambda get, a=a: _rows(get, keys, a, a + step))
            for k, a in enumerate(range(0, shape[0], step))]


def _rows(get: Get, keys: list[str], a: int, b: int) -> torch.Tensor:
    """Rows a..b of the tensors `keys` stacked along dim 0, without stacking them."""
    parts, offset = [], 0
    for key in keys:
        t = get(key)
        lo, hi = max(a, offset), min(b, offset + t.shape[0])
        if lo < hi:
            parts.append(t[lo - offset:hi - offset])
        offset += t.shape[0]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _block(args: ModelArgs, i: int) -> list[Entry]:
    p, D, hd = f"layers.{i}.", args.dim, args.head_dim
    qkv = ("wq", "wk", "wv")
    wqkv = ((args.n_heads + 2 * args.n_kv_heads) * hd, D)
    entries = [("attention_norm", (D,), lambda get: get(p + "attention_norm.weight"))]
    entries += row_pieces("wqkv", wqkv, [f"{p}attention.{w}.weight" for w in qkv])
    entries += row_pieces("wo", (D, args.n_heads * hd), [p + "attention.wo.weight"])
    entries += [("ffn_norm", (D,), lambda get: get(p + "ffn_norm.weight"))]
    c = ffn_piece_rows(args)
    for j in range(args.ffn_dim // c):
        rows = slice(j * c, (j + 1) * c)
        entries += [
            (f"ffn.{j}.w1", (c, D), lambda get, r=rows: get(p + "feed_forward.w1.weight")[r]),
            (f"ffn.{j}.w3", (c, D), lambda get, r=rows: get(p + "feed_forward.w3.weight")[r]),
            (f"ffn.{j}.w2", (D, c), lambda get, r=rows: get(p + "feed_forward.w2.weight")[:, r]),
        ]
    return entries


def file_tensors(args: ModelArgs, quantize: str | None = None) -> list[tuple[str, list[Entry]]]:
    """Every weight file, in streaming order, with the tensors it holds in consumption order.
    With `quantize`, each matrix but the embedding becomes its codes and scales (quant.py)."""
    files = _files(args)
    if quantize:
        held = {}  # one slot for the whole split: the matrix last quantized, until another one is
        files = [(f, [x for e in entries for x in _quantized(e, quantize, held)]) if f != "embedding.safetensors"
                 else (f, entries) for f, entries in files]
    return files


def _quantized(entry: Entry, scheme: str, held: dict) -> list[Entry]:
    name, shape, make = entry[:3]
    if len(shape) != 2:
        return [entry]

    me = object()  # this entry, whatever its name (every block has a "wo.0")

    def result(get):  # quantize once; the codes and the scales are written one after the other
        if held.get("entry") is not me:
            held.clear()  # the previous matrix first, so two are never held at once
            held.update(entry=me, w=quant.quantize(make(get), scheme))
        return held["w"]
    return [(n, s, lambda get, pick=pick: pick(result(get)), dt) for n, dt, s, pick in quant.stored(name, shape, scheme)]


def _files(args: ModelArgs) -> list[tuple[str, list[Entry]]]:
    files = [("embedding.safetensors", [("tok_embeddings", (args.vocab_size, args.dim),
                                         lambda get: get("tok_embeddings.weight"))])]
    files += [(block_name(i), _block(args, i)) for i in range(args.n_layers)]
    head = [("norm", (args.dim,), lambda get: get("norm.weight"))]
    head += row_pieces("output", (args.vocab_size, args.dim), ["output.weight"])
    files.append(("head.safetensors", head))
    return files


def read_manifest(folder: Path) -> tuple[dict, bytes]:
    folder = Path(folder)
    if not folder.is_dir():
        raise StreamerError(f"{folder}: no such model folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise StreamerError(f"{folder}: not a split model ({MANIFEST} is missing); {_split_hint(folder)}")
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


def _split_hint(folder: Path) -> str:
    """The command that makes a split model out of `folder`, when it holds a checkpoint."""
    named = folder.parent if folder.name == "original" else folder  # HF repos keep Meta's files in original/
    out = named.with_name(named.name + "-layers")
    if any(folder.glob("consolidated.*.pth")) or (folder / "original" / "params.json").is_file():
        return f"it holds a Meta checkpoint: split it first with `streamer split {folder} {out}`"
    if (folder / "config.json").is_file():
        return f"it holds a Hugging Face checkpoint: split it first with `streamer split {folder} {out}`"
    if (folder / PARTIAL).is_file():
        return "a split into it was interrupted: rerun the same `streamer split` command to finish it"
    return "make one with `streamer split CHECKPOINT_FOLDER OUTPUT_FOLDER`"


def check_file(path: Path, expected_bytes: int):
    """A file the manifest lists: present, of the recorded size, and (safetensors) with a sound header,
    which is returned."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise StreamerError(f"{path}: missing (run `streamer verify {path.parent}`)") from None
    if size != expected_bytes:
        raise StreamerError(f"{path}: is {size} bytes, the manifest says {expected_bytes} (truncated or replaced)")
    return read_header(path, size) if path.suffix == ".safetensors" else None


class ModelFiles:
    """A split model folder opened for reading: manifest, args, and every weight file's checked header.
    Nothing is ever written into it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.manifest, raw = read_manifest(self.folder)
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        self.args = ModelArgs.from_params(self.manifest["args"], source=str(self.folder / MANIFEST))
        self.files = {f["name"]: f for f in self.manifest["files"]}
        self.dtype = self.manifest["dtype"]
        self.quantize = self.manifest.get("quantize")
        self.headers = {name: self._check(name, [e[0] for e in entries]) for name, entries in file_tensors(self.args, self.quantize)}
        self.tokenizer_path = find_tokenizer(self.folder)

    def _check(self, name: str, tensors: list[str]):
        """Size and header checks, so a truncated file is refused by name before any compute."""
        entry = self.files.get(name)
        if entry is None:
            raise StreamerError(f"{self.folder / MANIFEST}: does not list {name}")
        path = self.folder / name
        header = check_file(path, entry["bytes"])
        if [n for n in sorted(header[0], key=lambda n: header[0][n][2]) if not n.startswith(PAD)] != tensors:
            raise StreamerError(f"{path}: holds other tensors than this streamer's layout (split again with `streamer split`)")
        return header

    def step_files(self) -> list[str]:
        """The files one forward pass reads, in order."""
        return [block_name(i) for i in range(self.args.n_layers)] + ["head.safetensors"]
