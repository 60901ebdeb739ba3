"""Write a random-weight Llama 3 checkpoint in Meta's layout: tools/make_checkpoint.py OUT --preset 8b."""
import argparse
import time
from pathlib import Path

import torch

from streamer.args import ModelArgs
from streamer.checkpoint import expected_shapes
from streamer.synthetic import PRESETS, TIED, write_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    params = PRESETS[a.preset]
    t0 = time.perf_counter()
    write_checkpoint(a.out, params, getattr(torch, a.dtype), a.seed, tied=a.preset in TIED)
    args = ModelArgs.from_params(params)
    n = sum(torch.Size(s).numel() for s in expected_shapes(args).values())
    print(f"{a.out}: {a.preset}, {n:,} parameters, {a.dtype}, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
