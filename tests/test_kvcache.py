"""The disk KV cache: equal to full recomputation, resumable from a kept folder, refusing foreign caches."""
import os

import pytest
import torch

from conftest import assert_logprobs_close, GQA, SCALED, make_split, stream
from streamer import DiskKVCache, Engine, MemoryKVCache, ModelFiles, Runner, StreamerError
from streamer.kvcache import SplitKVCache
from streamer.budget import BASELINE, MARGIN, plan

PROMPT = [3, 141, 59, 26, 53, 58, 97, 93]


def recompute(folder, prompt, n):
    """Greedy decoding with no cache reuse: every step runs the whole sequence through every block."""
    files = ModelFiles(folder)
    ids, out = list(prompt), []
    with Runner(files, torch.float32) as runner:
        for _ in range(n):
            cache = MemoryKVCache(files.args, 1, len(ids), torch.float32)
            logp = torch.log_softmax(runner.forward([(0, ids)], cache)[0], -1)
            tok = int(logp.argmax())
            out.append((tok, float(logp[tok])))
            ids.append(tok)
    return out


@pytest.mark.parametrize("params", [GQA, SCALED], ids=["gqa", "scaled_rope"])
def test_cache_equals_full_recompute(tmp_path, params):
    folder = make_split(tmp_path, params)
    steps, stats = stream(folder, PROMPT, 64, kv_cache="disk")
    ref = recompute(folder, PROMPT, 64)
    assert [s.token for s in steps] == [t for t, _ in ref]
    assert_logprobs_close(torch.tensor([s.logprob for s in steps]), torch.tensor([lp for _, lp in ref]))
    assert stats.passes == 64 and stats.tokens_run == len(PROMPT) + 63  # one prefill, then one new token per step


def test_kv_placement_does_not_change_the_output(tmp_path):
    """The plan keeps the whole KV cache in RAM when it fits: the same tokens and logprobs as on disk, bit for bit."""
    folder = make_split(tmp_path, GQA)
    with Engine(folder, dtype="float32") as engine:
        ram = engine.generate(prompt_ids=PROMPT, max_new_tokens=24)
        assert engine.plan.kv_ram > 0 and isinstance(engine.kv_cache(1), MemoryKVCache)
    with Engine(folder, dtype="float32", kv_cache="disk") as engine:
        disk = engine.generate(prompt_ids=PROMPT, max_new_tokens=24)
        cache = engine.kv_cache(1)
        assert isinstance(cache, DiskKVCache)
        cache.close()
    assert ram.tokens == disk.tokens and ram.logprobs == disk.logprobs
    files = ModelFiles(folder)
    tight = plan(files, BASELINE + (40 << 20), context=4096)  # the weights take what is left: KV on disk
    assert tight.kv_ram == 0 and plan(files, 8 << 30, context=4096).kv_ram == GQA["n_layers"] * tight.kv_block


