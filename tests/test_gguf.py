"""GGUF input: files written with the gguf package's own writer (tools/make_gguf.py: llama.cpp's tensor
names, Meta's q/k order) from random checkpoints made here, split and run against the Meta split and
against transformers loading the same GGUF."""
import filecmp
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import SHAPES, assert_logprobs_close
from streamer import ModelFiles
from streamer.errors import StreamerError
from streamer.split import split
from streamer.synthetic import write_checkpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import make_gguf  # noqa: E402

gguf = pytest.importorskip("gguf")
PROMPT = [1, 17, 42, 99, 5, 250, 3, 8, 120, 64, 7]
NO_VOCAB = lambda w: None  # noqa: E731  (weights only; tokenizers are tested below)


def gguf_split(meta: Path, root: Path, qtype: str, dtype: str | None = None, parts: int = 1) -> Path:
    make_gguf.write(meta, root / "m.gguf", qtype, vocab=NO_VOCAB, quiet=True, parts=parts)
    src = root / ("m-00001-of-%05d.gguf" % parts if parts > 1 else "m.gguf")
    split(src, root / f"g-{qtype}", dtype=dtype)
    return root / f"g-{qtype}"


def weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


# Two more shapes than the references': a head width other than dim / n_heads (GGUF's key_length), and linear
# RoPE scaling (rope.scaling.type), as other families' GGUF files have them.
GGUF_SHAPES = {**SHAPES, "head_dim_32": ({**SHAPES["gqa"][0], "head_dim": 32}, False),
               "linear_rope": ({**SHAPES["gqa"][0], "rope_linear_factor": 4.0}, False)}
FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def meta_and_split(root: Path, shape: str, dtype=torch.float32, quantize: str | None = None) -> tuple[Path, Path]:
    params, tied = GGUF_SHAPES[shape]
    meta = write_checkpoint(root / "meta", params, dtype, seed=1, tied=tied, tokenizer=False)
    split(meta, root / "layers", quantize=quantize)
    return meta, root / "layers"


@pytest.mark.parametrize("shape,qtype,quantize", [(s, "F32", None) for s in sorted(GGUF_SHAPES)]
                         + [("gqa", "F16", None), ("gqa", "BF16", None), ("gqa", "BF16", "int8"), ("gqa", "BF16", "int4")])
def test_float_gguf_splits_exactly_as_the_meta_checkpoint(tmp_path, shape, qtype, quantize):
    """An F32, F16 or BF16 GGUF holds the checkpoint's exact values: every split file is byte for byte the
    Meta split's, re-quantized ones too, and so are the args (Llama 3.1's scaling read back from rope_freqs,
    a tied head from its absence, the head width from key_length, linear scaling from its metadata)."""
    meta, layers = meta_and_split(tmp_path, shape, FLOATS[qtype], quantize)
    make_gguf.write(meta, tmp_path / "m.gguf", qtype, vocab=NO_VOCAB, quiet=True)
    got = tmp_path / "got"
    split(tmp_path / "m.gguf", got, quantize=quantize)
    assert weight_files(got) == weight_files(layers)
    for name in weight_files(layers):
        assert filecmp.cmp(got / name, layers / name, shallow=False), name
    got_args, want_args = ModelFiles(got).args, ModelFiles(layers).args  # the FFN's size may be put another way
    assert got_args.ffn_dim == want_args.ffn_dim
    assert replace(got_args, multiple_of=1, ffn_dim_multiplier=None) == replace(want_args, multiple_of=1, ffn_dim_multiplier=None)


def test_split_gguf_parts_are_merged(tmp_path):
    meta, layers = meta_and_split(tmp_path, "gqa")
    got = gguf_split(meta, tmp_path, "F32", parts=3)
    assert sorted(p.name for p in tmp_path.glob("m-*.gguf")) == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert all(filecmp.cmp(got / n, layers / n, shallow=False) for n in weight_files(layers))
    (tmp_path / "m-00002-of-00003.gguf").unlink()
    with pytest.raises(StreamerError, match="m-00002-of-00003.gguf is missing"):
        split(tmp_path / "m-00001-of-00003.gguf", tmp_path / "again")


# Per block of 32 values with largest magnitude a, the GGUF quantizers (gguf.quants, as llama.cpp's) store:
#  Q8_0: d = a/127 in float16, codes round(x/d) in [-127, 127]: error <= d/2 from rounding, plus
#        127 * |d - fp16(d)| <= 127 * d * 2**-11 from the scale's rounding: <= 0.57 d.
#  Q4_0: d = -m/8 (m the signed value of largest magnitude), codes min(15, round(x/d + 8)): error <= |d|/2,
#        except values within |d|/2 of -m, which clamp to 15 and miss by up to |d|; plus 8 * |d| * 2**-11.
BOUNDS = {"Q8_0": (127, 0.57), "Q4_0": (8, 1.004)}


