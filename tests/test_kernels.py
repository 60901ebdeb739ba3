"""The compiled kernels (kernels.py) compute what their eager forms do: the one-row matmul of decode, the FFN
slice, decode attention, and int4 codes converted a tile at a time."""
import pytest
import torch
import torch.nn.functional as F

from conftest import GQA, assert_logprobs_close, make_split, stream
from streamer.kernels import can_compile, compiled_gemv

needs_compiler = pytest.mark.skipif(not can_compile(), reason="inductor needs a C++ compiler")


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_gemv_is_linear(dtype):
    torch.manual_seed(0)
    w, x = torch.randn(384, 256).to(dtype), torch.randn(1, 256).to(dtype)
    want = F.linear(x.float(), w.float())[0]  # float32 products and sums, as both kernels accumulate
    got = compiled_gemv(w, x[0])
    assert got.dtype == dtype and got.shape == (384,)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the output's own rounding (2^-8 relative)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    view = torch.randn(400, 256).to(dtype)[16:]  # a view at an offset, as the ring and resident buffers hand out
    torch.testing.assert_close(compiled_gemv(view, x[0]).float(), F.linear(x.float(), view.float())[0], rtol=tol, atol=tol)


@needs_compiler
def test_engine_with_compiled_kernel_gives_the_same_generation(tmp_path):
    folder = make_split(tmp_path, GQA)
    eager, _ = stream(folder, [3, 141, 59, 26], 16)
    compiled, _ = stream(folder, [3, 141, 59, 26], 16, compile=True)
    assert [p.token for p in compiled] == [p.token for p in eager]
    assert_logprobs_close([p.logprob for p in compiled], [p.logprob for p in eager])


@needs_compiler
def test_compiled_bf16_tells_the_same_story(tmp_path):
    """bf16, as `--dtype auto` runs on this CPU: the trained model's greedy story is float32's, eager or with the
    kernels, and both stay within bf16's rounding of float32's logprobs (measured: 0.040 eager, 0.050 compiled)."""
    from conftest import STORIES
    from streamer.split import split
    split(STORIES, tmp_path / "stories")
    f32, _ = stream(tmp_path / "stories", [1], 48, dtype=torch.float32)
    for compile in (False, True):
        bf16, _ = stream(tmp_path / "stories", [1], 48, dtype=torch.bfloat16, compile=compile)
        assert [p.token for p in bf16] == [p.token for p in f32]
        torch.testing.assert_close(torch.tensor([p.logprob for p in bf16]), torch.tensor([p.logprob for p in f32]),
                                   rtol=0, atol=0.08)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)])
@pytest.mark.parametrize("slots", [[0], [1, 2, 3], [3, 0, 2], [5, 0]])  # one; a run; a run with a gap; rows far apart
def test_decode_attention_is_each_sequences_own(compiled, slots):
    """All decode rows of a pass at once (model.attend_decode), eager or compiled, give what attending one sequence
    at a time gives, whatever their lengths and whatever the (finite) values past a sequence's end."""
    from streamer import kernels
    from streamer.model import attend, attend_decode
    torch.manual_seed(0)
    H, KV, hd, S = 8, 2, 16, 9
    kv = torch.randn(2, 6, S, KV, hd)
    ends = torch.tensor([9, 4, 1, 6][:len(slots)])
    for d, e in zip(slots, ends):
        kv[:, d, e:] = 1e4
    q = torch.randn(len(slots), H, hd)
    want = torch.cat([attend(q[d:d + 1], kv[0, s, :e], kv[1, s, :e], int(e) - 1) for d, (s, e) in enumerate(zip(slots, ends))])
    with kernels.use_compiled(compiled):
        got = attend_decode(q, kv, slots, ends)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_batch_with_compiled_kernels_gives_single_runs(tmp_path):
    """A batch with the compiled decode attention (and a slot refilled, so some passes take scattered rows) gives
    each prompt's single-run tokens and logprobs."""
    from streamer import Engine
    folder = make_split(tmp_path, GQA)
    lines = [{"id": i, "prompt_ids": [3, 141, 59, 26, 53, 58, 97][:2 + i], "max_new_tokens": 6 + i} for i in range(5)]
    with Engine(folder, dtype="float32", compile=True) as engine:
        got = {r["id"]: r for r in engine.batch(lines, batch_size=4)}
        assert engine._runner.compiled
    for line in lines:
        single, _ = stream(folder, line["prompt_ids"], line["max_new_tokens"])
        assert got[line["id"]]["tokens"] == [p.token for p in single]
        assert_logprobs_close(got[line["id"]]["logprobs"], [p.logprob for p in single])


