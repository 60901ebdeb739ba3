"""Speculative decoding: whatever the draft, greedy output is plain greedy decoding's, token for token, sampled
output keeps the target's distribution, and the KV cache ends as plain decoding leaves it."""
import json

import pytest
import torch

from conftest import GQA, assert_logprobs_close, make_split, stream
from streamer import Engine, StreamerError
from streamer.args import ModelArgs
from streamer.generate import Sampler, SamplingParams, accept
from streamer.speculative import NgramDraft, PassSize, Tree, tree_layout

GQA_ARGS = ModelArgs(**GQA)
PROMPT = [5, 9, 77, 120, 3, 3, 400, 12, 18, 260, 7, 91, 44, 5, 9, 77]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_split(tmp_path_factory.mktemp("target"), GQA)


@pytest.fixture(scope="module")
def plain(target):
    return stream(target, PROMPT, 24, logprobs=3)


def test_ngram_proposes_what_followed_the_latest_match():
    d = NgramDraft(max_n=3)
    assert d.propose([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert d.propose([7, 1, 2, 9, 8, 1, 2, 6, 5, 1, 2], 2) == [6, 5]  # the latest occurrence wins
    assert d.propose([4, 2, 9, 8, 7, 2], 4) == [9, 8, 7, 2]  # down to one token of context
    assert d.propose([1, 2, 3], 4) == []  # nothing seen before


class OffBranch:
    """A tree whose first child is always wrong and whose second is the target's own next token (known from a
    plain run): every kept path leaves the first branch, so its keys and values must move up in the cache."""

    def __init__(self, out):
        self.out = out

    def propose(self, tokens, k, slot=0):
        n = len(tokens) - len(PROMPT)
        tree = Tree([], [])
        for t in self.out[n:n + k // 2]:
            tree.tokens += [(t + 1) % GQA["vocab_size"], t]
            tree.parents += [len(tree.tokens) - 3 if len(tree.tokens) > 2 else -1] * 2
        return tree

    def close(self):
        pass


@pytest.mark.parametrize("draft", ["ngram", "useless", "perfect chain", "perfect tree", "off-branch tree"])
def test_greedy_output_is_plain_greedy_whatever_the_draft(target, plain, draft, tmp_path):
    # useless: random weights of another seed (a tree); perfect: the target itself, which proposes its own
    # continuation first (a chain with 1 branch, a tree with 4)
    want, _ = plain
    folder = {"ngram": "ngram", "useless": make_split(tmp_path / "d", GQA, seed=7), "perfect chain": target,
              "perfect tree": target, "off-branch tree": OffBranch([p.token for p in want])}[draft]
    pieces, stats = stream(target, PROMPT, 24, logprobs=3, draft=folder, draft_tokens=6,
                           draft_branches=1 if draft == "perfect chain" else 4)
    assert [p.token for p in pieces] == [p.token for p in want]
    assert_logprobs_close([p.logprob for p in pieces], [p.logprob for p in want])
    assert [[t for t, _ in p.top] for p in pieces] == [[t for t, _ in p.top] for p in want]
    assert stats.completion_tokens == 24 and stats.accepted <= stats.drafted
    # every pass yields its accepted drafts plus one token of the target's own
    assert stats.passes == 1 + (24 - 1 - stats.accepted)
    if draft == "perfect chain":
        assert stats.accepted == stats.drafted > 0 and stats.passes <= 1 + -(-23 // 7)
    if draft == "off-branch tree":  # 3 levels of 2 nodes: 4 tokens a pass, until the last ones (2 levels, then none)
        assert stats.accepted == stats.drafted // 2 and stats.passes == 1 + 5 + 1 + 1


def test_tree_layout():
    """Node 0 and 1 follow the root, 2 follows 0, 3 follows 2: positions by depth, each sees the cached
    prefix, its ancestors and itself."""
    positions, mask = tree_layout([-1, -1, 0, 2], base=5)
    assert positions == [5, 5, 6, 7]
    assert mask[:, :5].all()
    assert mask[:, 5:].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]
    positions, mask = tree_layout([-1, -1, 0, 2], base=5, first=2)  # the later nodes of a tree already in the cache
    assert positions == [6, 7] and mask.shape == (2, 9) and mask[:, 5:].int().tolist() == [[1, 0, 1, 0], [1, 0, 1, 1]]


def test_pass_size_follows_the_measured_read_time():
    size = PassSize(GQA_ARGS, torch.float32, share=0.5, cap=48)
    assert size.c > 0  # seconds per token, from the matmul rate measured here
    size.c = 1 / 128  # as if measured (binary fractions: exact sums)
    assert size.size() == 8  # nothing measured yet
    size.observe(1.0 + 16 / 128, 16)  # a 16-token prefill over a 1 s read
    assert size.size() == 48  # 0.5 s of compute would fit 64 tokens: the cap
    size.observe(1 / 16 + 1 / 128, 1)  # weights in RAM: a 1/16 s read
    assert size.size() == int(0.5 * (1 + 1 / 16) / 2 * 128)  # the estimate follows, halfway: 34 tokens


def test_the_kv_cache_keeps_no_rejected_token(target, plain, tmp_path):
    """A kept cache holds the prompt and every output token but the last, as after plain decoding, and a
    later prompt that extends the output resumes from it to the same tokens as a fresh run (so the moved keys
    and values are the right ones)."""
    out = [p.token for p in plain[0]]
    kv = tmp_path / "kv"
    # every kept path leaves the first branch: its keys and values move up in the files on disk
    pieces, _ = stream(target, PROMPT, 24, draft=OffBranch(out), draft_tokens=6, kv_dir=kv)
    assert [p.token for p in pieces] == out
    held = json.loads((kv / "kv.json").read_text())["tokens"]
    assert held == [PROMPT + out[:-1]]
    longer = PROMPT + out + [11, 12]
    resumed, stats = stream(target, longer, 6, kv_dir=kv, draft="ngram")
    fresh, _ = stream(target, longer, 6)
    assert stats.reused_tokens == len(PROMPT) + len(out) - 1
    assert [p.token for p in resumed] == [p.token for p in fresh]


def test_refusals(target, tmp_path):
    other = make_split(tmp_path / "v", {**GQA, "vocab_size": 640})
    with pytest.raises(StreamerError, match="vocabulary has 640 tokens, the target's 512") as e:
        Engine(target, dtype="float32", draft=other)
    assert e.value.param == "draft"
    with pytest.raises(StreamerError, match="positive integer") as e:
        Engine(target, draft="ngram", draft_tokens=0)
    assert e.value.param == "draft_tokens"


def test_a_draft_with_another_tokenizer_is_refused(llama3_tiny, tmp_path):
    """Same vocabulary size, another tokenizer.model (two ranks swapped): the manifests' sha256 differ."""
    from streamer.split import split
    from streamer.synthetic import PRESETS, write_checkpoint
    meta = write_checkpoint(tmp_path / "meta", PRESETS["tiny"], seed=4)
    lines = (meta / "tokenizer.model").read_bytes().splitlines(keepends=True)
    lines[100], lines[101] = lines[101], lines[100]
    (meta / "tokenizer.model").write_bytes(b"".join(lines))
    split(meta, tmp_path / "layers")
    with pytest.raises(StreamerError, match=r"its tokenizer \(tokenizer.model, sha256 .*\) is not the target's") as e:
        Engine(llama3_tiny, draft=tmp_path / "layers")
    assert e.value.param == "draft"
    Engine(llama3_tiny, draft=llama3_tiny).close()  # the same tokenizer is accepted


def test_sampling_keeps_the_targets_distribution(tmp_path):
    """The acceptance rule on a real (tiny, 8-token vocabulary) model's distributions: the empirical joint
    distribution of the two tokens after t1, over 20000 draws, against the target's own p(t2 | t1) p(t3 | t1, t2),
    for a chain [a, b] and for a tree (a with child b, and a sibling a2). With N = 20000 over 64 outcomes the
    total variation distance of a correct rule stays near 0.02. Checked by hand that wrong rules fail: taking
    the next token from p instead of p with the refused proposals removed moves it by p(a)(1 - p(a)), about 0.1
    or more here (0.25 on the chain); trying a2 with p(a2) rather than its share of what a's refusal left gives
    0.10 on the tree."""
    folder = make_split(tmp_path / "v8", {**GQA, "vocab_size": 8})
    sampler = Sampler(SamplingParams(temperature=1.0))
    with Engine(folder, dtype="float32") as engine:
        def p(seq):
            runner, cache = engine.runner(1, 16), engine.kv_cache(1)
            cache.reserve(0, len(seq))
            return sampler.distribution(runner.forward([(0, seq)], cache)[0])
        prompt, t1 = [3, 1, 4], 0
        p2 = p(prompt + [t1])
        a, a2 = p2.topk(2).indices.tolist()
        pa, pa2 = p(prompt + [t1, a]), p(prompt + [t1, a2])
        b = int(pa.argmax())
        pab = p(prompt + [t1, a, b])
        cond = [p(prompt + [t1, t2]) for t2 in range(8)]
    exact = p2[:, None] * torch.stack(cond)
    trees = {"chain": (Tree.chain([a, b]), [p2, pa, pab]), "tree": (Tree([a, a2, b], [-1, -1, 0]), [p2, pa, pa2, pab])}
    for name, (tree, dists) in trees.items():
        gen = torch.Generator().manual_seed(0)
        counts = torch.zeros(8, 8)
        n = 20000
        for _ in range(n):
            path, own = accept(lambda r: dists[r], tree, gen)
            toks = [tree.tokens[c] for c in path] + [own]
            if len(toks) == 1:  # the next token after t2 as the target alone samples it
                toks.append(int(torch.multinomial(cond[own], 1, generator=gen)))
            counts[toks[0], toks[1]] += 1
        tv = 0.5 * (counts / n - exact).abs().sum()
        assert tv < 0.045, f"{name}: total variation {tv:.3f}"


def test_sampled_generation_with_a_draft(target, tmp_path):
    """Seeded sampling with a draft repeats itself, and its kept cache is plain decoding's."""
    kv = tmp_path / "kv"
    runs = [stream(target, PROMPT, 16, temperature=0.9, seed=5, draft="ngram", draft_tokens=4, kv_dir=kv if i else None)
            for i in range(2)]
    out = [p.token for p in runs[0][0]]
    assert [p.token for p in runs[1][0]] == out and all(0 <= t < GQA["vocab_size"] for t in out)
    assert json.loads((kv / "kv.json").read_text())["tokens"] == [PROMPT + out[:-1]]


def test_batch_with_a_draft_gives_the_batch_without(target, tmp_path):
    """Greedy `batch` with a draft, chain or tree, gives each prompt exactly its tokens without one; with
    more prompts than slots, finished sequences hand their slots (and cleaned caches) to waiting ones."""
    requests = [{"id": i, "prompt_ids": PROMPT[i:] + PROMPT[:i], "max_new_tokens": 10 + i} for i in range(5)]

    def run(**kw):
        with Engine(target, dtype="float32", max_seq_len=64, **kw) as engine:
            totals = {}
            out = {r["id"]: r for r in engine.batch(requests, batch_size=3, totals=totals)}
        return out, totals
    plain, _ = run()
    for draft, branches in (("ngram", 4), (make_split(tmp_path / "d", GQA, seed=7), 4), (target, 1)):
        got, totals = run(draft=draft, draft_tokens=4, draft_branches=branches)
        assert {i: r["tokens"] for i, r in got.items()} == {i: r["tokens"] for i, r in plain.items()}
        assert_logprobs_close([x for i in sorted(got) for x in got[i]["logprobs"]],
                              [x for i in sorted(plain) for x in plain[i]["logprobs"]])
        assert totals["drafted"] > 0 and totals["accepted"] <= totals["drafted"]
    assert totals["accepted"] == totals["drafted"]  # the target as its own chain draft: all kept


@pytest.mark.parametrize("scheme,branches", [("int8", 4), ("int4", 1)])
def test_a_real_draft_on_a_trained_model(tmp_path, scheme, branches):
    """stories260K (trained) with its own quantized split as the draft, as a tree and as a chain: plain greedy's
    tokens and logprobs, and most proposals kept."""
    from conftest import STORIES
    from streamer.split import split
    split(STORIES, tmp_path / "f32", dtype="float32")
    split(STORIES, tmp_path / scheme, quantize=scheme)
    want, _ = stream(tmp_path / "f32", [1, 403, 407], 40)
    got, stats = stream(tmp_path / "f32", [1, 403, 407], 40, draft=tmp_path / scheme, draft_tokens=8,
                        draft_branches=branches)
    assert [p.token for p in got] == [p.token for p in want]
    assert_logprobs_close([p.logprob for p in got], [p.logprob for p in want])
    assert stats.accepted > stats.drafted / 2 and stats.completion_tokens / stats.passes > 3
