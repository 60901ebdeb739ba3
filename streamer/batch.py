"""Batches: many prompts, one pass over the weights per step (continuous batching), and `streamer batch`.

Sequences share every block read: each step packs the new tokens of all active sequences (whole prompts
for those just admitted, one token for the rest) into one forward pass. A finished sequence frees its KV
slot at once and the next waiting prompt takes it. A prompt that starts with whole 16-token blocks of one
already computed (a shared system prompt, n completions of one prompt) copies their keys and values.

`streamer batch MODEL prompts.jsonl --out results.jsonl` appends each result and fsyncs it the moment it
finishes. A rerun skips the ids already done, retries those whose only record is an error (the new record
replaces the old one), and repairs a last line torn by a kill.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import zlib
from itertools import accumulate
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, NamedTuple

from . import openai_batch
from .costs import AUTO_BATCH_MAX
from .errors import StreamerError
from .files import now, write_atomic
from .generate import Sampler, SamplingParams, TextOut, chunk, step_of, verified
from .speculative import NOTHING, add_draft_options, propose

log = logging.getLogger(__name__)
LINE_OPTIONS = ("max_new_tokens", "temperature", "top_p", "seed", "stop", "logprobs")
MAX_N = 128  # completions per request
CLI_FLAGS = {"max_seq_len": "--max-seq-len"}  # parameters a line cannot set: an error in them names the flag


@dataclass
class Request:
    id: object
    prompt: list[int]
    params: SamplingParams
    stop_text: list[str] = field(default_factory=list)
    n: int = 1  # completions of this prompt


class Choice(NamedTuple):
    """The id of one of a request's n completions while it runs."""
    id: object
    index: int


@dataclass
class Active:
    req: Request
    sampler: Sampler
    text: TextOut | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # the K best per token, with logprobs=K
    pending: list[int] = field(default_factory=list)  # ids still to feed: the prompt's rest, or the last token
    order: int = 0  # admitted as the order-th sequence: prompts are prefilled in this order


def make_request(engine, obj, rid, defaults: dict, seed: int) -> Request:
    """A checked Request from one request object, its options over `defaults` (Engine.sampling's arguments);
    raises StreamerError naming what is wrong."""
    if not isinstance(obj, dict):
        raise StreamerError(f"expected a JSON object, got {type(obj).__name__}")
    if not any(k in obj for k in ("prompt", "messages", "prompt_ids")):
        raise StreamerError("no prompt: give one of prompt, messages or prompt_ids")
    ids = engine.prompt_ids(obj.get("prompt"), prompt_ids=obj.get("prompt_ids"), messages=obj.get("messages"))
    opts = {**defaults, **{k: obj[k] for k in LINE_OPTIONS if k in obj}}
    if opts.get("seed") is None:  # reproducible per prompt whatever batch it lands in
        opts["seed"] = zlib.crc32(json.dumps([seed, rid]).encode())
    params, stop_text = engine.sampling(**opts)
    engine.check_fits(len(ids), params.max_new_tokens)
    n = obj.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise StreamerError(f"must be an integer from 1 to {MAX_N}, got {n!r}", param="n")
    return Request(rid, ids, params, stop_text, n)


def choices(req: Request) -> list[Request]:
    """A request of n completions as n requests, each seeded apart (greedy ones come out the same)."""
    if req.n == 1:
        return [req]
    return [Request(Choice(req.id, i), req.prompt, replace(req.params, seed=zlib.crc32(json.dumps([req.params.seed, i]).encode())),
                    req.stop_text) for i in range(req.n)]


def gather(records: Iterator[dict], n_of: dict, totals: dict) -> Iterator[dict]:
    """Each request's record once all its completions are in: with n > 1, {"id", "choices": [...], "usage"};
    counted in totals as one prompt."""
    held: dict[str, list] = {}
    for r in records:
        if isinstance(r["id"], Choice):
            rid, i = r["id"]
            got = held.setdefault(key(rid), [None] * n_of[key(rid)])
            got[i] = {k: v for k, v in r.items() if k not in ("id", "usage")}
            if not all(got):
                continue
            del held[key(rid)]
            r = {"id": rid, "choices": got, "usage": {"prompt_tokens": r["usage"]["prompt_tokens"],
                                                      "completion_tokens": sum(len(c["tokens"]) for c in got)}}
        totals["prompts"] += 1
        totals["prompt_tokens"] += r["usage"]["prompt_tokens"]
        yield r


