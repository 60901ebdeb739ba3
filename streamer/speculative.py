"""Speculative decoding's drafts: they propose the next tokens, as a chain or as a tree of alternatives, and
generate.generate has the target check them all in one pass over its weights, keeping what plain decoding
would have produced (greedy) or what speculative sampling's rule accepts (generate.accept), plus one token of
its own.

Drafts: `NgramDraft` (prompt lookup: what followed the latest earlier occurrence of the last tokens; no
memory), `ModelDraft` (a small model with the target's vocabulary, kept in RAM, growing a tree of its likeliest
continuations), or any object with propose(tokens, k) -> a Tree, or a list of up to k ids (a chain).
`PassSize` picks how many draft tokens a pass checks from what passes cost on this machine."""
from __future__ import annotations

import argparse
import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .budget import plan
from .costs import flops_per_token, matmul_rate
from .errors import StreamerError


@dataclass
class Tree:
    """Draft tokens to check after the last token (the root): tokens[i] follows parents[i], an earlier node,
    or the root (-1). A chain has parents [-1, 0, 1, ...]. Siblings come in the draft's order of preference."""
    tokens: list[int]
    parents: list[int]

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> "Tree":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))

    def children(self) -> list[list[int]]:
        """children[0]: the root's nodes; children[i + 1]: node i's."""
        out = [[] for _ in range(len(self.tokens) + 1)]
        for i, p in enumerate(self.parents):
            out[p + 1].append(i)
        return out


NOTHING = Tree([], [])  # a pass that checks no draft: the plain decode step


def as_tree(proposal, vocab_size: int, limit: int) -> Tree:
    """A draft's proposal as a checked Tree of at most `limit` nodes: a list of ids is a chain."""
    tree = proposal if isinstance(proposal, Tree) else Tree.chain(proposal)
    if len(tree.tokens) > limit or len(tree.parents) != len(tree.tokens):
        raise StreamerError(f"the draft proposed {len(tree.tokens)} tokens with {len(tree.parents)} parents; at most "
                            f"{limit} were asked for", param="draft")
    for i, (t, p) in enumerate(zip(tree.tokens, tree.parents)):
        if not isinstance(t, int) or not 0 <= t < vocab_size or not isinstance(p, int) or not -1 <= p < i:
            raise StreamerError(f"the draft's node {i} (token {t!r}, parent {p!r}) is not a token id below "
                                f"{vocab_size} following an earlier node or the root (-1)", param="draft")
    return tree


def propose(draft, tokens: Sequence[int], limit: int, slot: int, vocab_size: int) -> Tree:
    """What `draft` proposes after `tokens`, checked, within `limit` nodes: nothing without a draft or room."""
    if draft is None or limit <= 0:
        return NOTHING
    return as_tree(draft.propose(tokens, limit, slot), vocab_size, limit)


def tree_layout(parents: Sequence[int], base: int, first: int = 0) -> tuple[list[int], torch.Tensor]:
    """Positions and attention mask for nodes first.. of a tree whose node i sits in the cache at row
    base + i, after a prefix of `base` rows that every node sees. A node with parent -1 follows the prefix
    (position base), the others their parent (one position further). Each node sees the prefix, its
    ancestors and itself: mask is bool [nodes from first, base + len(parents)]."""
    depth = []
    for p in parents:
        depth.append(0 if p < 0 else depth[p] + 1)
    n = len(parents) - first
    mask = torch.zeros(n, base + len(parents), dtype=torch.bool)
    mask[:, :base] = True
    for r in range(n):
        j = first + r
        while j >= 0:
            mask[r, base + j] = True
            j = parents[j]
    return [base + d for d in depth[first:]], mask


class NgramDraft:
    """Proposes what followed the latest earlier occurrence of the last n tokens (n = max_n, then shorter),
    in the prompt and the output so far: a chain."""

    def __init__(self, max_n: int = 3):
        self.max_n = max_n

    def propose(self, tokens: Sequence[int], k: int, slot: int = 0) -> list[int]:
        for n in range(min(self.max_n, len(tokens) - 1), 0, -1):
            tail = list(tokens[-n:])
            for start in range(len(tokens) - n - 1, -1, -1):
                if list(tokens[start:start + n]) == tail:
                    return list(tokens[start + n:start + n + k])
        return []

    def close(self) -> None:
        pass