@needs_compiler
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_int4_tiles_are_the_eager_tiles(dt, monkeypatch):
    """Many-row int4 matmuls through the compiled tile kernel give the eager tiles' very bits. It takes tiles of
    whole 64-row blocks from INT4_COMPILED_ROWS rows; a tail tile stays eager."""
    from streamer import kernels, quant
    torch.manual_seed(0)
    qw = quant.quantize(torch.randn(208, 128) * 0.05, "int4")  # three blocks of 64 rows, then a tail of 16
    monkeypatch.setattr(quant, "DEQUANT_TILE", 64 * 128)  # a tile of 64 rows: three whole, then the tail alone
    calls = []
    tile = kernels.int4_int8_tile
    monkeypatch.setattr(kernels, "int4_int8_tile", lambda *a: calls.append(a[0].shape) or tile(*a))
    x = torch.randn(quant.INT4_COMPILED_ROWS, 128).to(dt)
    with kernels.use_compiled(True):
        got = quant.qlinear(x, qw)
        assert calls == [(64, 64)] * 3
        quant.qlinear(x[1:], qw)
        assert len(calls) == 3  # fewer rows: torch's int4 kernel
    monkeypatch.setattr(quant, "INT4_DEQUANT_ROWS", quant.INT4_COMPILED_ROWS)
    with kernels.use_compiled(False):
        assert torch.equal(got, quant.qlinear(x, qw))
    sp, zp, _ = quant.int4_int8_scales(qw.sz.to(dt))
    tile = kernels.int4_int8_tile(qw.packed[:192], sp[:, :192], zp[:, :192], torch.empty(128, 192, dtype=torch.int8))
    want = quant.int4_as_int8_t(qw.packed[:192], sp[:, :192], zp[:, :192], torch.empty_like(tile))
    assert torch.equal(tile, want) and tile.abs().max() == 127


def test_int4_tiles_take_the_kernel_warmed_up_for_their_shapes(tmp_path, monkeypatch):
    """A batch's decode passes on an int4 split (64+ rows each) take the int4 tile kernel, for just the tile shapes
    the runner's warm-up compiled, and give what eager tiles of the same rows give. The kernels run uncompiled
    here (the compiled ones' numbers are checked above)."""
    from conftest import STORIES
    from streamer import Engine, kernels, quant
    from streamer.split import split
    split(STORIES, tmp_path / "int4", quantize="int4")
    monkeypatch.setattr(kernels, "_get", lambda fn, dynamic=True: fn)
    warmed, used = set(), set()
    warm_up = kernels.warm_up
    monkeypatch.setattr(kernels, "warm_up", lambda *a: warmed.update(a[3]) or warm_up(*a))
    tile = kernels.int4_int8_tile
    monkeypatch.setattr(kernels, "int4_int8_tile", lambda p, sp, zp, out: used.add((p.shape[0], 2 * p.shape[1],
                                                                                    2 * p.shape[1] // sp.shape[0],
                                                                                    sp.stride(0)))
                        or tile(p, sp, zp, out))
    lines = [{"id": i, "prompt_ids": [1, 1 + i], "max_new_tokens": 3} for i in range(70)]

    def run():
        with Engine(tmp_path / "int4", dtype="bfloat16", max_seq_len=64, compile=True) as engine:
            return [(r["tokens"], r["logprobs"]) for r in engine.batch(lines, batch_size=70)]
    compiled = run()
    assert used and used == warmed
    monkeypatch.setattr(kernels, "int4_compiled", lambda: False)
    monkeypatch.setattr(quant, "INT4_DEQUANT_ROWS", quant.INT4_COMPILED_ROWS)
    assert run() == compiled


@pytest.mark.parametrize("budget,first", [("700M", True), (None, False)])
def test_a_budget_with_no_room_for_the_compiler_compiles_before_loading_resident_files(tmp_path, monkeypatch, budget,
                                                                                        first):
    """A run that compiles its kernels plans for their memory (KERNELS); a plan that leaves less than
    COMPILE_MEMORY beside it waits for them to compile before it loads its resident files, a roomy one loads them
    while they compile."""
    import time
    from streamer import Engine, kernels
    from streamer.budget import KERNELS
    from streamer.engine import COMPILE_MEMORY
    folder = make_split(tmp_path, GQA)
    monkeypatch.setattr(kernels, "warm_up", lambda *a: time.sleep(1))  # a slow compile, with no compiler needed
    with Engine(folder, memory_budget=budget, dtype="bfloat16", max_seq_len=64, compile=True) as engine:
        runner = engine.runner(1, 16)
        assert runner.resident and runner._warm.done() == first
        assert (engine.plan.budget - engine.plan.predicted_peak < COMPILE_MEMORY) == first
        assert engine.plan.breakdown()["compiled kernels"] == KERNELS
    with Engine(folder, memory_budget=budget, dtype="bfloat16", max_seq_len=64, compile=False) as engine:
        engine.runner(1, 16)
        assert engine.plan.kernels == 0