@pytest.mark.parametrize("qtype", sorted(BOUNDS))
def test_quantized_gguf_splits_within_its_quantization_error(tmp_path, qtype):
    """Q8_0 and Q4_0 dequantize exactly as the gguf package does (our torch fast paths), and every weight
    is within the format's stated error of the original."""
    from safetensors.torch import load_file
    meta, layers = meta_and_split(tmp_path, "gqa")
    got = gguf_split(meta, tmp_path, qtype, dtype="float32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    ffn_gate = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    ref = torch.from_numpy(gguf.quants.dequantize(ffn_gate.data, ffn_gate.tensor_type))
    w1 = load_file(got / "block_000.safetensors")
    assert torch.equal(torch.cat([w1[k] for k in sorted(w1) if k.endswith(".w1")]), ref)
    levels, slack = BOUNDS[qtype]
    for name in weight_files(layers):
        want, have = load_file(layers / name), load_file(got / name)
        for key, w in want.items():
            if w.dim() == 1:
                assert torch.equal(have[key], w), key  # norms stay float32
                continue
            if key.startswith("ffn") and key.endswith("w2"):
                continue  # column pieces cut across GGUF's row blocks; their rows are checked through w1/w3/wo
            blocks = w.reshape(-1, 32)
            d = blocks.abs().amax(1, keepdim=True) / levels
            err = (have[key].reshape(-1, 32) - blocks).abs()
            assert (err <= slack * d + 1e-12).all(), (name, key, (err / d).max().item())
            assert err.mean() < 0.3 * d.mean(), (name, key)  # rounding to the nearest level: ~d/4 on average


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_0"])
def test_other_gguf_types_dequantize_through_the_gguf_package(tmp_path, qtype):
    from safetensors.torch import load_file
    meta, _ = meta_and_split(tmp_path, "gqa")
    got = gguf_split(meta, tmp_path, qtype, dtype="float32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_output.weight")
    wo = load_file(got / "block_001.safetensors")
    assert torch.equal(torch.cat([wo[k] for k in sorted(wo) if k.startswith("wo.")]),
                       torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).to(wo["wo.0"].dtype))


@pytest.mark.parametrize("shape,qtype", [("gqa", "F32"), ("hd64_tied", "F32"), ("gqa", "Q8_0")])
def test_gguf_logprobs_match_transformers_loading_the_same_file(tmp_path, shape, qtype):
    """transformers' own GGUF loader (LlamaForCausalLM.from_pretrained(gguf_file=)) on the same file."""
    from transformers import LlamaForCausalLM
    from streamer import MemoryKVCache, ModelFiles, Runner
    meta, _ = meta_and_split(tmp_path, shape)
    got = gguf_split(meta, tmp_path, qtype, dtype="float32")
    hf = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0, -1].float(), -1)
    files = ModelFiles(got)
    with Runner(files, torch.float32) as runner:
        logits = runner.forward([(0, PROMPT)], MemoryKVCache(files.args, 1, len(PROMPT), torch.float32))[0]
    assert_logprobs_close(torch.log_softmax(logits, -1), want)


def test_gguf_errors_name_the_file_and_what_is_wrong(tmp_path):
    meta, _ = meta_and_split(tmp_path, "gqa")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(10))
    with pytest.raises(StreamerError, match="bad.gguf: not a readable GGUF file"):
        split(bad, tmp_path / "out")
    w = gguf.GGUFWriter(tmp_path / "qwen.gguf", "qwen2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(StreamerError, match="qwen.gguf: architecture 'qwen2' is not 'llama'"):
        split(tmp_path / "qwen.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_header_reads_as_the_gguf_package_reads_it(tmp_path):
    """read_gguf parses the header itself (the package's reader holds ~450 MB for a 128K vocabulary): every
    metadata value and every tensor's type, shape and bytes agree with gguf.GGUFReader's."""
    import numpy as np
    from streamer.gguf_source import read_gguf
    meta, _ = meta_and_split(tmp_path, "gqa")

    def vocab(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "▁a", "é", "🙂"] + [f"t{i}" for i in range(508)])
        w.add_token_scores([0.0, -1.5, -2.25, -3.0] + [-4.0] * 508)
        w.add_token_types([2, 1, 1, 1] + [1] * 508)
        w.add_add_bos_token(True)
        w.add_uint64("test.big", 2 ** 40 + 3)
        w.add_int8("test.small", -5)
        w.add_float64("test.f64", 0.1)
        w.add_array("test.ints", [1, -2, 3])
    make_gguf.write(meta, tmp_path / "m.gguf", "Q8_0", vocab=vocab, quiet=True)
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    want = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(fields) == set(want)
    for key, value in want.items():
        if isinstance(value, float) and reader.fields[key].types == [gguf.GGUFValueType.FLOAT32]:
            assert np.float32(fields[key]) == np.float32(value), key
        else:
            assert fields[key] == value, key
    assert set(tensors) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        got = tensors[t.name]
        assert (got.tensor_type, got.shape) == (t.tensor_type, tuple(int(n) for n in t.shape)), t.name
        assert np.array_equal(got.read().reshape(-1).view(np.uint8), np.asarray(t.data).reshape(-1).view(np.uint8))
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 1000])
    with pytest.raises(StreamerError, match=r"cut.gguf: tensor .* runs past the end of the file"):
        split(tmp_path / "cut.gguf", tmp_path / "out")