def test_kv_cache_split_between_ram_and_disk(tmp_path):
    """A budget with room for some sequences' KV cache keeps theirs in RAM and the rest on disk: the batch's
    tokens and logprobs are those of single runs."""
    folder = make_split(tmp_path, GQA)
    files = ModelFiles(folder)
    context = len(PROMPT) + 8  # what Engine.batch plans for these lines
    whole = plan(files, 8 << 30, batch=4, context=context)
    per_slot = whole.kv_ram // 4
    budgets = range(int(whole.predicted_peak / (1 - MARGIN)), 0, -(per_slot // 4))  # batches plan their KV first
    two = next(p for b in budgets if (p := plan(files, b, batch=4, context=context, kv_first=True)).kv_slots <= 2)
    assert (two.kv_slots, two.kv_ram, two.resident) == (2, 2 * per_slot, [])
    lines = [{"id": i, "prompt_ids": PROMPT[i:] + PROMPT[:i], "max_new_tokens": 8} for i in range(6)]
    with Engine(folder, two.budget, dtype="float32", max_seq_len=64) as engine:
        results = {r["id"]: r for r in engine.batch(lines, batch_size=4)}
        cache = engine.kv_cache(4)
        assert engine.plan.kv_slots == 2 and isinstance(cache, SplitKVCache)
        cache.close()
    for line in lines:
        single, _ = stream(folder, line["prompt_ids"], 8)
        assert results[line["id"]]["tokens"] == [p.token for p in single]
        assert_logprobs_close(results[line["id"]]["logprobs"], [p.logprob for p in single])


def test_resume_from_kept_cache(tmp_path):
    folder = make_split(tmp_path, GQA)
    whole, _ = stream(folder, PROMPT, 40)
    kv = tmp_path / "kv"
    first, _ = stream(folder, PROMPT, 20, kv_dir=kv)
    assert (kv / "kv.json").is_file() and len(list(kv.glob("block_*.kv"))) == GQA["n_layers"]
    prompt2 = PROMPT + [s.token for s in first]
    second, stats = stream(folder, prompt2, 20, kv_dir=kv)
    assert [s.token for s in first + second] == [s.token for s in whole]
    # the prefix came from the cache: only the last prompt token ran, then one token per step
    assert stats.reused_tokens == len(prompt2) - 1
    assert stats.tokens_run == 1 + 19 and stats.passes == 20
    assert_logprobs_close(torch.tensor([s.logprob for s in first + second]),
                               torch.tensor([s.logprob for s in whole]))


def test_resume_skips_the_cached_prefix(tmp_path):
    folder = make_split(tmp_path, GQA)
    kv = tmp_path / "kv"
    stream(folder, PROMPT, 1, kv_dir=kv)  # the cache now holds the prompt
    files = ModelFiles(folder)
    cache = DiskKVCache(files.args, 1, 256, torch.float32, files.manifest_sha256, kv)
    assert cache.tokens == [PROMPT]


def test_foreign_caches_are_refused(tmp_path):
    folder = make_split(tmp_path / "a", GQA)
    other = make_split(tmp_path / "b", GQA, seed=1)
    kv = tmp_path / "kv"
    stream(folder, PROMPT, 4, kv_dir=kv)
    with pytest.raises(StreamerError, match="another model manifest sha256"):
        stream(other, PROMPT, 4, kv_dir=kv)
    with pytest.raises(StreamerError, match="holds another prompt"):
        stream(folder, [7] + PROMPT, 4, kv_dir=kv)
    with pytest.raises(StreamerError, match="another dtype"):
        stream(folder, PROMPT, 4, kv_dir=kv, dtype=torch.bfloat16)


def test_temporary_cache_is_removed_and_sized_to_the_run(tmp_path):
    folder = make_split(tmp_path, GQA)
    files = ModelFiles(folder)
    cache = DiskKVCache(files.args, 1, 4096, torch.float32, files.manifest_sha256)
    cache.reserve(0, 100)
    per_layer = 2 * 100 * GQA["n_kv_heads"] * (GQA["dim"] // GQA["n_heads"]) * 4
    allocated = os.stat(cache.dir / "block_000.kv").st_blocks * 512
    assert per_layer <= allocated < per_layer + 64 * 1024  # sparse: only reserved positions take disk
    with pytest.raises(StreamerError, match="max_seq_len 4096 is too short for a sequence of 4097 tokens"):
        cache.reserve(0, 4097)
    cache.close()
    assert not cache.dir.exists()
    dropped = DiskKVCache(files.args, 1, 64, torch.float32, files.manifest_sha256)  # never closed: a caller forgot
    dropped.reserve(0, 8)
    where = dropped.dir
    del dropped
    assert not where.exists()
    kept = DiskKVCache(files.args, 1, 64, torch.float32, files.manifest_sha256, tmp_path / "kv")
    kept.reserve(0, 8)
    del kept
    assert (tmp_path / "kv" / "block_000.kv").exists()  # a folder the caller named is never removed


def test_cache_in_ram_is_used_in_place_and_a_copy_reuses_its_buffer():
    """A pass over slots in RAM gets the cache itself, from its lowest slot to its highest, whatever the order
    or gaps (rows() says where each slot is; no copy in, none out). Slots on disk get a copy, with zeros past
    each sequence's end, saved back on exit, in one buffer that the next block's copy reuses."""
    from streamer.args import ModelArgs
    args = ModelArgs.from_params(GQA)
    cache = MemoryKVCache(args, 4, 8, torch.float32)
    with cache.layer(0, [(1, 0, 3), (2, 1, 2)]) as kv:
        assert kv.shape[:3] == (2, 2, 3) and kv.data_ptr() == cache.layers[0][:, 1].data_ptr()
        kv[:, 0, :3] = 1
    assert cache.layers[0][:, 1, :3].eq(1).all()
    cache.layers[0][:, 0, :2] = 7
    assert cache.rows([3, 0]) == [3, 0] and cache.rows([1, 3]) == [0, 2]
    with cache.layer(0, [(3, 0, 1), (0, 2, 4)]) as kv:
        assert kv.shape[:3] == (2, 4, 4) and kv.data_ptr() == cache.layers[0].data_ptr()
        kv[:, 0, 2:4] = 5
    assert cache.layers[0][:, 0, :2].eq(7).all() and cache.layers[0][:, 0, 2:4].eq(5).all()

    disk = DiskKVCache(args, 4, 8, torch.float32, "0" * 64)
    assert disk.rows([3, 0]) == [0, 1]
    for slot in (0, 3):
        disk.reserve(slot, 8)
    with disk.layer(0, [(0, 0, 2)]) as kv:
        kv[:, 0, :2] = 7
    with disk.layer(1, [(3, 0, 1), (0, 2, 4)]) as kv:
        ptr = kv.data_ptr()
        assert kv[:, 0, 1:].eq(0).all()
        kv.fill_(9)  # what the next block's copy must not see
    with disk.layer(0, [(3, 0, 1), (0, 2, 4)]) as kv:
        assert kv.data_ptr() == ptr and kv.shape[:3] == (2, 2, 4)
        assert kv[:, 1, :2].eq(7).all() and kv[:, 0, 1:].eq(0).all()
        kv[:, 1, 2:4] = 5
    with disk.layer(0, [(0, 4, 5)]) as kv:
        assert kv[:, 0, :2].eq(7).all() and kv[:, 0, 2:4].eq(5).all()
    disk.close()
