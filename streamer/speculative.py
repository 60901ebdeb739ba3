"""Speculative decoding's drafts: they propose the next tokens, and generate.generate has the target check
them all in one pass over its weights, keeping what plain decoding would have produced (greedy) or what
speculative sampling's rule accepts (generate.accept), plus one token of its own.

Drafts: `NgramDraft` (prompt lookup: what followed the latest earlier occurrence of the last tokens; no
memory), `ModelDraft` (a small model with the target's vocabulary, kept in RAM, proposing its own greedy
continuation), or any object with propose(tokens, k) -> up to k ids."""
from __future__ import annotations

from typing import Sequence

from .budget import plan
from .errors import StreamerError


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
