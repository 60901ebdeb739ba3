"""`streamer batch MODEL prompts.jsonl --out results.jsonl`: many prompts, one pass over the weights per step.

Sequences share every block read: each step packs the new tokens of all active sequences (whole prompts
for those just admitted, one token for the rest) into one forward pass. A finished sequence frees its KV
slot at once and the next waiting prompt takes it (continuous batching). Each result is appended and
fsynced the moment it finishes; a rerun skips ids already in the output and repairs a torn last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .budget import parse_size, plan
from .errors import StreamerError
from .generate import Sampler, SamplingParams, check_prompt
from .generate_cli import pick_dtype
from .kvcache import DiskKVCache
from .layout import ModelFiles
from .memory import MemoryMonitor, now
from .runner import Runner
from .tokenizer import STOP_IDS, ChatFormat, Tokenizer

LINE_OPTIONS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")


@dataclass
class Request:
    id: object
    line: int
    prompt: list[int]
    params: SamplingParams
    stop_text: list[str] = field(default_factory=list)


@dataclass
class Active:
    req: Request
    sampler: Sampler
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # ids to feed at the next step


def read_requests(path: Path, defaults: SamplingParams, tok: Tokenizer | None, max_seq: int, vocab: int,
                  seed: int) -> Iterator[Request | dict]:
    """Yield a Request per good line, or an error record naming the line and the reason."""
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise StreamerError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise StreamerError("expected a JSON object")
            except (json.JSONDecodeError, StreamerError) as e:
                yield {"id": n, "line": n, "error": f"line {n}: invalid JSON ({e})"}
                continue
            rid = obj.get("id", n)
            try:
                yield _request(obj, rid, n, defaults, tok, max_seq, vocab, seed)
            except StreamerError as e:
                yield {"id": rid, "line": n, "error": f"line {n}: {e}"}


def _request(obj, rid, n, defaults, tok, max_seq, vocab, seed) -> Request:
    if "prompt_ids" in obj:
        ids = obj["prompt_ids"]
        if not isinstance(ids, list):
            raise StreamerError("prompt_ids must be a list of integers")
    elif "prompt" in obj or "messages" in obj:
        if tok is None:
            raise StreamerError("the model folder has no tokenizer.model, so only prompt_ids can be used")
        if "messages" in obj:
            if not isinstance(obj["messages"], list):
                raise StreamerError("messages must be a list")
            ids = ChatFormat(tok).encode_dialog(obj["messages"])
        else:
            if not isinstance(obj["prompt"], str) or not obj["prompt"]:
                raise StreamerError("prompt must be a non-empty string")
            ids = tok.encode(obj["prompt"], bos=True)
    else:
        raise StreamerError("no prompt: give one of prompt, messages or prompt_ids")
    check_prompt(ids, vocab)
    opts = {k: obj[k] for k in LINE_OPTIONS if k in obj}
    stop = opts.pop("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, (str, int)) for s in stop):
        raise StreamerError("stop must be a string, an id, or a list of them")
    line_seed = opts.pop("seed", None)
    if line_seed is None:  # reproducible per prompt whatever batch it lands in
        line_seed = zlib.crc32(json.dumps([seed, rid]).encode())
    try:
        params = SamplingParams(**{**defaults.__dict__, **opts, "seed": line_seed,
                                   "stop_ids": defaults.stop_ids | {s for s in stop if isinstance(s, int)}})
        params.check()
    except TypeError as e:
        raise StreamerError(str(e)) from None
    if len(ids) + params.max_new_tokens - 1 > max_seq:
        raise StreamerError(f"prompt of {len(ids)} tokens + {params.max_new_tokens} new tokens exceeds the context "
                            f"({max_seq}, --max-seq-len)")
    return Request(rid, n, ids, params, [s for s in stop if isinstance(s, str)])


class ResultLog:
    """The output JSONL: ids already done, a torn last line repaired, each record appended durably."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.done: set[str] = set()
        if self.path.exists():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a kill mid-write left a partial record: drop it, it will be redone
                print(f"{self.path}: removing a torn last line ({len(data) - end} bytes)", file=sys.stderr)
                with open(self.path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            for line in data[:end].splitlines():
                try:
                    self.done.add(_key(json.loads(line)["id"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise StreamerError(f"{self.path}: a line is not a result record; refusing to append to it") from None
        try:
            self.f = open(self.path, "ab")
        except OSError as e:
            raise StreamerError(f"{self.path}: cannot write ({e.strerror})") from None

    def write(self, record: dict) -> None:
        self.f.write((json.dumps(record) + "\n").encode())  # one write per record, then fsync
        self.f.flush()
        os.fsync(self.f.fileno())
        self.done.add(_key(record["id"]))

    def close(self) -> None:
        self.f.close()


def _key(rid) -> str:
    return json.dumps(rid)


def run_batch(runner: Runner, cache: DiskKVCache, requests: list[Request], log: ResultLog,
              tok: Tokenizer | None, progress=None) -> dict:
    """Continuous batching over cache.slots slots; returns totals."""
    waiting = list(reversed(requests))
    free = list(range(cache.slots - 1, -1, -1))
    active: dict[int, Active] = {}
    totals = {"prompts": 0, "prompt_tokens": 0, "completion_tokens": 0, "steps": 0}
    while waiting or active:
        while free and waiting:
            slot, req = free.pop(), waiting.pop()
            cache.tokens[slot] = []
            cache.reserve(slot, len(req.prompt) + req.params.max_new_tokens - 1)
            active[slot] = Active(req, Sampler(req.params), pending=list(req.prompt))
        slots = sorted(active)
        phase = "prefill" if any(len(active[s].pending) > 1 for s in slots) else "decode"
        logits = runner.forward([(s, active[s].pending) for s in slots], cache, phase=phase)
        totals["steps"] += 1
        for row, slot in enumerate(slots):
            a = active[slot]
            step = a.sampler(logits[row])
            a.tokens.append(step.token)
            a.logprobs.append(step.logprob)
            a.pending = [step.token]
            reason = _finished(a, step.token, tok)
            if progress:
                progress.set_postfix_str(f"{totals['completion_tokens'] + sum(len(x.tokens) for x in active.values())} tokens")
            if reason:
                log.write(_record(a, reason, tok))
                totals["prompts"] += 1
                totals["prompt_tokens"] += len(a.req.prompt)
                totals["completion_tokens"] += len(a.tokens)
                del active[slot]
                free.append(slot)
                if progress:
                    progress.update(1)
    return totals


def _finished(a: Active, token: int, tok: Tokenizer | None) -> str | None:
    if token in a.req.params.stop_ids:
        return "stop"
    if a.req.stop_text and tok and any(s in tok.decode(a.tokens) for s in a.req.stop_text):
        return "stop"
    if len(a.tokens) >= a.req.params.max_new_tokens:
        return "length"
    return None


def _record(a: Active, reason: str, tok: Tokenizer | None) -> dict:
    text = tok.decode(a.tokens) if tok else None
    if text is not None and reason == "stop":
        cut = [text.find(s) for s in a.req.stop_text if s in text]
        text = text[:min(cut)] if cut else text
    return {"id": a.req.id, "text": text, "tokens": a.tokens, "logprobs": a.logprobs, "finish_reason": reason,
            "usage": {"prompt_tokens": len(a.req.prompt), "completion_tokens": len(a.tokens)}}


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", type=Path)
    p.add_argument("prompts", type=Path, help="JSONL: {id, prompt | messages | prompt_ids, [max_new_tokens, temperature, top_p, seed, stop]}")
    p.add_argument("--out", type=Path, required=True, help="results JSONL (appended; rerun to resume)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seeds lines that set none (mixed with the line's id)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--memory-budget", metavar="SIZE", help="RAM this run may use (default: what is available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.batch_size <= 0:
        raise StreamerError(f"--batch-size must be positive, got {args.batch_size}")
    defaults = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, None, STOP_IDS)
    defaults.check()
    files = ModelFiles(args.model)
    tok = Tokenizer(files.tokenizer_path) if files.tokenizer_path else None
    max_seq = files.args.max_seq_len if args.max_seq_len is None else args.max_seq_len
    log = ResultLog(args.out)
    todo, errors, skipped, seen = [], 0, 0, set()
    for item in read_requests(args.prompts, defaults, tok, max_seq, files.args.vocab_size, args.seed):
        key = _key(item["id"] if isinstance(item, dict) else item.id)
        if key in log.done:
            skipped += 1
            continue
        if key in seen:
            print(f"{args.prompts}: id {key} appears twice; only the first is run", file=sys.stderr)
            continue
        seen.add(key)
        if isinstance(item, dict):
            log.write(item)
            errors += 1
        else:
            todo.append(item)
    dtype = pick_dtype(args.dtype)
    slots = min(args.batch_size, max(1, len(todo)))
    longest = max((len(r.prompt) + r.params.max_new_tokens for r in todo), default=1)
    budget = plan(files, parse_size(args.memory_budget) if args.memory_budget else None, slots, longest)
    monitor = MemoryMonitor()
    runner = Runner(files, dtype, monitor, **budget.runner_kwargs())
    cache = DiskKVCache(files.args, slots, max_seq, dtype, files.manifest_sha256)
    bar = tqdm(total=len(todo), unit="prompt", desc="batch", disable=args.quiet, file=sys.stderr)
    t0 = now()
    try:
        totals = run_batch(runner, cache, todo, log, tok, bar) if todo else {"prompts": 0, "completion_tokens": 0, "steps": 0, "prompt_tokens": 0}
    finally:
        bar.close()
        runner.close()
        cache.close()
        log.close()
        report = monitor.stop()
    secs = now() - t0
    print(f"batch: {totals['prompts']} done, {errors} errors, {skipped} already in {args.out}; "
          f"{totals['completion_tokens']} tokens in {secs:.1f} s ({totals['completion_tokens'] / max(secs, 1e-9):.2f} tokens/s, "
          f"{totals['steps']} steps); {report.summary()}", file=sys.stderr)
    return 0
