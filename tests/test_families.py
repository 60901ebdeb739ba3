"""Other Llama-architecture checkpoints: their own tokenizers (SentencePiece and byte-level BPE, from HF
folders and from GGUF metadata), chat templates and stop tokens, and the family shapes (Mistral, a head
width other than dim / n_heads, linear RoPE scaling), each against transformers.

Real tokenizer files come from packages: Mistral 7B's SentencePiece tokenizer.model (Apache-2.0) from
`mistral-common`, and Llama 3's byte-level BPE from `llama-models`, converted to tokenizer.json by
transformers' own converters, so the reference for every encoding is transformers' tokenizer."""
import importlib.resources
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import GQA, assert_logprobs_close
from streamer import Engine
from streamer.split import split
from streamer.synthetic import write_checkpoint
from streamer.tokenizer import PAT_STR, HFTokenizer, Tokenizer, load_tokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import make_gguf  # noqa: E402

TEXTS = ["Hello world", "  leading spaces and  double  spaces", "digits 1234567 and 3.14159, -42",
         "naïve café 東京タワー 🙂 αβγ ünïcödé", "tabs\tand\nnewlines\r\n\n  end  ", "<s> written specials </s> [INST]",
         "x=3; y = x**2 // 7  # code", "'don't' 'THEY'RE' ...!?", " ", "a" * 40]
# TinyLlama-1.1B-Chat's template (Zephyr style), as its tokenizer_config.json holds it
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
          "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime, café."}]


def mistral_spm() -> Path:
    pytest.importorskip("sentencepiece")
    try:
        return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    except ModuleNotFoundError:
        pytest.skip("mistral-common is not installed: it ships Mistral's SentencePiece tokenizer.model")


def hf_folder(root: Path, params: dict, config_edit: dict | None = None) -> Path:
    """A random-weight HF Llama folder saved by transformers, its config then edited."""
    from conftest import load_meta_state, params_of
    from references import hf_model
    meta = write_checkpoint(root / "meta", params, torch.float32, seed=2, tokenizer=False)
    hf_model(params_of(meta), load_meta_state(meta)).save_pretrained(root / "hf")
    cfg_path = root / "hf" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **(config_edit or {})}))
    return root / "hf"


def spm_hf_tokenizer(folder: Path, chat_template: str | None = ZEPHYR):
    """Mistral's tokenizer.model converted by transformers and saved into `folder` (tokenizer.json and
    tokenizer_config.json), with a chat template and generation_config's end-of-turn ids."""
    from transformers import LlamaTokenizer
    src = folder.parent / "spm_src"
    src.mkdir(exist_ok=True)
    (src / "tokenizer.model").write_bytes(mistral_spm().read_bytes())
    tok = LlamaTokenizer.from_pretrained(src)
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    gen = folder / "generation_config.json"
    gen.write_text(json.dumps({**(json.loads(gen.read_text()) if gen.is_file() else {}), "eos_token_id": [2, 7]}))
    return tok


def spm_gguf_vocab(model: Path, chat_template: str | None = None):
    """The vocabulary metadata llama.cpp's converter writes for a SentencePiece model (pieces, scores, types)."""
    import gguf
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model))
    kinds = [(sp.IsUnknown, gguf.TokenType.UNKNOWN), (sp.IsControl, gguf.TokenType.CONTROL),
             (sp.IsUnused, gguf.TokenType.UNUSED), (sp.IsByte, gguf.TokenType.BYTE)]

    def add(w):
        n = sp.GetPieceSize()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([sp.IdToPiece(i) for i in range(n)])
        w.add_token_scores([sp.GetScore(i) for i in range(n)])
        w.add_token_types([next((t for f, t in kinds if f(i)), gguf.TokenType.NORMAL) for i in range(n)])
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_unk_token_id(sp.unk_id())
        w.add_add_bos_token(True)
        if chat_template:
            w.add_chat_template(chat_template)
    return add


def llama3_fast(names: dict[int, str] | None = None):
    """Llama 3's tokenizer.json as transformers converts Meta's tokenizer.model, optionally with its special
    tokens renamed as DeepSeek-R1-Distill-Llama's are."""
    from streamer.tokenizer import NUM_SPECIAL, _NAMED_SPECIAL, packaged_tokenizer_path
    from transformers.convert_slow_tokenizer import TikTokenConverter
    path = packaged_tokenizer_path()
    if path is None:
        pytest.skip("llama-models is not installed: it ships Llama 3's tokenizer.model")
    specials = _NAMED_SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL - len(_NAMED_SPECIAL))]
    specials = [(names or {}).get(128000 + i, s) for i, s in enumerate(specials)]
    fast = TikTokenConverter(vocab_file=str(path), pattern=PAT_STR).converted()
    fast.add_special_tokens(specials)
    return fast, specials


def hf_encode(folder: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)(text).input_ids


# --- SentencePiece ------------------------------------------------------------------------------------------

