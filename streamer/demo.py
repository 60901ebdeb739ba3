"""`streamer demo`: the main job end to end on a small random Llama-3-shaped model, with no download."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from . import generate_cli
from .layout import MANIFEST
from .split import split
from .synthetic import PRESETS, write_checkpoint

PROMPT = "the answer to the ultimate question of life, the universe, and everything is "


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamer" / "demo"


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--dir", type=Path, default=None, help="where the demo model lives (default: ~/.cache/streamer/demo)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    return p


def main(args: argparse.Namespace) -> int:
    root = args.dir or cache_dir()
    meta, layers = root / "meta", root / "layers"
    if not (meta / "consolidated.00.pth").is_file():
        print(f"demo: writing a random {PRESETS['tiny']['n_layers']}-block Llama-3-shaped checkpoint to {meta}", file=sys.stderr)
        write_checkpoint(meta, PRESETS["tiny"], torch.bfloat16, seed=0)
    if not (layers / MANIFEST).is_file():
        split(meta, layers, progress=False)
    has_tok = (layers / "tokenizer.model").is_file()
    print("demo: the weights are random, so the text is gibberish; the point is the streaming and its memory.", file=sys.stderr)
    gen_args = generate_cli.setup_arg_parser(argparse.ArgumentParser()).parse_args(
        [str(layers), "--max-new-tokens", str(args.max_new_tokens), "--memory-report"]
        + (["--prompt", PROMPT] if has_tok else ["--prompt-ids", "128000,1820,4320,311"]))
    if not has_tok:
        print("demo: llama-models is not installed, so no tokenizer: prompting with ids", file=sys.stderr)
    else:
        print(f"prompt: {PROMPT!r}", file=sys.stderr)
    result = generate_cli.run(gen_args)
    print(f"tokens: {result['tokens']}")
    return 0
