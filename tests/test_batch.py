"""Batch runs: equal to single runs, continuous batching, stop strings and chat lines, resumable after
SIGKILL, bad lines recorded and retried."""
import argparse
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import STORIES, GQA, assert_logprobs_close, make_split, stream
from streamer import Engine, ModelArgs
from streamer.layout import ModelFiles
from streamer.split import split
from streamer.tokenizer import ChatFormat


def prompts(n, vocab, seed=0):
    r = random.Random(seed)
    return [{"id": f"p{i}", "prompt_ids": [r.randrange(vocab) for _ in range(r.randrange(1, 40))],
             "max_new_tokens": r.randrange(1, 24)} for i in range(n)]


def run(folder, lines, batch_size, **kw):
    totals = {}
    with Engine(folder, dtype="float32", max_seq_len=256) as engine:
        results = {r["id"]: r for r in engine.batch(lines, batch_size=batch_size, totals=totals, **kw)}
    return results, totals


def assert_equal_to_single_runs(folder, lines, results):
    for line in lines:
        single, _ = stream(folder, line["prompt_ids"], line["max_new_tokens"])
        got = results[line["id"]]
        assert got["tokens"] == [s.token for s in single], line["id"]
        assert_logprobs_close(torch.tensor(got["logprobs"]), torch.tensor([s.logprob for s in single]))
        assert got["usage"] == {"prompt_tokens": len(line["prompt_ids"]), "completion_tokens": len(single)}


def test_batch_equals_single_runs(tmp_path):
    folder = make_split(tmp_path, GQA)
    lines = prompts(14, GQA["vocab_size"])
    results, totals = run(folder, lines, batch_size=4)
    assert len(results) == 14
    assert_equal_to_single_runs(folder, lines, results)
    # continuous batching: far fewer passes over the weights than tokens generated one prompt at a time
    assert totals["steps"] < sum(l["max_new_tokens"] for l in lines) / 2


def test_batch_on_stories260k(tmp_path):
    folder = tmp_path / "stories"
    split(STORIES, folder)
    lines = [{"id": i, "prompt_ids": [1] + ids, "max_new_tokens": n}
             for i, (ids, n) in enumerate([([], 40), ([403], 25), ([403, 407], 30), ([294], 12), ([], 8)])]
    results, _ = run(folder, lines, batch_size=3)
    assert_equal_to_single_runs(folder, lines, results)


