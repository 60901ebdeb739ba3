"""Token generation as a generator: prefill (or resume from a kept cache), then one token per step."""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .errors import StreamerError
from .kvcache import KVCache
from .files import now
from .runner import Runner
from .speculative import NOTHING, PassSize, Tree, propose, tree_layout
from .tokenizer import STOP_IDS


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = STOP_IDS
    logprobs: int = 0  # also return the K best [id, logprob] per step

    def check(self) -> None:
        """Raise naming the parameter at fault (the CLI shows it as the flag)."""
        def bad(name, what):
            raise StreamerError(f"must be {what}, got {getattr(self, name)!r}", param=name)
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            bad("max_new_tokens", "a positive integer")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            bad("temperature", ">= 0 (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "an integer")
        if not _is_int(self.logprobs) or self.logprobs < 0:
            bad("logprobs", "an integer >= 0")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class Step:
    token: int
    logprob: float  # log-probability of `token` under the model (before temperature)
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" on the last step


@dataclass
class GenStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose keys and values came from a kept cache
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)
    passes: int = 0  # passes over the weights this generation made
    tokens_run: int = 0  # tokens it ran through the blocks (prompt tokens not reused, then one per step)
    bytes_read: int = 0  # weight bytes read from disk, resident blocks' first read included
    resident_bytes: int = 0  # of which: blocks read once and kept in RAM for the next passes
    memory: dict = field(default_factory=dict)  # the memory report so far (MemoryReport.as_dict)
    drafted: int = 0  # with a draft: tokens it proposed
    accepted: int = 0  # of which the target kept
    draft_s: float = 0.0  # seconds spent drafting (decode_s holds the verification passes)

    @property
    def decode_s_per_token(self) -> float:
        """Seconds per token after the first (which the prefill gives): the passes, and the drafting with a draft."""
        return (sum(self.decode_s) + self.draft_s) / (self.completion_tokens - 1) if self.completion_tokens > 1 else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "reused_prompt_tokens": self.reused_tokens,
                "completion_tokens": self.completion_tokens, "prefill_s": self.prefill_s,
                "decode_s_per_token": self.decode_s_per_token, "passes": self.passes, "tokens_run": self.tokens_run,
                "bytes_read": self.bytes_read, "resident_bytes": self.resident_bytes, "memory": self.memory,
                **({"drafted": self.drafted, "accepted": self.accepted, "draft_s": self.draft_s,
                    "verify_s": sum(self.decode_s), "tokens_per_pass": self.completion_tokens / max(self.passes, 1)}
                   if self.drafted else {})}


class Sampler:
    """Greedy, or temperature + nucleus (top-p) sampling from a per-sequence seeded generator."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen = torch.Generator()
        self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities sampled from (temperature > 0): softmax(logits / T), cut to the smallest set of
        most likely tokens whose mass reaches top_p, renormalised."""
        probs = torch.softmax(logits.float() / self.p.temperature, dim=-1)
        if self.p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = (sorted_p.cumsum(0) - sorted_p) < self.p.top_p  # the mass before it has not reached top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
            probs /= probs.sum()
        return probs


def step_of(logits: torch.Tensor, logprobs: int = 0, token: int | None = None) -> Step:
    """The step of `token` (default: the most likely) under logits: its log-probability, and the `logprobs`
    most likely tokens with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [vocab]
    token = int(torch.argmax(logp)) if token is None else token
    top = []
    if logprobs:
        values, ids = logp.topk(logprobs)
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return Step(token, float(logp[token]), top)


class TextOut:
    """The text of generated tokens, decoded incrementally, held back where a stop string may be starting.
    feed(token) returns (text safe to show now, whether a stop string appeared); `text` is the whole text,
    cut before the first stop string."""

    def __init__(self, tok, stop: Sequence[str] = ()):
        self.tok, self.stop = tok, [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text, self.shown = "", 0
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def feed(self, token: int) -> tuple[str, bool]:
        self.text += self.decoder.decode(self.tok.decode_bytes([token]))
        cut = min((i for s in self.stop if (i := self.text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
        upto = len(self.text) if cut >= 0 else max(self.shown, len(self.text) - self.hold)
        out, self.shown = self.text[self.shown:upto], upto
        return out, cut >= 0

    def flush(self) -> str:
        """The rest of the text, at the end of the generation."""
        self.text += self.decoder.decode(b"", final=True)
        out, self.shown = self.text[self.shown:], len(self.text)
        return out


def check_prompt(ids: Sequence[int], vocab_size: int) -> None:
    if len(ids) == 0:
        raise StreamerError("the prompt is empty")
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or t < 0 or t >= vocab_size:
            raise StreamerError(f"prompt id {t!r} at position {i} is outside the vocabulary [0, {vocab_size})")


def resume_point(cache: KVCache, slot: int, prompt: Sequence[int]) -> int:
    """How many prompt tokens the cache already holds; a cache holding anything else is refused."""
    held = cache.tokens[slot]
    if held and list(prompt[:len(held)]) != held:
        diff = next((i for i, (a, b) in enumerate(zip(held, prompt)) if a != b), min(len(held), len(prompt)))
        raise StreamerError(f"the KV cache holds another prompt (its {len(held)} tokens differ from this one "
                            f"at position {diff}); use another KV folder or remove it")
    keep = min(len(held), len(prompt) - 1)  # the last prompt token always runs: its logits start decoding
    cache.tokens[slot] = held[:keep]
    return keep


def accept(dist, tree: Tree, gen: torch.Generator) -> tuple[list[int], int]:
    """Speculative sampling's rule for a tree of deterministic proposals (a point mass at each node: n-gram
    lookup, a draft model's likeliest tokens). dist(r) is the target's sampling distribution after chunk row r
    (row 0: the root, the last token; row i + 1: node i). From the root, each child x in turn is kept with
    probability p(x); refused, it is taken out of p (renormalised) before the next child is tried. The first
    child kept becomes the node whose children are tried next; when all are refused, the next token comes from
    what is left of p. Each emitted token is then distributed exactly as the target alone would sample it
    (Leviathan et al. 2023, Chen et al. 2023; for trees the recursive rejection of SpecInfer, Miao et al. 2024).
    Returns the kept nodes (a path from the root) and the token after them."""
    kids, path, row = tree.children(), [], 0
    while True:
        p = dist(row)
        for c in kids[row]:
            x = tree.tokens[c]
            if float(torch.rand((), generator=gen)) < float(p[x]):
                break
            p = p.clone()
            p[x] = 0
            if not float(p.sum()) > 0:  # rounding refused a child that held all the mass left
                break
            p /= p.sum()
        else:
            return path, int(torch.multinomial(p, 1, generator=gen))
        path.append(c)
        row = c + 1


def accept_greedy(logits: torch.Tensor, tree: Tree) -> tuple[list[int], int]:
    """Greedy decoding's path through the tree: from the root, the child holding the target's most likely
    token, as long as there is one; then that token. logits: the target's, one row per chunk row."""
    kids, path, row = tree.children(), [], 0
    while True:
        t = int(logits[row].argmax())
        c = next((c for c in kids[row] if tree.tokens[c] == t), None)
        if c is None:
            return path, t
        path.append(c)
        row = c + 1