def test_sentencepiece_hf_folder_runs_with_its_own_tokenizer_template_and_stops(tmp_path):
    """A Llama folder with Mistral's SentencePiece tokenizer.json: encodings, chat prompt and stop ids as
    transformers gives them, and streamed logprobs of that prompt as transformers' model computes them."""
    folder = hf_folder(tmp_path, {**GQA, "vocab_size": 32000})
    hf_tok = spm_hf_tokenizer(folder)
    split(folder, tmp_path / "layers")
    assert (tmp_path / "layers" / "tokenizer.json").is_file()
    with Engine(tmp_path / "layers", dtype="float32", max_seq_len=128, compile=False) as engine:
        tok = engine.tokenizer
        assert isinstance(tok, HFTokenizer)
        for text in TEXTS:
            assert engine.prompt_ids(text) == hf_tok(text).input_ids, text
            assert tok.decode(hf_tok(text).input_ids) == hf_tok.decode(hf_tok(text).input_ids)
        ids = engine.prompt_ids(messages=MESSAGES)
        assert ids == list(hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
        assert engine.stop_ids == {2, 7}  # eos_token </s>, and generation_config's list
    assert_greedy_matches_transformers(tmp_path / "layers", folder, messages=MESSAGES)


def assert_greedy_matches_transformers(layers: Path, folder: Path, prompt: str | None = None, messages=None, n: int = 4):
    """The split's own tokenizer encodes the prompt as transformers' does, and greedy tokens, their logprobs and
    the streamed text equal transformers' generate on the HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(folder)
    with Engine(layers, dtype="float32", max_seq_len=128, compile=False) as engine:
        ids = engine.prompt_ids(prompt, messages=messages)
        want = (hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
                if messages else hf_tok(prompt).input_ids)
        assert ids == list(want)
        steps = list(engine.stream(prompt_ids=ids, max_new_tokens=n, logprobs=1, stop=[]))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, min_new_tokens=n)
    ref = out.sequences[0, len(ids):].tolist()
    assert [s.token for s in steps] == ref
    assert_logprobs_close([s.logprob for s in steps],
                          [torch.log_softmax(sc[0].float(), -1)[t] for sc, t in zip(out.scores, ref)])
    assert "".join(s.text for s in steps) == hf_tok.decode(ref)


def test_sentencepiece_gguf_vocabulary_encodes_as_transformers(tmp_path):
    """A GGUF's SentencePiece vocabulary (pieces, scores, types, as llama.cpp writes them) becomes a
    tokenizer.json that encodes and decodes as transformers' conversion of the same tokenizer.model, and its
    chat template, BOS and EOS come along."""
    hf_tok = spm_hf_tokenizer(tmp_path / "hf_tok")
    meta = write_checkpoint(tmp_path / "meta", {**GQA, "vocab_size": 32000}, torch.float32, seed=2, tokenizer=False)
    make_gguf.write(meta, tmp_path / "m.gguf", "F32", vocab=spm_gguf_vocab(mistral_spm(), ZEPHYR), quiet=True)
    split(tmp_path / "m.gguf", tmp_path / "layers")
    tok = load_tokenizer(tmp_path / "layers" / "tokenizer.json")
    for text in TEXTS:
        want = hf_tok(text).input_ids
        assert tok.encode(text) == want, text
        assert tok.decode(want) == hf_tok.decode(want)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids) == (1, 2, True, {2})
    assert tok.encode("Hi", bos=True) == [1] + hf_tok("Hi").input_ids
    assert tok.encode_special(tok.chat.render(MESSAGES)) == list(
        hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))


# --- byte-level BPE -----------------------------------------------------------------------------------------

def test_llama3_vocabulary_from_hf_is_exactly_metas_tiktoken(tmp_path, tokenizer_path):
    """Llama 3's tokenizer.json (an HF folder) splits to Meta's tokenizer.model byte for byte, so Llama 3 keeps
    running on tiktoken (test_tools.py checks the same for its GGUF vocabulary)."""
    fast, _ = llama3_fast()
    folder = hf_folder(tmp_path, {**GQA, "vocab_size": 128256})
    fast.save(str(folder / "tokenizer.json"))
    split(folder, tmp_path / "from_hf")
    assert (tmp_path / "from_hf" / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    assert not (tmp_path / "from_hf" / "tokenizer.json").exists()
    assert isinstance(load_tokenizer(tmp_path / "from_hf" / "tokenizer.model"), Tokenizer)


DEEPSEEK = {128000: "<｜begin▁of▁sentence｜>", 128001: "<｜end▁of▁sentence｜>", 128011: "<｜User｜>", 128012: "<｜Assistant｜>"}


def test_other_byte_level_bpe_runs_through_tokenizers(tmp_path):
    """Llama 3's BPE with other special tokens (as DeepSeek-R1-Distill-Llama has) is not Meta's tokenizer:
    its tokenizer.json is kept and run by `tokenizers`. A GGUF byte-level vocabulary (tokens, merges,
    llama-bpe) is rebuilt into a tokenizer.json that encodes as transformers does, special tokens included;
    that one is cut to Llama 3's first 16000 tokens and the merges among them, since the gguf package takes
    ~13 s to read a 128K vocabulary's metadata."""
    import gguf
    from tokenizers import Tokenizer as Fast
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    fast, _ = llama3_fast(DEEPSEEK)
    bos = DEEPSEEK[128000]
    fast.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 128000)])  # BOS, as theirs
    texts = TEXTS + [DEEPSEEK[128011] + "hi" + DEEPSEEK[128012]]

    def hf_pair(folder: Path, tokenizer) -> tuple:
        folder.mkdir(parents=True)
        tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": bos, "eos_token": DEEPSEEK[128001], "tokenizer_class": "PreTrainedTokenizerFast"}))
        return PreTrainedTokenizerFast.from_pretrained(folder), HFTokenizer(folder / "tokenizer.json")

    folder = hf_folder(tmp_path / "model", {**GQA, "vocab_size": 128256, "n_layers": 1})  # random weights
    hf_tok, tok = hf_pair(folder / "tok", fast)
    for text in texts:
        assert tok.encode(text, bos=True) == hf_tok(text).input_ids, text
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((folder / "tok" / name).read_bytes())
    split(folder, tmp_path / "model_layers")
    assert_greedy_matches_transformers(tmp_path / "model_layers", folder, texts[2])

    n = 16000  # the cut vocabulary: tokens below n, the merges among them, then the 256 special tokens
    spec = json.loads(fast.to_str())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < n}
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if all(p in vocab for p in (*m, "".join(m)))]
    spec["model"]["vocab"] = vocab
    for a in spec["added_tokens"]:
        a["id"] -= 128000 - n
    spec["post_processor"]["special_tokens"][bos]["ids"] = [n]
    hf_cut, _ = hf_pair(tmp_path / "cut", Fast.from_str(json.dumps(spec)))
    tokens = sorted(vocab, key=vocab.get) + [a["content"] for a in spec["added_tokens"]]

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL if i >= n else gguf.TokenType.NORMAL for i in range(len(tokens))])
        w.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
        w.add_bos_token_id(n)
        w.add_eos_token_id(n + 1)
        w.add_add_bos_token(True)
    meta = write_checkpoint(tmp_path / "meta", {**GQA, "vocab_size": len(tokens), "n_layers": 1}, torch.float32,
                            tokenizer=False)
    make_gguf.write(meta, tmp_path / "m.gguf", "F32", vocab=add, quiet=True)
    split(tmp_path / "m.gguf", tmp_path / "layers")
    rebuilt = load_tokenizer(tmp_path / "layers" / "tokenizer.json")
    for text in texts:
        want = hf_cut(text).input_ids
        assert rebuilt.encode(text, bos=True) == want, text
        assert rebuilt.decode(want) == hf_cut.decode(want)
        assert rebuilt.decode_bytes(want[1:]).decode() == hf_cut.decode(want[1:])
    assert rebuilt.stop_ids == {n + 1}


