"""Token generation as a generator: prefill (or resume from a kept cache), then one token per step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .errors import StreamerError
from .kvcache import KVCache
from .memory import now
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
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise StreamerError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise StreamerError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise StreamerError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.logprobs < 0:
            raise StreamerError(f"logprobs must be >= 0, got {self.logprobs!r}")


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
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    @property
    def decode_s_per_token(self) -> float:
        return sum(self.decode_s) / len(self.decode_s) if self.decode_s else 0.0


class Sampler:
    """Greedy, or temperature + nucleus sampling from a per-sequence seeded generator."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen = torch.Generator()
        self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> Step:
        logp = torch.log_softmax(logits.float(), dim=-1)  # [vocab]
        if self.p.temperature == 0:
            token = int(torch.argmax(logp))
        else:
            probs = torch.softmax(logits.float() / self.p.temperature, dim=-1)
            if self.p.top_p < 1:
                sorted_p, order = probs.sort(descending=True)
                keep = (sorted_p.cumsum(0) - sorted_p) < self.p.top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
            token = int(torch.multinomial(probs, 1, generator=self.gen))
        top = []
        if self.p.logprobs:
            values, ids = logp.topk(self.p.logprobs)
            top = [(int(i), float(v)) for i, v in zip(ids, values)]
        return Step(token, float(logp[token]), top)


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
                            f"at position {diff}); use another --kv-dir or remove it")
    keep = min(len(held), len(prompt) - 1)  # the last prompt token always runs: its logits start decoding
    cache.tokens[slot] = held[:keep]
    return keep


def generate(runner: Runner, cache: KVCache, prompt: Sequence[int], params: SamplingParams,
             stats: GenStats | None = None, slot: int = 0) -> Iterator[Step]:
    """Yield generated tokens one by one. The cache keeps every token fed so far, so a kept cache resumes."""
    params.check()
    prompt = list(prompt)
    check_prompt(prompt, runner.args.vocab_size)
    stats = stats if stats is not None else GenStats()
    keep = resume_point(cache, slot, prompt)
    cache.reserve(slot, len(prompt) + params.max_new_tokens - 1)
    stats.prompt_tokens, stats.reused_tokens = len(prompt), keep
    sampler = Sampler(params)
    t0 = now()
    logits = runner.forward([(slot, prompt[keep:])], cache, phase="prefill")
    stats.prefill_s = now() - t0
    for n in range(params.max_new_tokens):
        step = sampler(logits[0])
        if step.token in params.stop_ids:
            step.finish_reason = "stop"
        elif n + 1 == params.max_new_tokens:
            step.finish_reason = "length"
        yield step
        if step.finish_reason:
            return
        t0 = now()
        logits = runner.forward([(slot, [step.token])], cache, phase="decode")
        stats.decode_s.append(now() - t0)
