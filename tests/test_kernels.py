"""The compiled one-row kernel of decode (kernels.py) computes what F.linear does."""
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
def test_compiled_swiglu_is_the_block_math():
    from streamer.kernels import compiled_swiglu
    torch.manual_seed(1)
    x, w1, w3, w2 = torch.randn(1, 64), torch.randn(32, 64) / 8, torch.randn(32, 64) / 8, torch.randn(64, 32) / 6
    want = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)[0]
    torch.testing.assert_close(compiled_swiglu(w1, w3, w2, x[0]), want, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_compiled_bf16_tells_the_same_story(tmp_path):
    """bf16, as `--dtype auto` runs on this CPU: the trained model's greedy story is the same with the kernels."""
    from conftest import STORIES
    from streamer.split import split
    split(STORIES, tmp_path / "stories")
    eager, _ = stream(tmp_path / "stories", [1], 48, dtype=torch.bfloat16)
    compiled, _ = stream(tmp_path / "stories", [1], 48, dtype=torch.bfloat16, compile=True)
    assert [p.token for p in compiled] == [p.token for p in eager]
    torch.testing.assert_close(torch.tensor([p.logprob for p in compiled]), torch.tensor([p.logprob for p in eager]),
                               rtol=0, atol=0.05)  # bf16 rounding, in other places than the eager kernels round
