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
        return sum(self.decode_s) / len(self.decode_s) if self.decode_s else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "reused_prompt_tokens": self.reused_tokens,
                "completion_tokens": self.completion_tokens, "prefill_s": self.prefill_s,
                "decode_s_per_token": self.decode_s_per_token, "passes": self.passes, "tokens_run": self.tokens_run,
                "bytes_read": self.bytes_read, "resident_bytes": self.resident_bytes, "memory": self.memory,
                **({"drafted": self.drafted, "accepted": self.accepted, "draft_s": self.draft_s} if self.drafted else {})}


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

    def __call__(self, logits: torch.Tensor) -> Step:
        if self.p.temperature == 0:
            return step_of(logits, self.p.logprobs)
        return step_of(logits, self.p.logprobs, int(torch.multinomial(self.distribution(logits), 1, generator=self.gen)))


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


def accept(ps: Sequence[torch.Tensor], proposed: Sequence[int], gen: torch.Generator) -> tuple[int, int]:
    """Speculative sampling's rule for a chain of deterministic proposals (a point mass q at each: n-gram
    lookup and a draft model's greedy picks). ps[i] is the target's sampling distribution at proposal i,
    with one more row for the token after the last. Proposal x is kept with probability p(x); at the first
    one refused, the next token comes from p with x taken out (max(p - q, 0), renormalised), and after the
    last one kept, from the extra row. Each emitted token is then distributed exactly as the target alone
    would sample it (Leviathan et al. 2023, Chen et al. 2023). Returns (proposals kept, the token after them);
    with nothing proposed, that token is plain sampling's draw from ps[0]."""
    for i, x in enumerate(proposed):
        p = ps[i]
        if float(torch.rand((), generator=gen)) < float(p[x]):
            continue
        rest = p.clone()
        rest[x] = 0
        return i, int(torch.multinomial(rest, 1, generator=gen))  # p(x) < 1 here, so some mass is left
    return len(proposed), int(torch.multinomial(ps[len(proposed)], 1, generator=gen))


def generate(runner: Runner, cache: KVCache, prompt: Sequence[int], params: SamplingParams,
             stats: GenStats | None = None, slot: int = 0, draft=None, k: int = 0) -> Iterator[Step]:
    """Yield generated tokens one by one. The cache keeps every token fed so far, so a kept cache resumes.

    With a draft (speculative.py), each pass also checks up to k tokens it proposes after the last one:
    greedy keeps the longest prefix the target agrees with (so the output is plain greedy decoding's),
    sampling applies `accept` (so it keeps the target's distribution), and the target's own token follows.
    Rejected tokens leave the cache, which ends as plain decoding leaves it."""
    params.check()
    prompt = list(prompt)
    check_prompt(prompt, runner.args.vocab_size)
    stats = stats if stats is not None else GenStats()
    keep = resume_point(cache, slot, prompt)
    cache.reserve(slot, len(prompt) + params.max_new_tokens - 1)  # proposals never go past the last token
    stats.prompt_tokens, stats.reused_tokens = len(prompt), keep
    sampler = Sampler(params)

    def verified(logits: torch.Tensor, props: list[int]) -> list[tuple[torch.Tensor, int]]:
        """(logits, token) of the kept proposals, then of the target's own next token."""
        if params.temperature == 0:
            m = next((i for i, t in enumerate(props) if int(logits[i].argmax()) != t), len(props))
            own = int(logits[m].argmax())
        else:
            m, own = accept([sampler.distribution(row) for row in logits[:len(props) + 1]], props, sampler.gen)
        return [(logits[i], props[i]) for i in range(m)] + [(logits[m], own)]

    t0 = now()
    rows = verified(runner.forward([(slot, prompt[keep:])], cache, phase="prefill"), [])
    stats.prefill_s = now() - t0
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
            props = draft.propose(tokens, min(k, params.max_new_tokens - n - 1)) if draft else []
            t1 = now()
            # nothing proposed: a plain decode step, on the one-row kernels
            logits = runner.forward([(slot, [tokens[-1]] + props)], cache, phase="decode", every=bool(props))
            rows = verified(logits, props)
            stats.decode_s.append(now() - t1)
            if props:
                stats.draft_s += t1 - t0
                stats.drafted += len(props)
                stats.accepted += len(rows) - 1
                _forget(cache, slot, len(tokens) + len(rows) - 1)  # the rejected proposals leave nothing behind
    finally:
        _forget(cache, slot, len(tokens) - 1)


def _forget(cache: KVCache, slot: int, keep: int) -> None:
    """Keep only the slot's first `keep` tokens in the cache (and on disk)."""
    if len(cache.tokens[slot]) > keep:
        cache.tokens[slot] = cache.tokens[slot][:keep]
        cache.commit()
