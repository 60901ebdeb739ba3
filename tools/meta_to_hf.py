"""Convert a Meta checkpoint to Hugging Face layout (for the peers in bench.py): tools/meta_to_hf.py META OUT

Writes model-0000i-of-0000N.safetensors shards, model.safetensors.index.json and config.json, one tensor
at a time (q/k permuted for HF's rotate-half RoPE), so memory stays near one matrix.
"""
import argparse
import math
from pathlib import Path

from streamer.checkpoint import MetaCheckpoint
from streamer.hf import config_from_args, hf_name, permute_qk
from streamer.files import write_json_atomic
from streamer.weights import write_safetensors

SHARD_BYTES = 4 << 30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("meta", type=Path)
    p.add_argument("out", type=Path)
    a = p.parse_args()
    ckpt = MetaCheckpoint(a.meta)
    args = ckpt.args

    def produce(key):
        t = ckpt.tensor(key)
        if key.endswith("attention.wq.weight"):
            return permute_qk(t, args.n_heads)
        if key.endswith("attention.wk.weight"):
            return permute_qk(t, args.n_kv_heads)
        return t

    shards, current, size = [], {}, 0
    for key, shape in ckpt.shapes.items():
        nbytes = ckpt.dtype.itemsize * math.prod(shape)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[hf_name(key)] = (ckpt.dtype, shape, lambda key=key: produce(key))
        size += nbytes
    shards.append(current)
    a.out.mkdir(parents=True, exist_ok=True)
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(a.out / name, shard, align=1)
        for k in shard:
            index["weight_map"][k] = name
        index["metadata"]["total_size"] += sum(ckpt.dtype.itemsize * math.prod(s) for _, s, _ in shard.values())
    write_json_atomic(a.out / "model.safetensors.index.json", index)
    write_json_atomic(a.out / "config.json", config_from_args(args, ckpt.dtype))
    print(f"{a.out}: {len(shards)} shards")


if __name__ == "__main__":
    main()
