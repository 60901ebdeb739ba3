"""The native one-row kernels (native.c): int8 sums exactly torch._int_mm's, bf16 within its output's rounding of
float32's, on odd shapes, strided rows and many pieces at once; a resident bf16 file's products in one call are its
streamed pieces' own; without the library every caller takes torch's kernels, and a failed build says why."""
import pytest
import torch
import torch.nn.functional as F

from conftest import resident_in_pieces, stream
from streamer import kernels, native, quant
from streamer.kernels import can_compile

needs_native = pytest.mark.skipif(not native.available(), reason=f"no native kernels: {native.why_not}")
SHAPES = [(1, 1), (5, 33), (16, 64), (7, 100), (1030, 4097)]  # tails of every length, a row block cut short


@needs_native
@pytest.mark.parametrize("out,inp", SHAPES)
def test_int8_gemv_sums_exactly(out, inp):
    torch.manual_seed(0)
    w = torch.randint(-128, 128, (out, inp + 5), dtype=torch.int8)[:, 2:inp + 2]  # rows at a stride, -128 too
    x = torch.randint(-128, 128, (inp,), dtype=torch.int8)
    got = torch.empty(out, dtype=torch.int32)
    assert native.gemv_int8(x, w, got)
    assert torch.equal(got.long(), w.long() @ x.long())


@needs_native
@pytest.mark.parametrize("out,inp", SHAPES)
def test_bf16_gemv_is_linear(out, inp):
    torch.manual_seed(0)
    w = torch.randn(out, inp + 3).bfloat16()[:, 1:inp + 1]
    x = torch.randn(inp).bfloat16()
    got = native.gemv_bf16(w, x)
    assert got.dtype == torch.bfloat16 and got.shape == (out,)
    want = F.linear(x.float(), w.float())  # float32 products and sums, as the kernel's
    torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=8e-3 * float(want.abs().max()) + 1e-6)


@needs_native
def test_pieces_in_one_call_are_each_pieces_own():
    """Pieces of several row counts in one call give each piece's own products, bf16 bit for bit; int8 with an
    input of their own each, one piece's outputs after another's."""
    torch.manual_seed(0)
    pieces = [torch.randn(r, 96).bfloat16() for r in (3, 64, 5, 1)]
    x = torch.randn(96).bfloat16()
    y = torch.empty(73, dtype=torch.bfloat16)
    assert native.gemv_pieces(native.table(pieces), x, y)
    assert torch.equal(y, torch.cat([native.gemv_bf16(w, x) for w in pieces]))
    ws = [torch.randint(-128, 128, (40, 70), dtype=torch.int8) for _ in range(3)]
    xs = torch.randint(-128, 128, (3, 70), dtype=torch.int8)
    acc = torch.empty(3, 40, dtype=torch.int32)  # piece j's outputs in row j
    assert native.gemv_pieces(native.table(ws), xs, acc)
    for j, w in enumerate(ws):
        assert torch.equal(acc[j].long(), w.long() @ xs[j].long())


@needs_native
def test_bf16_one_row_products_are_native_in_every_run():
    """bf16 takes the native one-row products with or without compiled kernels, as int8 and int4 do: a piece alone
    (kernels.linear_one_row) and a resident file's pieces in one call (kernels.NativeRows)."""
    torch.manual_seed(0)
    pieces = [torch.randn(r, 64).bfloat16() for r in (64, 32)]
    x = torch.randn(1, 64).bfloat16()
    rows = kernels.native_rows(pieces)
    for compiled in (False, True):
        with kernels.use_compiled(compiled):
            assert torch.equal(kernels.linear_one_row(x, pieces[0])[0], native.gemv_bf16(pieces[0], x[0]))
            assert torch.equal(rows.at_once(x)[0], torch.cat([native.gemv_bf16(w, x[0]) for w in pieces]))