def run_batch(runner, cache, requests: list[Request], tok, totals: dict, draft=None, k: int = 0,
              size=None, target=None) -> Iterator[dict]:
    """Continuous batching over cache.slots slots; yields each result record as its sequence finishes.
    Each pass carries one token of every decoding sequence, then chunks of the prompts still prefilling, in
    the order they were admitted, as many as `target` (costs.PassTarget) gives them room for (default: all,
    within the runner's tokens per pass). A sequence samples once its whole prompt is in.
    With a draft, every pass in which all sequences decode also checks up to k draft tokens per sequence
    (or what `size` picks for the pass, shared among them), as generate.generate does for one."""
    waiting = list(reversed(requests))
    free = list(range(cache.slots - 1, -1, -1))
    active: dict[int, Active] = {}
    held = PrefixIndex()  # prompts whose keys and values are in the cache, by block prefix
    computing, prompts = PrefixIndex(), {}  # prompts admitted and not yet all in the cache
    totals.update(drafted=0, accepted=0, draft_s=0.0, shared_prompt_tokens=0)
    admissions = 0
    while waiting or active:
        while free and waiting:
            req = waiting[-1]
            src, n = held.longest(req.prompt, cache.tokens)
            if computing.longest(req.prompt, prompts)[1] > n:
                break  # a prompt being computed shares more of it: wait until it is in and copy its cache
            slot = free.pop()
            waiting.pop()
            held.drop(slot)
            n = min(n, len(req.prompt) - 1)  # the last prompt token always runs: its logits start decoding
            cache.reserve(slot, len(req.prompt) + req.params.max_new_tokens - 1)
            if n and src != slot:
                cache.copy_prefix(src, slot, n)
            cache.tokens[slot] = cache.tokens[slot][:n]
            totals["shared_prompt_tokens"] += n
            text = TextOut(tok, req.stop_text) if tok else None
            active[slot] = Active(req, Sampler(req.params), text, pending=list(req.prompt[n:]), order=admissions)
            admissions += 1
            computing.add(slot, req.prompt)
            prompts[slot] = req.prompt
        feed = _pass_tokens(active, target, runner.max_pass_tokens)
        slots = sorted(feed)
        prefill = any(len(active[s].pending) > 1 for s in active)
        t0 = now()
        trees = {s: NOTHING for s in slots} if prefill or not draft else _propose(draft, active, slots, k, size, runner)
        totals["draft_s"] += now() - t0
        t1 = now()
        starts = {s: len(cache.tokens[s]) for s in slots}
        if any(t.tokens for t in trees.values()):  # every pass in one: a row of logits per checked token
            chunks = [chunk(s, active[s].pending[0], trees[s], starts[s]) for s in slots]
            logits = runner.forward(chunks, cache, phase="decode", every=True)
            bounds = list(accumulate((len(c[1]) for c in chunks), initial=0))
            rows = {s: logits[bounds[i]:bounds[i + 1]] for i, s in enumerate(slots)}
        else:
            logits = runner.forward([(s, feed[s]) for s in slots], cache, phase="prefill" if prefill else "decode")
            rows = {s: logits[i:i + 1] for i, s in enumerate(slots)}
        fed = sum(len(feed[s]) + len(trees[s].tokens) for s in slots)
        if size is not None:
            size.observe(now() - t1, fed)
        if target is not None:
            target.observe(now() - t1, fed)
        totals["steps"] += 1
        for slot in slots:
            a, tree = active[slot], trees[slot]
            a.pending = a.pending[len(feed[slot]):]
            if a.pending:
                continue  # more of its prompt to run
            if not a.tokens:  # its prompt is now all in the cache: later prompts may share it
                held.add(slot, a.req.prompt)
                computing.drop(slot)
            steps, kept = verified(rows[slot], tree, a.sampler)
            if tree.tokens:
                totals["drafted"] += len(tree.tokens)
                totals["accepted"] += len(kept) - 1
                cache.keep_rows(slot, starts[slot], kept)
            for lg, token in steps:
                step = step_of(lg, a.req.params.logprobs, token)
                a.tokens.append(step.token)
                a.logprobs.append(step.logprob)
                a.top.append(step.top)
                a.pending = [step.token]
                reason = _finished(a, step.token)
                if reason:
                    totals["completion_tokens"] += len(a.tokens)
                    del active[slot]
                    free.append(slot)
                    yield _record(a, reason)
                    break


