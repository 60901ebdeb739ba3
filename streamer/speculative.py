"""Speculative decoding: a draft proposes the next tokens, the target checks them all in one pass over its
weights and keeps the longest prefix it agrees with (greedy), or that speculative sampling's rule accepts
(accept), plus one token of its own. Greedy output is token for token plain greedy decoding's, sampled output
has the target's own distribution; what changes is how many tokens each pass yields.

Drafts: `NgramDraft` (prompt lookup: what followed the latest earlier occurrence of the last tokens; no
memory), `ModelDraft` (a small model with the target's vocabulary, kept in RAM, proposing its own greedy
continuation), or any object with propose(tokens, k) -> up to k ids."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .budget import plan
from .errors import StreamerError
from .files import now
from .generate import GenStats, Sampler, SamplingParams, Step, check_prompt, resume_point, step_of
from .kvcache import KVCache
from .runner import Runner


class NgramDraft:
    """Proposes what followed the latest earlier occurrence of the last n tokens (n = max_n, then shorter),
    in the prompt and the output so far."""

    def __init__(self, max_n: int = 3):
        self.max_n = max_n

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        for n in range(min(self.max_n, len(tokens) - 1), 0, -1):
            tail = list(tokens[-n:])
            for start in range(len(tokens) - n - 1, -1, -1):
                if list(tokens[start:start + n]) == tail:
                    return list(tokens[start + n:start + n + k])
        return []

    def close(self) -> None:
        pass


class ModelDraft:
    """A draft model's greedy continuation. Its KV cache keeps the tokens both models agree on; proposals
    the target rejected are dropped from it before the next proposal."""

    def __init__(self, engine, context: int):
        self.engine = engine
        # exactly its whole self in RAM: the target's plan set this share aside first (budget.draft_bytes)
        engine.budget = plan(engine.files, 1 << 62, 1, context).predicted_peak
        self.runner = engine.runner(1, context)
        self.cache = engine.kv_cache(1)
        self.cache.reserve(0, context)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        if k <= 0:
            return []
        held = self.cache.tokens[0]
        same = next((i for i, (a, b) in enumerate(zip(held, tokens)) if a != b), min(len(held), len(tokens)))
        self.cache.tokens[0] = held[:min(same, len(tokens) - 1)]  # the last token always runs: its logits are needed
        out = []
        logits = self.runner.forward([(0, list(tokens[len(self.cache.tokens[0]):]))], self.cache, phase="draft")
        while len(out) < k:
            out.append(int(logits[0].argmax()))
            if len(out) < k:
                logits = self.runner.forward([(0, [out[-1]])], self.cache, phase="draft")
        return out

    def close(self) -> None:
        self.cache.close()


def check_draft(target, draft) -> None:
    """A draft must share the target's vocabulary: its size, and the tokenizer file where both have one."""
    if draft.args.vocab_size != target.args.vocab_size:
        raise StreamerError(f"{draft.files.folder}: its vocabulary has {draft.args.vocab_size} tokens, the target's "
                            f"{target.args.vocab_size}: a draft must share the target's tokenizer", param="draft")
    mine, theirs = _tokenizer_entry(target.files), _tokenizer_entry(draft.files)
    if mine and theirs and mine != theirs:
        raise StreamerError(f"{draft.files.folder}: its tokenizer ({theirs[0]}, sha256 {theirs[1][:12]}…) is not the "
                            f"target's ({mine[0]}, sha256 {mine[1][:12]}…)", param="draft")


def _tokenizer_entry(files) -> tuple[str, str] | None:
    name = files.tokenizer_path.name if files.tokenizer_path else None
    entry = next((f for f in files.manifest["files"] if f["name"] == name), None)
    return (entry["name"], entry["sha256"]) if entry else None


def accept(ps: Sequence[torch.Tensor], proposed: Sequence[int], gen: torch.Generator) -> tuple[int, int]:
    """Speculative sampling's rule for a chain of deterministic proposals (a point mass q at each: n-gram
    lookup and the draft model's greedy picks). ps[i] is the target's sampling distribution at proposal i,
    with one more row for the token after the last. Proposal x is kept with probability p(x); at the first
    one refused, the next token comes from p with x taken out (max(p - q, 0), renormalised), and after the
    last one kept, from the extra row. Each emitted token is then distributed exactly as the target alone
    would sample it (Leviathan et al. 2023, Chen et al. 2023). Returns (proposals kept, the token after them)."""
    for i, x in enumerate(proposed):
        p = ps[i]
        if float(torch.rand((), generator=gen)) < float(p[x]):
            continue
        rest = p.clone()
        rest[x] = 0
        return i, int(torch.multinomial(rest, 1, generator=gen))  # p(x) < 1 here, so some mass is left
    return len(proposed), int(torch.multinomial(ps[len(proposed)], 1, generator=gen))


def generate(runner: Runner, cache: KVCache, prompt: Sequence[int], params: SamplingParams, draft, k: int,
             stats: GenStats | None = None, slot: int = 0) -> Iterator[Step]:
    """Like generate.generate, with up to k drafted tokens checked per pass. Greedy output is plain greedy
    decoding's token for token; sampled output has the target's distribution (accept). The cache ends as
    plain decoding leaves it: the prompt and every token but the last, none of the rejected ones."""
    params.check()
    prompt = list(prompt)
    check_prompt(prompt, runner.args.vocab_size)
    stats = stats if stats is not None else GenStats()
    sampler = Sampler(params)
    keep = resume_point(cache, slot, prompt)
    cache.reserve(slot, len(prompt) + params.max_new_tokens - 1)  # the proposals never go past the last token
    stats.prompt_tokens, stats.reused_tokens = len(prompt), keep
    t0 = now()
    first = runner.forward([(slot, prompt[keep:])], cache, phase="prefill")[0]
    rows = [(first, sampler(first).token)]
    stats.prefill_s = now() - t0
    tokens = list(prompt)
    try:
        while True:
            for logits, token in rows:  # the accepted drafts, then the target's own next token
                step = step_of(logits, params.logprobs, token)
                tokens.append(step.token)
                n = stats.completion_tokens = len(tokens) - len(prompt)
                if step.token in params.stop_ids:
                    step.finish_reason = "stop"
                elif n == params.max_new_tokens:
                    step.finish_reason = "length"
                yield step
                if step.finish_reason:
                    return
            t0 = now()
            props = draft.propose(tokens, min(k, params.max_new_tokens - n - 1))
            t1 = now()
            held = len(cache.tokens[slot])
            # nothing proposed: a plain decode step (on the one-row kernels, as without a draft)
            logits = runner.forward([(slot, [tokens[-1]] + props)], cache, phase="decode", every=bool(props))
            if params.temperature == 0:
                m = next((i for i, t in enumerate(props) if int(logits[i].argmax()) != t), len(props))
                own = int(logits[m].argmax())
            else:
                m, own = accept([sampler.distribution(row) for row in logits], props, sampler.gen)
            cache.tokens[slot] = cache.tokens[slot][:held + 1 + m]  # the rejected drafts leave nothing behind
            cache.commit()
            rows = [(logits[i], props[i]) for i in range(m)] + [(logits[m], own)]
            stats.draft_s += t1 - t0
            stats.decode_s.append(now() - t1)
            stats.drafted += len(props)
            stats.accepted += m
    finally:
        cache.tokens[slot] = cache.tokens[slot][:len(tokens) - 1]
        cache.commit()