def test_without_the_library_callers_take_torch(monkeypatch):
    """STREAMER_NATIVE=0: no library, and why; the int8 one-row product is torch._int_mm's, exact as before."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "why_not", None)
    monkeypatch.setenv("STREAMER_NATIVE", "0")
    assert native.library() is None and native.why_not == "STREAMER_NATIVE=0"
    w, x = torch.randint(-127, 128, (32, 64), dtype=torch.int8), torch.randint(-127, 128, (1, 64), dtype=torch.int8)
    assert native.gemv_bf16(torch.zeros(4, 64).bfloat16(), torch.zeros(64).bfloat16()) is None
    assert not native.gemv_int8(x[0], w, torch.empty(32, dtype=torch.int32))
    got = quant.int8_one_row(x, w, torch.empty(1, 32, dtype=torch.int32))
    assert torch.equal(got[0].long(), w.long() @ x[0].long())


def test_a_failed_build_says_why_and_leaves_nothing(monkeypatch, tmp_path):
    if missing := [f for f in native.CPU_FLAGS if f not in native._cpu_flags()]:
        pytest.skip(f"the CPU lacks {missing}: no build is tried")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "why_not", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert native.library() is None and native.why_not.startswith("false could not build native.c")
    assert list((tmp_path / "streamer").iterdir()) == []


@needs_native
def test_a_build_lands_whole_in_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "why_not", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.library() is not None
    built = list((tmp_path / "streamer").iterdir())
    assert len(built) == 1 and built[0].name.startswith("native-") and built[0].suffix == ".so"


@needs_native
@pytest.mark.skipif(not can_compile(), reason="inductor needs a C++ compiler")
def test_resident_bf16_pieces_in_one_native_call_give_the_streamed_output(tmp_path, monkeypatch):
    """A resident bf16 file takes one row's products of all its row pieces (wqkv, wo, the head) in one native
    call each, and of all FFN slices in two (kernels.NativeRows, NativeFFN); streamed pieces take a call each. The
    same numbers, bit for bit."""
    runner = resident_in_pieces(tmp_path, monkeypatch, None, torch.bfloat16)
    block, head = runner.views["block_000.safetensors"], runner.views["head.safetensors"]
    assert isinstance(block.joined["wqkv"], kernels.NativeRows) and len(block.joined["wqkv"].pieces) > 1
    assert isinstance(head.joined["output"], kernels.NativeRows) and len(head.joined["output"].pieces) > 1
    assert isinstance(block.joined["ffn"], kernels.NativeFFN) and len(block.joined["ffn"].slices) == 7
    runner.close()
    resident, _ = stream(tmp_path / "bf16", [1, 2, 3], 8, dtype=torch.bfloat16, compile=True)
    streamed, _ = stream(tmp_path / "bf16", [1, 2, 3], 8, dtype=torch.bfloat16, compile=True,
                         runner_kw={"resident": []})
    assert [p.token for p in resident] == [p.token for p in streamed]
    assert [p.logprob for p in resident] == [p.logprob for p in streamed]


@pytest.mark.parametrize("with_library", [True, False])
def test_a_bf16_run_on_the_native_library_plans_no_compiled_kernels(tmp_path, monkeypatch, with_library):
    """compile=True on bf16 with the library: its one-row matmuls and decode attention are native, inductor
    compiles nothing, so the plan keeps no memory for compiled kernels (budget.KERNELS), which go to the weights.
    Without the library the same run compiles them, and plans their memory."""
    if with_library and not native.available():
        pytest.skip(f"no native kernels: {native.why_not}")
    from conftest import HD64_TIED, make_split
    from streamer import Engine
    from streamer.budget import KERNELS
    if not with_library:
        monkeypatch.setattr(native, "available", lambda: False)
    compiled = []
    monkeypatch.setattr(kernels, "_get", lambda fn, dynamic=True: compiled.append(fn) or fn)  # what inductor would get
    folder = make_split(tmp_path, HD64_TIED)
    with Engine(folder, dtype="bfloat16", max_seq_len=32, compile=True) as engine:
        runner = engine.runner(1, 16)
        runner._warm.result()
        assert engine.plan.kernels == (0 if with_library else KERNELS)
        assert bool(compiled) != with_library


@needs_native
@pytest.mark.parametrize("D,H,KV,hd,S", [(1, 32, 8, 128, 17), (3, 8, 2, 64, 40), (2, 4, 4, 16, 5)])
def test_decode_attention_is_the_compiled_kernels_math(D, H, KV, hd, S):
    """On views of a longer cache, each sequence reading its own positions: the float32 math of
    kernels._decode_attention, within the output's bf16 rounding."""
    torch.manual_seed(0)
    kv = torch.randn(2, D + 1, S + 7, KV, hd).bfloat16()[:, 1:, :S]
    q, ends = torch.randn(D, H, hd).bfloat16(), torch.tensor([S - j for j in range(D)])
    got = native.attend_bf16(q, kv[0], kv[1], ends)
    want = kernels._decode_attention(q, kv[0], kv[1], ends)
    assert got.shape == (D, H * hd) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-3)


