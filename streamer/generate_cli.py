"""`streamer generate MODEL`: prints text as it is generated, or one JSON object with --json."""
from __future__ import annotations

import argparse
import codecs
import json
import sys
from pathlib import Path

import torch

from .budget import parse_size, plan
from .errors import StreamerError
from .generate import GenStats, SamplingParams, generate
from .kvcache import DiskKVCache
from .layout import ModelFiles
from .memory import MemoryMonitor
from .runner import Runner
from .tokenizer import ChatFormat, Tokenizer


def pick_dtype(name: str) -> torch.dtype:
    """`auto` is bf16 where the CPU has native bf16 matmuls (AVX512-BF16 or AMX), else float32."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise StreamerError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None


def prompt_ids(args, files: ModelFiles) -> tuple[list[int], Tokenizer | None]:
    tok_path = args.tokenizer or files.tokenizer_path
    tok = Tokenizer(tok_path) if tok_path else None
    if args.prompt_ids is not None:
        return parse_ids(args.prompt_ids), tok
    if args.prompt is None:
        raise StreamerError("give --prompt TEXT or --prompt-ids ID,ID,...")
    if not args.prompt:
        raise StreamerError("the prompt is empty")
    if tok is None:
        raise StreamerError(f"{files.folder}: no tokenizer.model, so --prompt text cannot be encoded; "
                            "pass --tokenizer PATH or use --prompt-ids")
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        return ChatFormat(tok).encode_dialog(messages), tok
    return tok.encode(args.prompt, bos=True), tok


def run(args) -> dict:
    """Generate as the CLI asks; prints text as it comes unless --json. Returns the JSON result."""
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed, logprobs=args.logprobs)
    params.check()
    files = ModelFiles(args.model)
    ids, tok = prompt_ids(args, files)
    max_seq = files.args.max_seq_len if args.max_seq_len is None else args.max_seq_len
    if max_seq <= 0:
        raise StreamerError(f"--max-seq-len must be positive, got {max_seq}")
    if len(ids) + args.max_new_tokens - 1 > max_seq:
        raise StreamerError(f"prompt of {len(ids)} tokens + {args.max_new_tokens} new tokens exceeds --max-seq-len {max_seq}")
    dtype = pick_dtype(args.dtype)
    budget = plan(files, parse_size(args.memory_budget) if args.memory_budget else None, 1, len(ids) + args.max_new_tokens)
    monitor = MemoryMonitor()
    runner = Runner(files, dtype, monitor, **budget.runner_kwargs())
    cache = DiskKVCache(files.args, 1, max_seq, dtype, files.manifest_sha256, args.kv_dir)
    stats, steps = GenStats(), []
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    try:
        for step in generate(runner, cache, ids, params, stats):
            steps.append(step)
            if not args.json:
                piece = decoder.decode(tok.decode_bytes([step.token])) if tok else f"{step.token} "
                print(piece, end="", flush=True)
    finally:
        runner.close()
        cache.close()
        report = monitor.stop()
    if not args.json:
        print(flush=True)
    tokens = [s.token for s in steps]
    bytes_read = runner.io.bytes_read
    result = {
        "prompt_ids": ids, "tokens": tokens, "text": tok.decode(tokens) if tok else None,
        "logprobs": [s.logprob for s in steps], "top_logprobs": [s.top for s in steps] if args.logprobs else None,
        "finish_reason": steps[-1].finish_reason,
        "stats": {"dtype": str(dtype).removeprefix("torch."), "prompt_tokens": len(ids), "reused_prompt_tokens": stats.reused_tokens,
                  "prefill_s": stats.prefill_s, "decode_s_per_token": stats.decode_s_per_token,
                  "bytes_read": bytes_read, "memory": report.as_dict()},
    }
    line = (f"prefill {stats.prefill_s:.2f} s ({len(ids) - stats.reused_tokens} tokens), "
            f"decode {stats.decode_s_per_token:.3f} s/token, read {bytes_read / 1e9:.2f} GB; {report.summary()}")
    print(line, file=sys.stderr)
    if args.memory_report:
        print(report.table(), file=sys.stderr)
    return result


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", type=Path, help="a folder written by `streamer split`")
    p.add_argument("--prompt", help="prompt text (BOS is added)")
    p.add_argument("--prompt-ids", help="prompt as token ids, e.g. 128000,1820,4320")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in Llama 3's chat format")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: the one in the model folder)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--logprobs", type=int, default=0, metavar="K", help="also report the K best tokens per step")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="compute dtype")
    p.add_argument("--max-seq-len", type=int, help="context length (default: the model's, or 8192)")
    p.add_argument("--kv-dir", type=Path, help="keep the KV cache here (resumable); default: a temporary folder")
    p.add_argument("--memory-budget", metavar="SIZE", help="RAM this run may use, e.g. 512M or 8G: blocks that fit stay "
                   "resident, the rest stream through a ring (default: the memory available, cgroup limit included)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of text")
    p.add_argument("--memory-report", action="store_true", help="print peak memory per phase")
    return p


def main(args: argparse.Namespace) -> int:
    result = run(args)
    if args.json:
        print(json.dumps(result))
    return 0