# --- family shapes ------------------------------------------------------------------------------------------

FAMILIES = {
    # Mistral 7B v0.1-like: MistralForCausalLM, sliding window longer than the context run
    "mistral": ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 64,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}, "MistralForCausalLM"),
    # Mistral-Nemo-like head width (head_dim 32 at hidden 64 with 8 heads, not 64 / 8)
    "head_dim": ({"head_dim": 32}, "LlamaForCausalLM"),
    # CodeLlama-style linear RoPE scaling
    "linear_rope": ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}, "LlamaForCausalLM"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_logprobs_match_transformers(tmp_path, family):
    import transformers
    edit, cls = FAMILIES[family]
    folder = hf_folder(tmp_path, GQA, edit)
    model = getattr(transformers, cls).from_pretrained(folder, dtype=torch.float32) if family != "head_dim" else None
    if family == "head_dim":  # a new shape: random weights of that shape, saved and loaded by transformers
        cfg = transformers.AutoConfig.from_pretrained(folder)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).float()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
        model.save_pretrained(folder)
    split(folder, tmp_path / "layers")
    prompt = [1, 17, 42, 99, 5, 250, 3, 8, 120, 64, 7]
    with Engine(tmp_path / "layers", dtype="float32", compile=False) as engine:
        if family == "mistral":
            assert engine.max_seq_len == 64  # the context stops at the window, where full attention is exact
        steps = list(engine.stream(prompt_ids=prompt, max_new_tokens=8, logprobs=1))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, min_new_tokens=8)
    ref = out.sequences[0, len(prompt):].tolist()
    assert [s.token for s in steps] == ref
    assert_logprobs_close([s.logprob for s in steps], [torch.log_softmax(sc[0].float(), -1)[t] for sc, t in zip(out.scores, ref)])