@needs_native
@pytest.mark.parametrize("T,start,H,KV,hd", [(37, 0, 8, 2, 128), (20, 45, 4, 4, 64), (1, 9, 16, 2, 32), (64, 3, 8, 1, 16)])
def test_prefill_attention_is_sdpas_math(T, start, H, KV, hd):
    """A prompt chunk's causal attention (native.attend_prefill_bf16, which model.attend takes in bf16): as close to
    float64 math as torch's SDPA is, at positions from 0 or after a cached prefix, any number of query heads a kv
    head serves (1 to 8), head sizes 16 to 128, keys and values as views of a longer cache row."""
    torch.manual_seed(T)
    cache = torch.randn(2, 3, start + T + 11, KV, hd).bfloat16()
    k, v, q = cache[0, 1, :start + T], cache[1, 1, :start + T], torch.randn(T, H, hd).bfloat16()
    qq, kk, vv = (t.double().transpose(0, 1) for t in (q, k, v))
    scores = (qq.view(KV, H // KV, T, hd) @ kk[:, None].transpose(-1, -2)) / hd ** 0.5
    scores = scores.masked_fill(~torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start), float("-inf"))
    want = (torch.softmax(scores, -1) @ vv[:, None]).reshape(H, T, hd).transpose(0, 1).reshape(T, H * hd)
    mask = torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start)
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          attn_mask=mask, enable_gqa=H != KV)[0].transpose(0, 1).reshape(T, H * hd)
    got = native.attend_prefill_bf16(q, k, v, start)
    assert got.dtype == torch.bfloat16 and got.shape == (T, H * hd)
    assert float((got.double() - want).abs().max()) <= 2 * float((sdpa.double() - want).abs().max()) + 1e-3
    torch.testing.assert_close(got.float(), sdpa.float(), rtol=0, atol=1e-2)


@needs_native
def test_long_prompts_take_sdpa():
    """Past kernels.PREFILL_NATIVE_POSITIONS positions (where torch's tiled SDPA caught up) a chunk is left to SDPA."""
    q = torch.randn(3, 2, 16).bfloat16()
    for start, native_takes in ((kernels.PREFILL_NATIVE_POSITIONS - 3, True), (kernels.PREFILL_NATIVE_POSITIONS - 2, False)):
        kv = torch.randn(2, start + 3, 1, 16).bfloat16()
        assert (kernels.prefill_attention(q, kv[0], kv[1], start) is not None) == native_takes


