"""The tools stay runnable: checkpoint presets at their real sizes, and smoke runs of both benchmarks."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamer import ModelArgs
from streamer.checkpoint import expected_shapes
from streamer.memcap import available
from streamer.synthetic import PRESETS

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny preset written by tools/make_checkpoint.py, and its split: shared by the tools' smoke runs,
    which only read them."""
    root = tmp_path_factory.mktemp("tiny")
    meta = root / "meta"
    subprocess.run([sys.executable, TOOLS / "make_checkpoint.py", meta, "--preset", "tiny"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "streamer", "split", meta, root / "layers", "--quiet"], check=True, capture_output=True)
    return meta, root / "layers"


def test_presets_have_the_real_sizes():
    count = {k: sum(torch.Size(s).numel() for s in expected_shapes(ModelArgs.from_params(p)).values()) for k, p in PRESETS.items()}
    assert count["8b"] == 8_030_261_248
    assert ModelArgs.from_params(PRESETS["8b"]).ffn_dim == 14336
    assert ModelArgs.from_params(PRESETS["1b"]).head_dim == 64 and ModelArgs.from_params(PRESETS["1b"]).ffn_dim == 8192
    assert ModelArgs.from_params(PRESETS["3b"]).ffn_dim == 8192


def test_bench_smoke(tmp_path, tiny):
    meta, layers = tiny  # prefill and int8 run the same code as batch and int4 (bench.run_steps): left out for time
    subprocess.run([sys.executable, "-m", "streamer", "split", meta, tmp_path / "int4", "--quiet", "--quantize", "int4"],
                   check=True, capture_output=True)
    r = subprocess.run([sys.executable, TOOLS / "bench.py", layers, "--cap", "none", "--warm", "--steps", "1",
                        "--cases", "floor,matmul,qmatmul,attention,batch,int4,resident", "--batches", "2", "--compile", "off",
                        "--int4", tmp_path / "int4"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for row in ("cold read", "matmul rate", "decode step, batch 2", "int4 files", "memory read rate",
                "decode step, all resident", "loading them", "int8 matmul, 512 rows", "int4 matmul, 1 rows",
                "decode attention, 256 sequences x 320 positions"):
        assert row in r.stdout, r.stdout
    assert "failed" not in r.stdout
    r = subprocess.run([sys.executable, TOOLS / "bench_memory.py", meta, layers, "--caps", "none", "--budgets", "",
                        "--new-tokens", "2", "--warm", "--out", tmp_path / "m.md", "--plot", tmp_path / "m.png"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| none | ok |" in (tmp_path / "m.md").read_text()


def test_floor_reads_read_every_byte(tmp_path, monkeypatch):
    """bench.floor_read: each of its readers, the runner's own included, reads whole files (odd sizes, a file
    smaller than one chunk) and the fastest is named."""
    monkeypatch.syspath_prepend(str(TOOLS))
    from bench import FLOOR_READS, cold_read, floor_read, stream_read
    paths = []
    for i, size in enumerate([(16 << 20) + 12345, 5000, 3 << 20]):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes())
    total = sum(p.stat().st_size for p in paths)
    assert stream_read(paths, readers=3)["bytes"] == total == cold_read(paths, 2)["bytes"]
    best = floor_read(paths)
    assert best["how"] in FLOOR_READS and set(best["all"]) == set(FLOOR_READS) and best["seconds"] == min(best["all"].values())


@pytest.mark.skipif(not available()[0], reason=f"memcap cannot run here: {available()[1]}")
def test_bench_caps_smoke(tiny):
    r = subprocess.run([sys.executable, TOOLS / "bench_caps.py", tiny[1], "--caps", "384M,1G", "--new-tokens", "4",
                        "--prompt-len", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| 384M |" in r.stdout and "| 1G |" in r.stdout and "384M against 1G: ratio of medians" in r.stdout, r.stdout


def test_make_gguf_writes_what_llama_cpp_reads(tmp_path, tiny):
    """tools/make_gguf.py: llama.cpp's names and metadata, the checkpoint's exact tensors (q/k in Meta's order,
    as llama.cpp's converter writes them), and a vocabulary whose byte-level BPE merges encode as tiktoken does."""
    import gguf
    from streamer.gguf_source import read_gguf
    from streamer.split import split
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from streamer.tokenizer import PAT_STR, Tokenizer as Llama3Tokenizer

    meta = tiny[0]
    r = subprocess.run([sys.executable, TOOLS / "make_gguf.py", meta, tmp_path / "m.gguf"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fields, tensors = read_gguf(tmp_path / "m.gguf")  # checked against gguf.GGUFReader in test_gguf.py, ~10x faster
    field = fields.__getitem__
    args = ModelArgs.from_params(PRESETS["tiny"])
    assert field("general.architecture") == "llama" and field("llama.block_count") == args.n_layers
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (args.n_heads, args.n_kv_heads)
    assert field("llama.rope.freq_base") == args.rope_theta and field("tokenizer.ggml.pre") == "llama-bpe"
    state = torch.load(meta / "consolidated.00.pth", weights_only=True)
    names = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight", "output.weight": "output.weight"}
    names |= {f"blk.{i}.{v}": f"layers.{i}.{k}" for i in range(args.n_layers) for k, v in
              {"attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
               "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
               "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
               "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
               "feed_forward.w2.weight": "ffn_down.weight"}.items()}
    assert set(tensors) == set(names)
    for t in tensors.values():
        want = state[names[t.name]]
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            got = torch.from_numpy(t.read().copy()).view(torch.bfloat16).view(want.shape)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and want.dim() == 1
            got = torch.from_numpy(t.read().copy()).to(want.dtype).view(want.shape)
        assert torch.equal(got, want), t.name

    tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges")
    assert len(tokens) == args.vocab_size and tokens[128000] == "<|begin_of_text|>"
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens[:128000])}, [tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PAT_STR), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    ref = Llama3Tokenizer(meta / "tokenizer.model")
    text = ("The 12345 quick  brown\tfox — naïve café, 東京タワー; 'don't' ...:.:   \n\n  spaces\r\n"
            "x=3.14159 <html> ünïcödé 🙂 αβγ")
    assert bpe.encode(text).ids == ref.encode(text)
    # and `streamer split` of that GGUF gives back Meta's tokenizer.model byte for byte, so Llama 3 runs on tiktoken
    split(tmp_path / "m.gguf", tmp_path / "from_gguf")
    assert (tmp_path / "from_gguf" / "tokenizer.model").read_bytes() == (meta / "tokenizer.model").read_bytes()


def test_bench_spec_smoke(tiny):
    r = subprocess.run([sys.executable, TOOLS / "bench_spec.py", tiny[1], "--drafts", "oracle",
                        "--draft-tokens", "4", "--branches", "1,2", "--tokens", "6", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {" ".join(c.strip() for c in l.split("|")[1:3]).strip(): l for l in r.stdout.splitlines()
            if l.startswith("| ") and not l.startswith("| draft")}
    assert set(rows) == {"none (plain)", "oracle chain", "oracle tree, B=2"}, r.stdout
    assert all(rows[k].rstrip().endswith("| yes |") for k in rows if k != "none (plain)"), r.stdout
    assert "| 4 / 4 |" in rows["oracle chain"]  # all kept: 4 drafted after the first token, then one plain step
    assert "| 3 / 5 |" in rows["oracle tree, B=2"]  # 2 levels of 2 (2 kept), then the one token left (kept)
