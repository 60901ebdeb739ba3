"""A GGUF file's tokenizer (tokenizer.ggml.*) as the files a split keeps: Llama 3's exact vocabulary as
Meta's tiktoken tokenizer.model; any other as a Hugging Face tokenizer.json built with the `tokenizers`
library the way transformers converts the same vocabulary; and tokenizer_config.json /
generation_config.json with the chat template, BOS/EOS and end-of-turn ids (chat.py reads them).

  - `llama` (SentencePiece BPE): the pieces with byte fallback, merges made from the vocabulary and ordered
    by the merged piece's id (transformers' SentencePieceExtractor), a ▁ prefix on the first word;
  - `gpt2` (byte-level BPE): the file's own merges, with the pre-tokenizer its `tokenizer.ggml.pre` names.
"""
from __future__ import annotations

import base64
import json

from .errors import StreamerError
from .tokenizer import PAT_STR, gpt2_byte_table

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types
LLAMA3_SPECIAL = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128009: "<|eot_id|>"}
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split regex or None for GPT-2's own, digits one by one, whole words kept when in vocab)
PRE_TOKENIZERS = {
    "llama-bpe": (PAT_STR, False, True), "llama3": (PAT_STR, False, True), "tekken": (_TEKKEN, False, True),
    "gpt-2": (None, False, False), "default": (None, False, False), "smollm": (None, True, False),
}


def tokenizer_files(ckpt) -> dict[str, bytes]:
    """{file name: bytes} for the split folder; empty when the GGUF has no tokenizer."""
    kind = ckpt.value("tokenizer.ggml.model")
    if kind is None:
        return {}
    tokens = [t if isinstance(t, str) else t.decode("utf-8", "replace") for t in ckpt.value("tokenizer.ggml.tokens", [])]
    types = list(ckpt.value("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    if not tokens or len(types) != len(tokens):
        raise StreamerError(f"{ckpt.path}: tokenizer.ggml.tokens and token_type are missing or of different lengths")
    ids = {name: ckpt.value(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "eot", "eom")}
    if kind == "gpt2" and is_llama3(tokens, ckpt.value("tokenizer.ggml.pre")):
        files = {"tokenizer.model": tiktoken_file(tokens[:128000])}
    elif kind == "gpt2":
        files = {"tokenizer.json": _byte_level_json(ckpt, tokens, types)}
    elif kind == "llama":
        files = {"tokenizer.json": _sentencepiece_json(ckpt, tokens, types)}
    else:
        raise StreamerError(f"{ckpt.path}: tokenizer model {kind!r} is not supported (SentencePiece 'llama' or "
                            "byte-level BPE 'gpt2')")
    config = {"bos_token": _name(tokens, ids["bos"]), "eos_token": _name(tokens, ids["eos"]),
              "add_bos_token": bool(ckpt.value("tokenizer.ggml.add_bos_token", kind == "llama")),
              "add_eos_token": bool(ckpt.value("tokenizer.ggml.add_eos_token", False))}
    unk = ckpt.value("tokenizer.ggml.unknown_token_id")
    if unk is not None:
        config["unk_token"] = _name(tokens, unk)
    template = ckpt.value("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    stops = sorted({int(i) for k, i in ids.items() if k != "bos" and i is not None})
    files["tokenizer_config.json"] = json.dumps({k: v for k, v in config.items() if v is not None}, indent=2).encode()
    files["generation_config.json"] = json.dumps({"bos_token_id": ids["bos"], "eos_token_id": stops}, indent=2).encode()
    return files


def _name(tokens: list[str], i) -> str | None:
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def is_llama3(tokens: list[str], pre: str | None) -> bool:
    """Llama 3's vocabulary: its pre-tokenizer and special names. Other models reuse the pre-tokenizer with
    their own special tokens (DeepSeek-R1-Distill-Llama), which tiktoken's fixed names would not hold."""
    return (pre in ("llama-bpe", "llama3") and len(tokens) == 128256
            and all(tokens[i] == name for i, name in LLAMA3_SPECIAL.items()))


def tiktoken_file(tokens: list[str]) -> bytes:
    """Meta's tokenizer.model: each token's bytes in base64 and its rank (its id)."""
    inverse = {c: b for b, c in gpt2_byte_table().items()}
    lines = [base64.b64encode(bytes(inverse[c] for c in t)) + b" %d" % i for i, t in enumerate(tokens)]
    return b"\n".join(lines) + b"\n"


def _added(tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens are special, user-defined ones plain added tokens (as transformers converts them)."""
    from tokenizers import AddedToken
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=ty == CONTROL)
                          for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])


def _sentencepiece_json(ckpt, tokens: list[str], types: list[int]) -> bytes:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, i in vocab.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(i, len(l), len(r), vocab[l], vocab[r], l, r) for l, r in splits]
    merges.sort()
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[m[-2:] for m in merges], unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    prefix = bool(ckpt.value("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    _added(tok, tokens, types)
    return tok.to_str(pretty=False).encode()


def _byte_level_json(ckpt, tokens: list[str], types: list[int]) -> bytes:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    pre = ckpt.value("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise StreamerError(f"{ckpt.path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; streamer "
                            f"knows {', '.join(sorted(PRE_TOKENIZERS))}")
    pattern, digits, whole_words = PRE_TOKENIZERS[pre]
    merges = [tuple(m.split(" ", 1)) for m in ckpt.value("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=whole_words))
    if pattern is not None:
        steps = [pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps = [pre_tokenizers.Digits(individual_digits=True)] * digits + [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    _added(tok, tokens, types)
    return tok.to_str(pretty=False).encode()