@needs_native
@pytest.mark.parametrize("out,inp,group", [(64, 64, 64), (128, 256, 64), (192, 512, 128), (64, 96, 32)])
def test_int4_gemv_is_its_formula_on_torchs_layout(out, inp, group):
    """The codes read from torch's int4 layout, x quantized to int8 a group at a time: within the output's bf16
    rounding of that formula in float64, and within 1.5% of the largest output of the float product (torch's own
    int4 kernel: its bf16 rounding alone)."""
    torch.manual_seed(0)
    q = quant.quantize_int4(torch.randn(out, inp) * 0.02, group)
    codes = quant.int4_codes_t(q.packed, out, inp).t().double()  # [out, in], 0..15
    sz = q.sz.to(torch.bfloat16).double()
    g = torch.arange(inp) // group
    x = torch.randn(inp).bfloat16()
    xg = x.float().view(-1, group)
    sx = xg.abs().amax(1, keepdim=True) / 127  # in float32, as the kernel rounds them (an x / sx off by one ulp
    xq = torch.round(xg / sx).double().flatten()  # can round to the next code)
    ints = ((codes - 8) * xq).view(out, -1, group).sum(-1)  # [out, groups]
    formula = (sz[:, :, 0].t() * sx.double().t() * ints + sz[:, :, 1].t() * xg.double().sum(1)).sum(1)
    got = native.gemv_int4(x, q)
    assert got.dtype == torch.bfloat16 and got.shape == (out,)
    torch.testing.assert_close(got.double(), formula, rtol=8e-3, atol=1e-3 * float(formula.abs().max()))
    exact = ((codes - 8) * sz[g, :, 0].t() + sz[g, :, 1].t()) @ x.double()
    assert (got.double() - exact).abs().max() <= 0.015 * exact.abs().max()


@needs_native
def test_resident_int4_pieces_stay_where_they_are_and_give_the_streamed_output(tmp_path, monkeypatch):
    """Where the native int4 kernel runs, a resident int4 file keeps its pieces in place (no private copies of whole
    matrices) and takes one row's products of all of them in one native call each (kernels.NativeRows, NativeFFN),
    with the streamed pieces' numbers, bit for bit."""
    runner = resident_in_pieces(tmp_path, monkeypatch, "int4", torch.bfloat16)
    block, head = runner.views["block_000.safetensors"], runner.views["head.safetensors"]
    assert isinstance(block.joined["wqkv"], kernels.NativeRows) and block.joined["wqkv"].group == 64
    assert isinstance(head.joined["output"], kernels.NativeRows) and len(head.joined["output"].pieces) == 8
    assert isinstance(block.joined["ffn"], kernels.NativeFFN) and len(block.joined["ffn"].slices) == 7
    assert {"wqkv.0", "ffn.0.w1", "ffn.6.w2"} <= set(block.t)  # nothing copied away and given back
    runner.close()
    resident, _ = stream(tmp_path / "int4", [1, 2, 3], 8, dtype=torch.bfloat16)
    streamed, _ = stream(tmp_path / "int4", [1, 2, 3], 8, dtype=torch.bfloat16, runner_kw={"resident": []})
    assert [p.token for p in resident] == [p.token for p in streamed]
    assert [p.logprob for p in resident] == [p.logprob for p in streamed]


@pytest.mark.parametrize("trouble", ["unwritable cache", "no such compiler"])
def test_a_build_that_cannot_run_falls_back_and_says_why(monkeypatch, tmp_path, trouble):
    """A cache folder that cannot be made (a file in its place) or a $CC that does not exist: no library, a reason
    naming the path, and every caller on torch's kernels, rather than an error in the middle of a run."""
    if missing := [f for f in native.CPU_FLAGS if f not in native._cpu_flags()]:
        pytest.skip(f"the CPU lacks {missing}: no build is tried")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "why_not", None)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file") if trouble == "unwritable cache" else str(tmp_path))
    if trouble == "no such compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.library() is None and native.why_not.startswith("cannot build or load ")
    assert native.gemv_bf16(torch.zeros(4, 64).bfloat16(), torch.zeros(64).bfloat16()) is None
