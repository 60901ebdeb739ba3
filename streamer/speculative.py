"""Speculative decoding, greedy: a draft proposes the next tokens, the target checks them all in one pass
over its weights and keeps the longest prefix it agrees with, plus one token of its own. The output is
token for token what plain greedy decoding gives; what changes is how many tokens each pass yields.

Drafts: `NgramDraft` (prompt lookup: what followed the latest earlier occurrence of the last tokens; no
memory) and `ModelDraft` (a small model with the target's vocabulary, kept in RAM, proposing its own
greedy continuation)."""
from __future__ import annotations

from typing import Iterator, Sequence


from .errors import StreamerError
from .files import now
from .generate import GenStats, SamplingParams, Step, check_prompt, resume_point, step_of
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
        self.runner = engine.runner(1, context)
        self.cache = engine.kv_cache(1)
        self.cache.reserve(0, context)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
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


def generate(runner: Runner, cache: KVCache, prompt: Sequence[int], params: SamplingParams, draft, k: int,
             stats: GenStats | None = None, slot: int = 0) -> Iterator[Step]:
    """Like generate.generate (greedy only), with up to k drafted tokens checked per pass. The cache ends
    as plain decoding leaves it: the prompt and every token but the last, none of the rejected ones."""
    params.check()
    if params.temperature > 0:
        raise StreamerError("speculative decoding is greedy only for now: use temperature 0 or no draft",
                            param="temperature")
    prompt = list(prompt)
    check_prompt(prompt, runner.args.vocab_size)
    stats = stats if stats is not None else GenStats()
    keep = resume_point(cache, slot, prompt)
    cache.reserve(slot, len(prompt) + params.max_new_tokens - 1)  # the proposals never go past the last token
    stats.prompt_tokens, stats.reused_tokens = len(prompt), keep
    t0 = now()
    rows = [(runner.forward([(slot, prompt[keep:])], cache, phase="prefill")[0], None)]
    stats.prefill_s = now() - t0
    tokens = list(prompt)
    try:
        while True:
            for logits, proposed in rows:  # the accepted drafts, then the target's own next token
                step = step_of(logits, params.logprobs, proposed)
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
            logits = runner.forward([(slot, [tokens[-1]] + props)], cache, phase="decode", every=True)
            m = next((i for i, t in enumerate(props) if int(logits[i].argmax()) != t), len(props))
            cache.tokens[slot] = cache.tokens[slot][:held + 1 + m]  # the rejected drafts leave nothing behind
            cache.commit()
            rows = [(logits[i], props[i]) for i in range(m)] + [(logits[m], None)]
            stats.draft_s += t1 - t0
            stats.decode_s.append(now() - t1)
            stats.drafted += len(props)
            stats.accepted += m
    finally:
        cache.tokens[slot] = cache.tokens[slot][:len(tokens) - 1]
        cache.commit()