def test_stop_strings_and_chat_lines(llama3_tiny):
    with Engine(llama3_tiny, dtype="float32") as engine:
        free = engine.generate("the answer to the ultimate question", max_new_tokens=16)
        text = free.text
        at = len(text) // 2
        stop = next(text[i:i + 3] for i in range(at, len(text) - 3) if text.find(text[i:i + 3]) == i)
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        want_chat = engine.generate(messages=chat, max_new_tokens=3)
        out = {r["id"]: r for r in engine.batch([
            {"id": "s", "prompt": "the answer to the ultimate question", "max_new_tokens": 16, "stop": stop},
            {"id": "m", "messages": chat, "max_new_tokens": 3},
            {"id": "bad", "messages": "Hi"}])}
        chat_ids = ChatFormat(engine.tokenizer).encode_dialog(chat)
    s = out["s"]
    assert s["finish_reason"] == "stop" and s["text"] == text[:text.find(stop)] and stop not in s["text"]
    assert s["tokens"] == free.tokens[:len(s["tokens"])] and len(s["tokens"]) < 16
    assert out["m"]["tokens"] == want_chat.tokens and out["m"]["usage"]["prompt_tokens"] == len(chat_ids)
    assert "messages must be a list" in out["bad"]["error"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "streamer", *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


def records(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_bad_lines_are_recorded_retried_and_fail_the_run(tmp_path):
    folder = make_split(tmp_path, GQA)
    lines = ['{"id": "ok1", "prompt_ids": [1, 2, 3], "max_new_tokens": 3}', '{not json', '{"id": "nop"}',
             '{"id": "long", "prompt_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}', '{"id": "text", "prompt": "hello"}',
             '{"id": "badid", "prompt_ids": [1, 9999]}', '{"id": "ok2", "prompt_ids": [4], "max_new_tokens": 2}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    cmd = ["batch", folder, tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl", "--max-new-tokens", "4",
           "--max-seq-len", "12", "--dtype", "float32"]
    r = cli(*cmd)
    assert r.returncode == 1, r.stderr  # some lines failed
    assert "2 done, 5 failed" in r.stderr and "tokens/s" in r.stderr and "peak" in r.stderr
    assert "7/7" in r.stderr  # the progress bar counts every line
    out = {json.dumps(x["id"]): x for x in records(tmp_path / "out.jsonl")}
    assert len(out) == 7
    assert out['"ok1"']["finish_reason"] == "length" and len(out['"ok1"']["tokens"]) == 3
    assert "line 2: invalid JSON" in out["2"]["error"]
    assert "line 3: no prompt" in out['"nop"']["error"]
    assert "line 4: --max-seq-len 12 is too short for a prompt of 10 tokens + 4 new tokens" in out['"long"']["error"]
    assert "line 5" in out['"text"']["error"] and "no tokenizer" in out['"text"']["error"]
    assert "9999" in out['"badid"']["error"]
    # the user fixes two lines: a rerun retries every id whose only record is an error, keeps the done ones
    lines[3] = '{"id": "long", "prompt_ids": [1, 2, 3, 4, 5], "max_new_tokens": 2}'
    lines[1] = '{"id": 2, "prompt_ids": [5, 6]}'
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    r = cli(*cmd, "--quiet")
    assert r.returncode == 1 and "2 done, 3 failed, 2 already in" in r.stderr, r.stderr
    out = records(tmp_path / "out.jsonl")
    by_id = {json.dumps(x["id"]): x for x in out}
    assert len(out) == len(by_id) == 7  # the new records replaced the errors: each id once
    assert by_id['"long"']["finish_reason"] == "length" and by_id["2"]["usage"]["prompt_tokens"] == 2
    assert sum("error" in x for x in out) == 3


def line_count(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_mid_run_loses_and_duplicates_nothing(tmp_path):
    folder = make_split(tmp_path, {**GQA, "dim": 256, "n_heads": 4, "n_layers": 6, "vocab_size": 2048})
    lines = prompts(24, 2048, seed=5)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "streamer", "batch", folder, tmp_path / "in.jsonl", "--out", out, "--batch-size", "4",
           "--dtype", "float32", "--quiet"]
    counts = []
    for _ in range(3):  # each run is killed once it has written a new result, while results remain
        before = line_count(out)
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while line_count(out) == before and p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL, "the run ended before the kill: the test proves nothing"
        counts.append(line_count(out))
        assert before < counts[-1] < 24  # it made progress, and the kill landed mid-run
    with open(out, "ab") as f:
        f.write(b'{"id": "p3", "text": nul')  # and a torn line, as a kill mid-write leaves
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torn last line" in r.stderr
    got = records(out)
    assert sorted(x["id"] for x in got) == sorted(l["id"] for l in lines)
    assert_equal_to_single_runs(folder, lines, {x["id"]: x for x in got})
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "0 done" in again.stderr and line_count(out) == 24


def test_sampling_is_reproducible_per_prompt_whatever_the_batch(tmp_path):
    folder = make_split(tmp_path, GQA)
    lines = [{**l, "temperature": 0.8, "top_p": 0.9} for l in prompts(6, GQA["vocab_size"], seed=2)]
    lines[0]["seed"] = 1234
    a, _ = run(folder, lines, batch_size=1)
    b, _ = run(folder, list(reversed(lines)), batch_size=4)
    assert {k: v["tokens"] for k, v in a.items()} == {k: v["tokens"] for k, v in b.items()}


def test_shared_prefixes_are_computed_once(tmp_path):
    """Prompts that share a long prefix (a system prompt), and n > 1 completions of one prompt, copy its keys
    and values from the slot that computed them: the same tokens and logprobs as single runs, in RAM and on
    disk, with the shared tokens counted."""
    folder = make_split(tmp_path, GQA)
    r = random.Random(1)
    system = [r.randrange(GQA["vocab_size"]) for _ in range(40)]
    lines = [{"id": f"s{i}", "prompt_ids": system + [r.randrange(GQA["vocab_size"]) for _ in range(r.randrange(1, 9))],
              "max_new_tokens": 6} for i in range(5)]
    lines.append({"id": "short", "prompt_ids": system[:20], "max_new_tokens": 4})  # a prefix of the others
    for kv in ("auto", "disk"):
        totals = {}
        with Engine(folder, dtype="float32", max_seq_len=256, kv_cache=kv) as engine:
            results = {x["id"]: x for x in engine.batch(lines + [{**lines[0], "id": "twice", "n": 2}], batch_size=3,
                                                        totals=totals)}
        assert_equal_to_single_runs(folder, lines, results)
        assert [c["tokens"] for c in results["twice"]["choices"]] == [results["s0"]["tokens"]] * 2
        # s0 computes the 32 tokens of whole blocks; the others copy them (short: its 16, less its last token's block)
        assert totals["shared_prompt_tokens"] >= 32 * 4 + 16, totals


def test_prompts_are_prefilled_in_chunks_within_the_pass_target(tmp_path):
    """Chunked prefill: with 5 tokens a pass, each pass carries every decoding sequence's token and then chunks of
    the prompts still prefilling; a prompt longer than a pass takes several, and nothing spills into a second
    pass over the weights. The results equal single runs."""
    folder = make_split(tmp_path, GQA)
    lines = prompts(10, GQA["vocab_size"], seed=3)
    sizes = []
    with Engine(folder, dtype="float32", max_seq_len=256, runner_options={"max_pass_tokens": 5}) as engine:
        runner = engine.runner(4, 64)
        forward = runner.forward

        def spy(chunks, cache, **kw):
            sizes.append([len(c[1]) for c in chunks])
            return forward(chunks, cache, **kw)
        runner.forward = spy
        results = {r["id"]: r for r in engine.batch(lines, batch_size=4)}
    assert_equal_to_single_runs(folder, lines, results)
    assert max(sum(s) for s in sizes) <= 5 and runner.io.passes == len(sizes)
    assert any(1 in s and max(s) > 1 for s in sizes)  # decode tokens and a prompt's chunk in one pass
    assert sum(map(sum, sizes)) == sum(len(l["prompt_ids"]) + l["max_new_tokens"] - 1 for l in lines)


def test_pass_target_from_costs():
    """PassTarget: prompt chunks fill a pass up to the target, or add a target's worth to a pass already full
    of decode tokens, within the plan's limit; a read-bound pass raises the target to what its read covers."""
    from streamer.costs import PassTarget
    args = ModelArgs.from_params(GQA)
    small = PassTarget(args, torch.float32, limit=4)
    assert small.tokens() == 4 and small.prefill_room(1) == 3 and small.prefill_room(4) == 0
    t = PassTarget(args, torch.float32, limit=4096)
    assert t.tokens() == t.efficient and t.prefill_room(0) == t.efficient
    assert t.prefill_room(t.efficient + 3) == t.efficient  # a full pass still lets prompts in
    t.observe(60.0, 8)  # a minute for 8 tokens: read-bound, so tokens ride under the read up to the limit
    assert t.read == 60.0 and t.tokens() == 4096 and t.prefill_room(100) == 3996


def test_batch_size_auto_follows_the_costs(tmp_path):
    """--batch-size auto: with every block streamed from a slow disk, a step costs its read whatever its rows, so
    the most sequences win; the default batch size is auto and gives the same results."""
    from streamer.batch import batch_size
    from streamer.costs import choose_batch
    folder = make_split(tmp_path, GQA)
    size, costs = choose_batch(ModelFiles(folder), 1 << 30, 40, 64, torch.float32, keep_resident=False, disk_gbps=1e-6)
    assert size == 40 and [c.batch for c in costs] == [1, 2, 4, 8, 16, 32, 40]
    assert all(c.step_s == c.read_s for c in costs)
    lines = prompts(6, GQA["vocab_size"], seed=4)
    fixed, _ = run(folder, lines, batch_size=2)
    auto, totals = run(folder, lines, batch_size="auto")
    assert 1 <= totals["batch_size"] <= 6
    assert {k: v["tokens"] for k, v in auto.items()} == {k: v["tokens"] for k, v in fixed.items()}
    assert batch_size("auto") == "auto" and batch_size("12") == 12
    for bad in ("0", "x", "-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer or auto"):
            batch_size(bad)