def verified(logits: torch.Tensor, tree: Tree, sampler: Sampler) -> tuple[list[tuple[torch.Tensor, int]], list[int]]:
    """The tokens a pass yields, with the logits each was drawn from (the kept nodes, then the target's own
    token), and the chunk rows to keep in the cache (the root and the kept nodes)."""
    if sampler.p.temperature == 0:
        path, own = accept_greedy(logits, tree)
    else:
        path, own = accept(lambda r: sampler.distribution(logits[r]), tree, sampler.gen)
    rows = [0] + [c + 1 for c in path]
    return [(logits[r], t) for r, t in zip(rows, [tree.tokens[c] for c in path] + [own])], rows


def generate(runner: Runner, cache: KVCache, prompt: Sequence[int], params: SamplingParams,
             stats: GenStats | None = None, slot: int = 0, draft=None, k: int = 8,
             size: PassSize | None = None) -> Iterator[Step]:
    """Yield generated tokens one by one. The cache keeps every token fed so far, so a kept cache resumes.

    With a draft (speculative.py), each pass also checks up to k tokens it proposes after the last one (or
    as many as `size` picks from the passes so far), as a chain or a tree: greedy keeps the path the target
    agrees with (so the output is plain greedy decoding's), sampling applies `accept` (so it keeps the target's
    distribution), and the target's own token follows. Rejected tokens leave the cache, which ends as plain
    decoding leaves it."""
    params.check()
    prompt = list(prompt)
    check_prompt(prompt, runner.args.vocab_size)
    stats = stats if stats is not None else GenStats()
    keep = resume_point(cache, slot, prompt)
    cache.reserve(slot, len(prompt) + params.max_new_tokens - 1)  # proposals never go past the last token
    stats.prompt_tokens, stats.reused_tokens = len(prompt), keep
    sampler = Sampler(params)

    t0 = now()
    rows, _ = verified(runner.forward([(slot, prompt[keep:])], cache, phase="prefill"), NOTHING, sampler)
    stats.prefill_s = now() - t0
    if size is not None:
        size.observe(stats.prefill_s, len(prompt) - keep)
    tokens = list(prompt)
    try:
        while True:
            for logits, token in rows:
                step = step_of(logits, params.logprobs, token)
                tokens.append(token)
                n = stats.completion_tokens = len(tokens) - len(prompt)
                if token in params.stop_ids:
                    step.finish_reason = "stop"
                elif n == params.max_new_tokens:
                    step.finish_reason = "length"
                yield step
                if step.finish_reason:
                    return
            t0 = now()
            limit = min(size.size() if size is not None else k, params.max_new_tokens - n - 1)
            tree = propose(draft, tokens, limit, slot, runner.args.vocab_size)
            t1 = now()
            start = len(cache.tokens[slot])
            logits = runner.forward([chunk(slot, tokens[-1], tree, start)], cache, phase="decode", every=bool(tree.tokens))
            rows, kept = verified(logits, tree, sampler)
            stats.decode_s.append(now() - t1)
            if size is not None:
                size.observe(stats.decode_s[-1], 1 + len(tree.tokens))
            if tree.tokens:
                stats.draft_s += t1 - t0
                stats.drafted += len(tree.tokens)
                stats.accepted += len(kept) - 1
                cache.keep_rows(slot, start, kept)  # the rejected proposals leave nothing behind
    finally:
        if len(cache.tokens[slot]) >= len(tokens):  # stopped before the last pass's tokens were all yielded
            cache.keep_rows(slot, len(tokens) - 1, [])


def chunk(slot: int, last: int, tree: Tree, start: int) -> tuple:
    """The runner's chunk for a pass checking `tree` after the last token, whose cache row is `start`: a chain
    runs causally, a tree with its positions and mask."""
    if tree.is_chain():  # nothing proposed: a plain decode step, on the one-row kernels
        return slot, [last] + tree.tokens
    return (slot, [last] + tree.tokens, *tree_layout([-1] + [p + 1 for p in tree.parents], start))
