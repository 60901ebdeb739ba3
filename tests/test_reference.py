"""Streamed logprobs against HF transformers and Meta's own reference code, float32, three shapes."""
import pytest
import torch

from conftest import assert_logprobs_close, load_meta_state, params_of, stream
from references import hf_model, meta_model
from streamer import MemoryKVCache, ModelFiles, Runner

PROMPT = [1, 17, 42, 99, 5, 250, 3, 8, 120, 64, 7]


def streamed_last_logprobs(folder, prompt):
    files = ModelFiles(folder)
    cache = MemoryKVCache(files.args, 1, len(prompt), torch.float32)
    with Runner(files, torch.float32) as runner:
        return torch.log_softmax(runner.forward([(0, prompt)], cache)[0], -1)


def test_prompt_logprobs_match_hf(shape_model):
    name, folder, meta = shape_model
    model = hf_model(params_of(meta), load_meta_state(meta), tied=name == "hd64_tied")
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0, -1].float(), -1)
    assert_logprobs_close(streamed_last_logprobs(folder, PROMPT), ref)


def test_greedy_generation_matches_hf_generate_with_cache(shape_model):
    """64 greedy tokens through the disk KV cache against HF generate(use_cache=True)."""
    name, folder, meta = shape_model
    model = hf_model(params_of(meta), load_meta_state(meta), tied=name == "hd64_tied")
    steps, _ = stream(folder, PROMPT, 64)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=64, do_sample=False, use_cache=True,
                             output_scores=True, return_dict_in_generate=True, min_new_tokens=64)
    ref_ids = out.sequences[0, len(PROMPT):].tolist()
    assert [s.token for s in steps] == ref_ids
    ref_lp = torch.stack([torch.log_softmax(s[0].float(), -1)[t] for s, t in zip(out.scores, ref_ids)])
    assert_logprobs_close(torch.tensor([s.logprob for s in steps]), ref_lp)


def test_logprobs_match_meta_reference(shape_model):
    """Meta's llama_models Transformer: prompt logprobs and 16 incremental greedy steps."""
    name, folder, meta = shape_model
    ref = meta_model(params_of(meta), load_meta_state(meta))
    tokens, ref_steps, start = torch.tensor([PROMPT]), [], 0
    with torch.inference_mode():
        for _ in range(16):
            logp = torch.log_softmax(ref(tokens[:, start:], start)[0, -1], -1)
            tok = int(logp.argmax())
            ref_steps.append((tok, float(logp[tok])))
            start = tokens.shape[1]
            tokens = torch.cat([tokens, torch.tensor([[tok]])], 1)
        first = torch.log_softmax(ref(torch.tensor([PROMPT]), 0)[0, -1], -1)
    assert_logprobs_close(streamed_last_logprobs(folder, PROMPT), first)
    steps, _ = stream(folder, PROMPT, 16)
    assert [s.token for s in steps] == [t for t, _ in ref_steps]
    assert_logprobs_close([s.logprob for s in steps], [lp for _, lp in ref_steps])
