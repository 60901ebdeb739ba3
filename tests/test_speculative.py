"""Speculative decoding: whatever the draft, greedy output is plain greedy decoding's, token for token, sampled
output keeps the target's distribution, and the KV cache ends as plain decoding leaves it."""
import json

import pytest
import torch

from conftest import GQA, assert_logprobs_close, make_split, stream
from streamer import Engine, StreamerError
from streamer.generate import Sampler, SamplingParams, accept
from streamer.speculative import NgramDraft

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


@pytest.mark.parametrize("draft", ["ngram", "useless", "perfect"])
def test_greedy_output_is_plain_greedy_whatever_the_draft(target, plain, draft, tmp_path):
    # useless: random weights of another seed; perfect: the target itself, which proposes its own continuation
    folder = {"ngram": "ngram", "useless": make_split(tmp_path / "d", GQA, seed=7), "perfect": target}[draft]
    pieces, stats = stream(target, PROMPT, 24, logprobs=3, draft=folder, draft_tokens=4)
    want, _ = plain
    assert [p.token for p in pieces] == [p.token for p in want]
    assert_logprobs_close([p.logprob for p in pieces], [p.logprob for p in want])
    assert [[t for t, _ in p.top] for p in pieces] == [[t for t, _ in p.top] for p in want]
    assert stats.completion_tokens == 24 and stats.accepted <= stats.drafted
    # every pass yields its accepted drafts plus one token of the target's own
    assert stats.passes == 1 + (24 - 1 - stats.accepted)
    if draft == "perfect":
        assert stats.accepted == stats.drafted > 0 and stats.passes <= 1 + -(-23 // 5)


def test_the_kv_cache_keeps_no_rejected_token(target, plain, tmp_path):
    """A kept cache holds the prompt and every output token but the last, as after plain decoding, and a
    later prompt that extends the output resumes from it to the same tokens as a fresh run."""
    out = [p.token for p in plain[0]]
    kv = tmp_path / "kv"
    stream(target, PROMPT, 24, draft=make_split(tmp_path / "d", GQA, seed=7), draft_tokens=4, kv_dir=kv)
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
    distribution of the two tokens after t1, drafted as the chain [a, b], over 20000 draws, against the
    target's own p(t2 | t1) p(t3 | t1, t2). With N = 20000 over 64 outcomes the total variation distance of
    a correct rule stays near 0.02; taking the next token from p instead of p with the refused proposal
    removed moves it by p(a)(1 - p(a)), about 0.1 or more here (checked: that rule fails this test)."""
    folder = make_split(tmp_path / "v8", {**GQA, "vocab_size": 8})
    sampler = Sampler(SamplingParams(temperature=1.0))
    with Engine(folder, dtype="float32") as engine:
        def p(seq):
            runner, cache = engine.runner(1, 16), engine.kv_cache(1)
            cache.reserve(0, len(seq))
            return sampler.distribution(runner.forward([(0, seq)], cache)[0])
        prompt, t1 = [3, 1, 4], 0
        p2 = p(prompt + [t1])
        a = int(p2.argmax())
        pa = p(prompt + [t1, a])
        b = int(pa.argmax())
        pab = p(prompt + [t1, a, b])
        cond = [p(prompt + [t1, t2]) for t2 in range(8)]
    exact = p2[:, None] * torch.stack(cond)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(8, 8)
    n = 20000
    for _ in range(n):
        m, tok = accept([p2, pa, pab], [a, b], gen)
        t2, t3 = (tok, int(torch.multinomial(cond[tok], 1, generator=gen))) if m == 0 else (a, tok) if m == 1 else (a, b)
        counts[t2, t3] += 1
    tv = 0.5 * (counts / n - exact).abs().sum()
    assert tv < 0.045, f"total variation {tv:.3f}"


def test_sampled_generation_with_a_draft(target, tmp_path):
    """Seeded sampling with a draft repeats itself, and its kept cache is plain decoding's."""
    kv = tmp_path / "kv"
    runs = [stream(target, PROMPT, 16, temperature=0.9, seed=5, draft="ngram", draft_tokens=4, kv_dir=kv if i else None)
            for i in range(2)]
    out = [p.token for p in runs[0][0]]
    assert [p.token for p in runs[1][0]] == out and all(0 <= t < GQA["vocab_size"] for t in out)
    assert json.loads((kv / "kv.json").read_text())["tokens"] == [PROMPT + out[:-1]]
