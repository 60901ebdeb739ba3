"""`streamer generate MODEL`: prints text as it is generated, or one JSON object with --json."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .engine import Engine
from .errors import StreamerError
from .generate import GenStats
from .speculative import add_draft_options


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise StreamerError(f"expected comma-separated integers, got {text!r}", param="prompt_ids") from None


def summary(stats: GenStats) -> str:
    """The one stderr line after a generation: times, and bytes read with the resident share named."""
    resident = (f", {stats.resident_bytes / 1e9:.3f} GB of it once for blocks kept in RAM" if stats.resident_bytes
                and stats.bytes_read >= stats.resident_bytes else "")
    return (f"prefill {stats.prefill_s:.2f} s ({stats.prompt_tokens - stats.reused_tokens} tokens"
            + (f", {stats.reused_tokens} reused from the KV cache" if stats.reused_tokens else "") + "), "
            f"decode {stats.decode_s_per_token:.3f} s/token, {stats.passes} passes over the weights, "
            f"read {stats.bytes_read / 1e9:.3f} GB{resident}" + (
                f"; draft: {stats.accepted} of {stats.drafted} proposed tokens kept, "
                f"{stats.completion_tokens / max(stats.passes, 1):.2f} tokens per pass, drafting {stats.draft_s:.2f} s, "
                f"verifying {sum(stats.decode_s):.2f} s"
                if stats.drafted else ""))


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", type=Path, help="a folder written by `streamer split`")
    p.add_argument("--prompt", help="prompt text (BOS is added)")
    p.add_argument("--prompt-ids", help="prompt as token ids, e.g. 128000,1820,4320")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's own chat template (Llama 3's chat format for Meta checkpoints)")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: the one in the model folder)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: sample from the most likely tokens "
                   "whose probabilities add up to this (1 = all)")
    p.add_argument("--seed", type=int, help="seed for sampling (default: random)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="also stop where this text appears (repeatable)")
    p.add_argument("--logprobs", type=int, default=0, metavar="K", help="also report the K best tokens per step")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (auto: bfloat16 where the CPU has native bf16 matmuls, else float32)")
    p.add_argument("--max-seq-len", type=int, help="context length (default: the model's, or 8192)")
    p.add_argument("--kv-dir", type=Path, help="keep the KV cache here: rerunning with the prompt extended by the "
                   "output resumes without recomputing it (default: a temporary folder)")
    p.add_argument("--memory-budget", metavar="SIZE", help="RAM this run may use, e.g. 512M or 8G: blocks that fit stay "
                   "resident, the rest stream through a ring (default: the memory cgroup's limit, or 85%% of the "
                   "available memory)")
    add_draft_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of text")
    p.add_argument("--memory-report", action="store_true", help="print peak memory per phase")
    return p


def main(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompt_ids is None):
        raise StreamerError("give --prompt TEXT or --prompt-ids ID,ID,... (one of them)")
    ids = parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
    stats = GenStats()
    with Engine(args.model, args.memory_budget, args.dtype, max_seq_len=args.max_seq_len, tokenizer=args.tokenizer,
                draft=args.draft, draft_tokens=args.draft_tokens,
                draft_branches=args.draft_branches) as engine:
        prompt, pieces = engine.prompt_ids(args.prompt, prompt_ids=ids, chat=args.chat, system=args.system), []
        for piece in engine.stream(prompt_ids=prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, seed=args.seed, logprobs=args.logprobs, stop=args.stop,
                                   kv_dir=args.kv_dir, stats=stats):
            pieces.append(piece)
            if not args.json:
                print(piece.text if engine.tokenizer else f"{piece.token} ", end="", flush=True)
        report = engine.memory()
        dtype = str(engine.dtype).removeprefix("torch.")
        has_text = engine.tokenizer is not None
    if not args.json:
        print(flush=True)
    print(f"{summary(stats)}; {report.summary()}", file=sys.stderr)
    if args.memory_report:
        print(report.table(), file=sys.stderr)
    if args.json:
        print(json.dumps({
            "prompt_ids": prompt, "tokens": [p.token for p in pieces],
            "text": "".join(p.text for p in pieces) if has_text else None,
            "logprobs": [p.logprob for p in pieces], "top_logprobs": [p.top for p in pieces] if args.logprobs else None,
            "finish_reason": pieces[-1].finish_reason, "stats": {"dtype": dtype, **stats.as_dict()}}))
    return 0
