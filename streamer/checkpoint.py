"""Reading Meta's consolidated.*.pth checkpoints lazily: every key and shape checked, shards merged per tensor."""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from .args import ModelArgs
from .errors import StreamerError
from .tokenizer import find_tokenizer

# Model-parallel shards concatenate along dim 0, except these (row-parallel) along dim 1; norms are replicated.
_DIM1 = ("attention.wo.weight", "feed_forward.w2.weight")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every key of a Meta checkpoint and its full (merged) shape."""
    D, hd, F = args.dim, args.head_dim, args.ffn_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, D)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, D),
            p + "attention.wk.weight": (args.n_kv_heads * hd, D),
            p + "attention.wv.weight": (args.n_kv_heads * hd, D),
            p + "attention.wo.weight": (D, args.n_heads * hd),
            p + "feed_forward.w1.weight": (F, D),
            p + "feed_forward.w2.weight": (D, F),
            p + "feed_forward.w3.weight": (F, D),
            p + "attention_norm.weight": (D,),
            p + "ffn_norm.weight": (D,),
        })
    shapes["norm.weight"] = (D,)
    shapes["output.weight"] = (args.vocab_size, D)
    return shapes


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with mmap and weights_only; every failure becomes one line naming the file."""
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        hint = "truncated or not a torch.save zip" if size else "empty"
        raise StreamerError(f"{path}: not a PyTorch checkpoint ({hint}, {size} bytes)")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
        raise StreamerError(f"{path}: refused, it is not plain weights ({first})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StreamerError(f"{path}: cannot read checkpoint ({first})") from None
    if not isinstance(state, dict):
        raise StreamerError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


class MetaCheckpoint:
    """A Meta checkpoint folder: params.json, consolidated.NN.pth (one or more shards), tokenizer.model."""

    def __init__(self, folder: Path, **arg_overrides):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StreamerError(f"{self.folder}: no such folder")
        self.args = ModelArgs.load(self.folder / "params.json", **arg_overrides)
        paths = sorted(self.folder.glob("consolidated.*.pth"), key=_shard_number)
        if not paths:
            raise StreamerError(f"{self.folder}: no consolidated.*.pth checkpoint files")
        if [_shard_number(p) for p in paths] != list(range(len(paths))):
            raise StreamerError(f"{self.folder}: shards must be consolidated.00.pth .. consolidated.{len(paths) - 1:02d}.pth")
        self.paths = paths
        self.shards = [load_pth(p) for p in paths]
        self.shapes = expected_shapes(self.args)
        self._check()
        self.tokenizer_path = find_tokenizer(self.folder)
        self.params_path = self.folder / "params.json"
        self.rope_factor_from = None  # params.json only says use_scaled_rope (infer_rope_factor)

    def params_json(self) -> bytes:
        return self.params_path.read_bytes()

    def tokenizer_files(self) -> dict[str, bytes]:
        return {self.tokenizer_path.name: self.tokenizer_path.read_bytes()} if self.tokenizer_path else {}

    def missing_tokenizer_hint(self) -> str:
        return f"{self.folder} has no tokenizer.model: --prompt text will need --tokenizer (--prompt-ids works without it)"

    @property
    def dtype(self) -> torch.dtype:
        return self.shards[0]["tok_embeddings.weight"].dtype

    def _check(self):
        for path, shard in zip(self.paths, self.shards):
            for key in shard:
                if key not in self.shapes:
                    warnings.warn(f"{path}: skipping unknown key {key!r}", stacklevel=3)
            for key in self.shapes:
                if key not in shard:
                    raise StreamerError(f"{path}: missing tensor {key!r}")
                if not isinstance(shard[key], torch.Tensor):
                    raise StreamerError(f"{path}: {key!r} is not a tensor")
        for key, shape in self.shapes.items():
            got = tuple(self._merged_shape(key))
            if got != shape:
                where = self.paths[0] if len(self.paths) == 1 else self.folder
                raise StreamerError(f"{where}: tensor {key!r} has shape {list(got)}, params.json implies {list(shape)}")

    def _merged_shape(self, key: str) -> torch.Size:
        parts = [s[key].shape for s in self.shards]
        if len(parts) == 1 or len(parts[0]) == 1:
            return parts[0]
        dim = 1 if key.endswith(_DIM1) else 0
        size = list(parts[0])
        size[dim] = sum(p[dim] for p in parts)
        return torch.Size(size)

    def tensor(self, key: str) -> torch.Tensor:
        """The merged tensor: a view of the mapped file for one shard; one matrix concatenated otherwise."""
        if len(self.shards) == 1 or self.shards[0][key].dim() == 1:
            return self.shards[0][key]
        return torch.cat([s[key] for s in self.shards], dim=1 if key.endswith(_DIM1) else 0)


def _shard_number(path: Path) -> int:
    m = re.fullmatch(r"consolidated\.(\d+)\.pth", path.name)
    return int(m.group(1)) if m else -1


LLAMA_32_SHAPES = {(2048, 16), (3072, 28)}  # (dim, n_layers) of Llama 3.2 1B and 3B


def infer_rope_factor(args: ModelArgs) -> tuple[float, str]:
    """Meta's params.json only says use_scaled_rope. Its code hard-codes factor 8, right for 3.1; HF's 3.2 1B/3B
    configs say 32, which a Meta maintainer confirmed (llama-models issues #166, #241)."""
    if (args.dim, args.n_layers) in LLAMA_32_SHAPES:
        return 32.0, "inferred from a Llama 3.2 1B/3B shape"
    return 8.0, "inferred: Llama 3.1 (Meta's reference value)"