class PrefixIndex:
    """Which slot's KV cache holds a prompt's first BLOCK, 2 BLOCK, ... tokens, keyed by a hash chained over
    the blocks: a prompt admitted later copies the longest such prefix instead of recomputing it (its keys and
    values at the same positions are the same). Matches are checked token for token."""
    BLOCK = 16

    def __init__(self):
        self.where: dict[int, int] = {}
        self.keys: dict[int, list[int]] = {}

    def _chain(self, tokens):
        h = 0
        for k in range(len(tokens) // self.BLOCK):
            h = hash((h, tuple(tokens[k * self.BLOCK:(k + 1) * self.BLOCK])))
            yield (k + 1) * self.BLOCK, h

    def add(self, slot: int, tokens) -> None:
        for _, h in self._chain(tokens):
            self.where.setdefault(h, slot)
            self.keys.setdefault(slot, []).append(h)

    def drop(self, slot: int) -> None:
        """The slot is taken by another sequence: its prefixes go."""
        for h in self.keys.pop(slot, []):
            if self.where.get(h) == slot:
                del self.where[h]

    def longest(self, tokens, held) -> tuple[int | None, int]:
        """(slot, n): the slot whose held tokens (held[slot]) start with the longest run of whole blocks of
        `tokens`, and that run's length; (None, 0) when none does. A chain's hash covers every block before,
        so the slot holding the longest run holds the shorter ones too: only that one is checked."""
        best = (None, 0)
        for n, h in self._chain(tokens):
            if h not in self.where:
                break
            best = (self.where[h], n)
        slot, n = best
        return best if n and list(held[slot][:n]) == list(tokens[:n]) else (None, 0)


def _pass_tokens(active: dict[int, Active], target, limit: int) -> dict[int, list[int]]:
    """The ids each sequence feeds in this pass: decoding ones their one token, then prompts in the order
    they were admitted, as much of each as the target leaves room for (a prompt's last token counts as a
    prompt's: it fits in any room)."""
    decode = [s for s, a in active.items() if a.tokens]
    room = target.prefill_room(len(decode)) if target is not None else max(limit - len(decode), 0)
    feed = {s: active[s].pending for s in decode}
    for s in sorted((s for s in active if not active[s].tokens), key=lambda s: active[s].order):
        pending = active[s].pending
        take = pending[:room] or (pending if len(pending) == 1 else [])
        if take:
            feed[s] = take
            room -= len(take)
    return feed


def _propose(draft, active: dict, slots: list[int], k: int, size, runner) -> dict:
    """Each decoding sequence's draft tree for this pass: up to k tokens (or its share of what `size` picks),
    within what it may still generate and what one pass holds."""
    each = min(k or max(1, size.size() // len(slots)), runner.max_pass_tokens // len(slots) - 1)
    trees = {}
    for s in slots:
        a = active[s]
        limit = min(each, a.req.params.max_new_tokens - len(a.tokens) - 1)
        trees[s] = propose(draft, a.req.prompt + a.tokens, limit, s, runner.args.vocab_size)
    return trees


def _finished(a: Active, token: int) -> str | None:
    if token in a.req.params.stop_ids:
        return "stop"
    if a.text and a.text.feed(token)[1]:
        return "stop"
    if len(a.tokens) >= a.req.params.max_new_tokens:
        return "length"
    return None


def _record(a: Active, reason: str) -> dict:
    text = None
    if a.text:
        a.text.flush()
        text = a.text.text
    return {"id": a.req.id, "text": text, "tokens": a.tokens, "logprobs": a.logprobs,
            **({"top_logprobs": a.top} if a.req.params.logprobs else {}), "finish_reason": reason,
            "usage": {"prompt_tokens": len(a.req.prompt), "completion_tokens": len(a.tokens)}}


# --- streamer batch: JSONL in, JSONL out ------------------------------------------------------------------

def read_lines(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, the request object or None, the error or None) for every non-blank line."""
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
            except json.JSONDecodeError as e:
                yield n, None, f"invalid JSON ({e})"
                continue
            yield (n, obj, None) if isinstance(obj, dict) else (n, None, "expected a JSON object")


def key(rid) -> str:
    return json.dumps(rid)


def record_key(record: dict) -> str:
    """The request a result line answers: its custom_id (OpenAI's format) or id."""
    return key(record["custom_id"] if "custom_id" in record else record["id"])


def failed(record: dict) -> bool:
    return record.get("error") is not None


class ResultLog:
    """The output JSONL: ids already done, a torn last line repaired, error records set aside to be retried,
    each new record appended durably."""

    def __init__(self, path: Path):
        self.path = Path(path)
        records = self._read() if self.path.exists() else []
        kept = [r for r in records if not failed(r)]
        self.done = {record_key(r) for r in kept}
        if len(kept) < len(records):  # ids whose only record is an error are retried: the new record replaces it
            write_atomic(self.path, b"".join((json.dumps(r) + "\n").encode() for r in kept))
        try:
            self.f = open(self.path, "ab")
        except OSError as e:
            raise StreamerError(f"{self.path}: cannot write ({e.strerror})") from None

    def _read(self) -> list[dict]:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a kill mid-write left a partial record: drop it, it will be redone
            log.warning(f"{self.path}: removing a torn last line ({len(data) - end} bytes)")
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        records = []
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
                record_key(record)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise StreamerError(f"{self.path}: a line is not a result record; refusing to append to it") from None
            records.append(record)
        return records

    def write(self, record: dict) -> None:
        self.f.write((json.dumps(record) + "\n").encode())  # one write per record, then fsync
        self.f.flush()
        os.fsync(self.f.fileno())
        if not failed(record):
            self.done.add(record_key(record))

    def close(self) -> None:
        self.f.close()


def batch_size(text: str) -> int | str:
    """--batch-size: a positive integer or auto."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text!r}")
    return int(text)


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", type=Path, help="a folder written by `streamer split`")
    p.add_argument("prompts", type=Path, help="JSONL, one request a line: {id, prompt | messages | prompt_ids, "
                   "[max_new_tokens, temperature, top_p, seed, stop]}")
    p.add_argument("--out", type=Path, required=True, help="results JSONL (appended; rerun to resume)")
    p.add_argument("--batch-size", type=batch_size, default="auto", help="sequences that share each pass over the "
                   "weights (auto: the most tokens/s that the memory budget allows, from this machine's disk and matmul "
                   f"rates, up to {AUTO_BATCH_MAX})")
    p.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per prompt, for lines that set none")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature for lines that set none (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass for lines that set none")
    p.add_argument("--seed", type=int, default=0, help="seeds lines that set none (mixed with the line's id)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (auto: bfloat16 where the CPU has native bf16 matmuls)")
    p.add_argument("--max-seq-len", type=int, help="context length (default: the model's, or 8192)")
    p.add_argument("--memory-budget", metavar="SIZE", help="RAM this run may use, e.g. 512M or 8G (default: the "
                   "memory cgroup's limit, or 85%% of the available memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ray", metavar="ADDRESS", help="run on every machine of a Ray cluster (`auto`, or HOST:PORT of "
                   "its head): one worker per machine, each reading MODEL at this same path; results still go to --out")
    p.add_argument("--ray-chunk", type=int, metavar="N", help="requests handed to a Ray worker at a time (default: "
                   "4 x --batch-size, or 256 with auto); a chunk whose worker dies runs again elsewhere")
    add_draft_options(p)
    return p


def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .engine import Engine

    results = ResultLog(args.out)
    lines, requests, line_of, errors, skipped = 0, [], {}, 0, 0
    try:
        engine_options = dict(memory_budget=args.memory_budget, dtype=args.dtype, max_seq_len=args.max_seq_len,
                              draft=args.draft, draft_tokens=args.draft_tokens, draft_branches=args.draft_branches)
        with Engine(args.model, **engine_options) as engine:
            openai = {}  # key(id) -> the OpenAI request line, whose result goes out in OpenAI's format

            def write(record: dict, n: int | None = None) -> None:
                if "error" in record and n is not None:
                    record = {**record, "line": n, "error": f"line {n}: {record['error']}"}
                obj = openai.get(key(record["id"]))
                results.write(openai_batch.to_output(obj, record, args.model.name, engine.tokenizer) if obj else record)

            for n, obj, error in read_lines(args.prompts):
                lines += 1
                rid = obj.get("id", n) if obj is not None else n
                if obj is not None and openai_batch.is_openai(obj):
                    rid = obj["custom_id"]
                    if key(rid) not in results.done and key(rid) not in line_of:
                        openai[key(rid)] = obj
                        try:
                            obj = openai_batch.to_request(obj)
                        except StreamerError as e:
                            error = str(e)
                if key(rid) in results.done:
                    skipped += 1
                elif key(rid) in line_of:
                    log.warning(f"{args.prompts}: line {n}: id {key(rid)} appears on line {line_of[key(rid)]} too; "
                                "only the first is run")
                    skipped += 1
                elif error:
                    write({"id": rid, "error": error}, n)
                    errors += 1
                else:
                    line_of[key(rid)] = n
                    requests.append({**obj, "id": rid})
            bar = tqdm(total=lines, initial=skipped + errors, unit="prompt", desc="batch", disable=args.quiet, file=sys.stderr)
            totals, t0 = {}, now()
            options = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed)
            if args.ray:
                from . import ray as on_ray  # every worker opens its Engine with the driver's options
                per_worker = args.ray_chunk or (256 if args.batch_size == "auto" else 4 * args.batch_size)
                records = on_ray.run_batch(args.ray, str(args.model), engine.files.manifest_sha256, requests,
                                           engine_options, options, per_worker, totals)
            else:
                records = engine.batch(requests, totals=totals, **options)
            for record in records:
                n = None
                if "error" in record:
                    n, param = line_of[key(record["id"])], record.get("param")
                    message = record["error"]
                    if param in CLI_FLAGS:  # the run's options, not the line's, are at fault: name the flag
                        message = f"{CLI_FLAGS[param]} {message.removeprefix(param + ' ')}"
                    record = {"id": record["id"], "error": message}
                    errors += 1
                write(record, n)
                bar.update(1)
                bar.set_postfix_str(f"{totals.get('completion_tokens', 0)} tokens")
            bar.close()
            secs = now() - t0
            report = engine.memory()
    finally:
        results.close()
    done = totals.get("prompts", 0)
    print(f"batch: {done} done, {errors} failed, {skipped} already in {args.out}; {totals.get('completion_tokens', 0)} "
          f"tokens in {secs:.1f} s ({totals.get('completion_tokens', 0) / max(secs, 1e-9):.2f} tokens/s, "
          f"batch {totals.get('batch_size', '-')}{' (auto)' if args.batch_size == 'auto' else ''}, "
          f"{totals.get('steps', 0)} steps{_draft_summary(totals)}"
          + (f"; {totals['shared_prompt_tokens']} prompt tokens copied from shared prefixes, not recomputed"
             if totals.get("shared_prompt_tokens") else "") + f"); {report.summary()}", file=sys.stderr)
    if errors:
        print(f"batch: {errors} line(s) failed: their error records are in {args.out}; fix them and rerun to retry them",
              file=sys.stderr)
    return 1 if errors else 0


def _draft_summary(totals: dict) -> str:
    if not totals.get("drafted"):
        return ""
    return (f"; draft: {totals['accepted']} of {totals['drafted']} proposed tokens kept, "
            f"drafting {totals['draft_s']:.1f} s")