def test_auto_compiles_only_where_the_budget_holds_the_kernels(tmp_path, monkeypatch, capsys):
    """A budget that fits a plan but not the compiled kernels' memory beside it: compile="auto" runs eager,
    compile=True is refused, naming them."""
    from streamer import Engine, StreamerError, kernels
    monkeypatch.setattr(kernels, "can_compile", lambda: True)
    monkeypatch.setattr(kernels, "warm_up", lambda *a: None)
    folder = make_split(tmp_path, GQA)
    with Engine(folder, dtype="bfloat16", max_seq_len=64) as engine:
        assert engine.runner(32, 16).compiled  # batch 32: "auto" compiles, given the room
    with Engine(folder, memory_budget="260M", dtype="bfloat16", max_seq_len=64) as engine:
        assert not engine.runner(32, 16).compiled
        planned = engine.plan.predicted_peak
    import argparse
    from streamer import budget  # `streamer plan` plans as the run does: eager, where the kernels do not fit
    parser = budget.setup_arg_parser(argparse.ArgumentParser())
    for size, kernels_shown in (("260M", False), ("8G", True)):
        out = capsys.readouterr() and budget.main(parser.parse_args(
            [str(folder), "--memory-budget", size, "--batch-size", "32", "--context", "16", "--disk-gbps", "2"]))
        shown = capsys.readouterr().out
        assert out == 0 and (f"compiled kernels {budget.mib(budget.KERNELS)}" in shown) == kernels_shown
        assert kernels_shown or f"predicted peak   {budget.mib(planned)}" in shown
    with Engine(folder, memory_budget="260M", dtype="bfloat16", max_seq_len=64, compile=True) as engine:
        with pytest.raises(StreamerError, match="compiled kernels"):
            engine.runner(32, 16)


def test_auto_counts_only_unquantized_resident_bytes(tmp_path, monkeypatch):
    """A quantized split's one-row matmuls take torch's integer kernels, so its resident bytes do not make
    "auto" compile at one sequence (a first decode step would wait for kernels it barely uses); 32 sequences do."""
    from streamer import Engine, engine as engine_module, kernels
    from streamer.split import split
    monkeypatch.setattr(kernels, "can_compile", lambda: True)
    monkeypatch.setattr(kernels, "warm_up", lambda *a: None)
    monkeypatch.setattr(engine_module, "COMPILE_MIN_BYTES", 1)  # any resident bytes would do
    bf16 = make_split(tmp_path, GQA)
    split(tmp_path / "meta", tmp_path / "int8", quantize="int8")
    with Engine(bf16, dtype="bfloat16", max_seq_len=64) as engine:
        assert engine.runner(1, 16).resident and engine.runner(1, 16).compiled
    with Engine(tmp_path / "int8", dtype="bfloat16", max_seq_len=64) as engine:
        assert engine.runner(1, 16).resident and not engine.runner(1, 16).compiled
        assert engine.runner(32, 16).compiled


def test_a_batch_of_one_warms_up_one_sequences_attention_only(tmp_path, monkeypatch):
    """The warm-up compiles decode attention for many sequences only where a pass may decode more than one:
    the Engine passes its plan's batch, and a batch of one is spared that compile (~1 s)."""
    from streamer import Engine, kernels
    calls = []
    monkeypatch.setattr(kernels, "_get", lambda fn, dynamic=True: lambda *a: calls.append((fn.__name__, a[0].shape[0])))
    for batch, sequences in ((1, [1]), (4, [1, 3]), (0, [1, 3])):  # 3: many sequences, apart from 2 kv heads
        calls.clear()
        kernels.warm_up(64, torch.bfloat16, (8, 2, 8), batch=batch)
        assert [d for name, d in calls if name == "_decode_attention"] == sequences
    got = []
    monkeypatch.setattr(kernels, "warm_up", lambda *a: got.append(a[-1]))
    monkeypatch.setattr(kernels, "can_compile", lambda: True)
    folder = make_split(tmp_path, GQA)
    with Engine(folder, dtype="bfloat16", max_seq_len=64, compile=True) as engine:
        engine.runner(1, 16)
        engine.runner(3, 16)
    assert got == [1, 3]


@needs_compiler
def test_nothing_compiles_again_after_the_warm_up(tmp_path):
    """The warm-up's stand-ins are what real calls guard on, so decode passes compile nothing more (a compile there
    stalls the pass and takes memory a tight plan does not have): bf16 at one sequence (one-row matmuls, FFN
    slices, attention), int4 at 70 (tiles, attention of many sequences). stories260K's 4 kv heads once matched a
    stand-in's 4 positions, its w1 and w3 one tensor, and the int4 tiles were not compiled at all (the warm-up's
    thread is outside use_compiled)."""
    from conftest import STORIES
    from streamer import Engine
    from streamer.split import split
    split(STORIES, tmp_path / "bf16", dtype="bfloat16")  # bf16 weights: the one-row kernels take them
    split(STORIES, tmp_path / "int4", quantize="int4")
    torch._dynamo.reset()  # only this test's warm-ups compiled: none of an earlier test's kernels to fall back on
    for folder, batch in (("bf16", 1), ("int4", 70)):
        lines = [{"id": i, "prompt_ids": [1, 1 + i], "max_new_tokens": 3} for i in range(batch)]
        with Engine(tmp_path / folder, dtype="bfloat16", max_seq_len=64, compile=True) as engine:
            engine.runner(batch, 64)._warm.result()
            with torch.compiler.set_stance("fail_on_recompile"):
                assert len(list(engine.batch(lines, batch_size=batch))) == batch
