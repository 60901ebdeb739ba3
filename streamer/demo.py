"""`streamer demo`: the main job end to end, with no download, on the small trained model that ships with
streamer (stories260K, data/stories260K): split it, then stream every block from disk for each token while
it tells a story."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .engine import Engine
from .generate import GenStats
from .generate_cli import summary
from .split import split

STORIES = Path(__file__).parent / "data" / "stories260K"
PROMPT = "Once upon a time"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamer" / "demo"


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--dir", type=Path, default=None,
                   help="where the demo writes its split model, about 1.3 MB (default: ~/.cache/streamer/demo)")
    p.add_argument("--prompt", default=PROMPT, help=f"how the story starts (default: {PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=200, help="length of the story in tokens")
    return p


def main(args: argparse.Namespace) -> int:
    layers = (args.dir or cache_dir()) / "stories260K"
    split(STORIES, layers)  # the first run writes it; later runs find it finished and do nothing
    stats = GenStats()
    with Engine(layers, dtype="float32", keep_resident=False) as engine:  # stream every block, as a big model would
        print(f"demo: stories260K (a 260K-parameter Llama trained on TinyStories), split into {layers}; every token "
              f"streams its {engine.args.n_layers} blocks from disk", file=sys.stderr)
        print(args.prompt, end="", flush=True)
        for piece in engine.stream(args.prompt, max_new_tokens=args.max_new_tokens, stats=stats):
            print(piece.text, end="", flush=True)
        print(flush=True)
        report = engine.memory()
    print(f"demo: {summary(stats)}; {report.summary()}", file=sys.stderr)
    return 0
