"""The sampler against the definitions of temperature and nucleus (top-p) sampling: the distribution it
samples from, and the frequencies it actually draws."""
import math

import pytest
import torch

from streamer.generate import Sampler, SamplingParams, step_of, verified
from streamer.speculative import NOTHING

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.9])


def draw(sampler, logits):
    """One token as generation draws it after a plain pass (nothing drafted), with its logprobs."""
    (row, token), = verified(logits[None], NOTHING, sampler)[0]
    return step_of(row, sampler.p.logprobs, token)


def by_definition(logits, temperature, top_p):
    """softmax(logits / T); then the smallest set of most likely tokens whose mass reaches top_p, renormalised."""
    e = [math.exp(v / temperature) for v in logits.tolist()]
    p = [x / sum(e) for x in e]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    z = sum(p[i] for i in kept)
    return [p[i] / z if i in kept else 0.0 for i in range(len(p))]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.9), (0.7, 0.5), (1.0, 0.05)])
def test_distribution_is_the_definition(temperature, top_p):
    got = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=0)).distribution(LOGITS)
    want = torch.tensor(by_definition(LOGITS, temperature, top_p))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 0.8)])
def test_draws_follow_the_distribution(temperature, top_p):
    """20000 draws: each token's frequency within 5 standard errors of its probability, none outside the nucleus."""
    n = 20000
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=123))
    counts = torch.bincount(torch.tensor([draw(sampler, LOGITS).token for _ in range(n)]), minlength=len(LOGITS)).double()
    p = torch.tensor(by_definition(LOGITS, temperature, top_p), dtype=torch.double)
    assert (counts[p == 0] == 0).all()
    se = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() <= 5 * se + 1e-12).all(), (counts / n, p)


def test_greedy_and_logprobs():
    step = draw(Sampler(SamplingParams(temperature=0, logprobs=3)), LOGITS)
    logp = torch.log_softmax(LOGITS, -1)
    assert step.token == 0 and step.logprob == pytest.approx(float(logp[0]))
    assert [t for t, _ in step.top] == [0, 1, 2]  # the logprobs are the model's, before temperature


def test_same_seed_same_draws():
    a = Sampler(SamplingParams(temperature=1.0, seed=7))
    b = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert [draw(a, LOGITS).token for _ in range(50)] == [draw(b, LOGITS).token for _ in range(50)]