class ModelDraft:
    """A draft model's tree of continuations, grown best first. A candidate's score is the estimated chance
    that the target keeps its whole path: the product, along it, of how often the target's token turned out
    to be the draft's first, second, ... choice at a node (counted over the passes so far, from a prior that
    favours the first). A draft close to the target thus grows one long chain, an unsure one a bushy tree.
    Each round runs, in one pass of the draft, the best candidates (those within a factor `spread` of the
    best); each node offers its `branches` likeliest next tokens as new candidates (branches=1: a chain, the
    draft's greedy continuation). The draft's KV cache keeps the tokens both models agree on; a proposal's
    nodes leave it before the next proposal."""

    def __init__(self, engine, context: int, slots: int = 1, branches: int = 4, spread: float = 0.5):
        self.engine = engine
        # exactly its whole self in RAM: the target's plan set this share aside first (budget.draft_bytes)
        engine.budget = plan(engine.files, 1 << 62, slots, context).predicted_peak
        self.runner = engine.runner(slots, context)
        self.cache = engine.kv_cache(slots)
        for slot in range(slots):
            self.cache.reserve(slot, context)
        self.branches, self.spread = branches, math.log(spread)
        # how often the target's token was the draft's choice of each rank (the last: none of them), with a prior
        self.hits = [0.5 / 2 ** r for r in range(branches)] + [0.0]
        self.hits[-1] = 1.0 - sum(self.hits)
        self.last: dict[int, tuple[int, Tree, dict[int, list[int]]]] = {}  # per slot: base, tree, choices per node

    def rank_odds(self) -> list[float]:
        """The estimated chance that the target's next token is the draft's choice of rank r."""
        total = sum(self.hits)
        return [h / total for h in self.hits[:-1]]

    def propose(self, tokens: Sequence[int], k: int, slot: int = 0) -> Tree:
        self._learn(slot, tokens)
        if k <= 0:
            return Tree([], [])
        held = self.cache.tokens[slot]
        same = next((i for i, (a, b) in enumerate(zip(held, tokens)) if a != b), min(len(held), len(tokens)))
        self.cache.tokens[slot] = held[:min(same, len(tokens) - 1)]  # the last token always runs: its logits are needed
        base = len(tokens)
        logits = self.runner.forward([(slot, list(tokens[len(self.cache.tokens[slot]):]))], self.cache, phase="draft")
        odds = [math.log(max(p, 1e-9)) for p in self.rank_odds()]
        tree, order, heap, choices = Tree([], []), 0, [], {}
        new = [(-1, 0.0)]  # (node, its path's log-chance): the root first
        while True:
            for (node, score), row in zip(new, logits):
                choices[node] = row.topk(self.branches).indices.tolist()
                for r, t in enumerate(choices[node]):
                    heapq.heappush(heap, (-(score + odds[r]), order, node, t))
                    order += 1
            first, best = len(tree.tokens), -heap[0][0] if heap else 0.0
            new = []
            while heap and len(tree.tokens) < k and -heap[0][0] >= best + self.spread:
                neg, _, parent, t = heapq.heappop(heap)
                new.append((len(tree.tokens), -neg))
                tree.tokens.append(t)
                tree.parents.append(parent)
            if not new or len(tree.tokens) >= k:
                break
            positions, mask = tree_layout(tree.parents, base, first)
            logits = self.runner.forward([(slot, tree.tokens[first:], positions, mask)], self.cache,
                                         phase="draft", every=True)
        self.cache.tokens[slot] = self.cache.tokens[slot][:base]
        self.last[slot] = (base, tree, choices)
        return tree

    def _learn(self, slot: int, tokens: Sequence[int]) -> None:
        """Count, down the path the target took through the last proposal, the rank each of its tokens had
        among the draft's choices."""
        if slot not in self.last:
            return
        base, tree, choices = self.last.pop(slot)
        if list(tokens[:base]) != self.cache.tokens[slot][:base]:  # another sequence now holds the slot
            return
        kids = tree.children()
        node = -1
        for t in tokens[base:]:
            if node not in choices:
                break
            self.hits[choices[node].index(t) if t in choices[node] else -1] += 1
            node = next((c for c in kids[node + 1] if tree.tokens[c] == t), None)
            if node is None:
                break

    def close(self) -> None:
        self.cache.close()


class PassSize:
    """How many draft tokens a pass checks, from what passes cost here: a pass of T tokens takes about
    read + T·c, where c (seconds per token: 2 FLOPs per weight, at this machine's matmul rate, measured
    once) grows with T and read (the rest of a one-token pass: reading the weights) does not. Streamed
    blocks are read while earlier ones compute, so T tokens stay close to a plain pass's time while
    T·c <= `share` × read. Each pass observed refines read."""

    def __init__(self, args, dtype: torch.dtype, share: float = 0.8, cap: int = 64):
        self.share, self.cap = share, cap
        self.c = flops_per_token(args) / matmul_rate(args.dim, dtype)
        self.read: float | None = None

    def observe(self, seconds: float, tokens: int) -> None:
        read = max(seconds - tokens * self.c, 0.0)
        self.read = read if self.read is None else 0.5 * (self.read + read)

    def size(self) -> int:
        if self.read is None:
            return 8
        return max(1, min(self.cap, int(self.share * self.read / self.c)))


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


def add_draft_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", metavar="MODEL|ngram", help="speculative decoding: a smaller split model with "
                   "the same tokenizer, kept in RAM, or `ngram` (prompt lookup) proposes tokens that one pass checks")
    p.add_argument("--draft-tokens", type=int, metavar="T", help="draft tokens checked per pass (default: as many "
                   "as keep a pass close to a plain one's time, from the passes measured so far)")
    p.add_argument("--draft-branches", type=int, default=4, metavar="B", help="a draft model's tree offers its B "
                   "likeliest tokens after each node (1: a chain)")
