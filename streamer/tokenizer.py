"""Tokenizers: Llama 3's tiktoken BPE and chat format (Meta's tokenizer.model), llama2.c's small
SentencePiece-style vocabularies (tokenizer.bin, tok512.bin), which the trained stories260K model uses, and
every other model's tokenizer.json through Hugging Face `tokenizers` (SentencePiece-style and byte-level BPE).
Each carries the folder's ChatConfig (chat.py): its chat template and end-of-turn ids."""
from __future__ import annotations

import base64
import importlib.util
import struct
from pathlib import Path
from typing import Sequence

import tiktoken

from .chat import ChatConfig
from .errors import StreamerError

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL = 256
_NAMED_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
# <|end_of_text|>, <|eom_id|>, <|eot_id|>: where generation stops, also when only ids are given
STOP_IDS = frozenset({128001, 128008, 128009})


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    try:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except OSError as e:
        raise StreamerError(f"{path}: cannot read tokenizer ({e.strerror})") from None
    except ValueError:
        raise StreamerError(f"{path}: line {n} is not 'base64 rank' (not a tiktoken tokenizer.model)") from None
    return ranks


def packaged_tokenizer_path() -> Path | None:
    """The real Llama 3 tokenizer.model shipped in the llama-models package, if installed."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
    return path if path.is_file() else None


class Tokenizer:
    """Meta's Llama 3 tokenizer: 128000 BPE ranks plus 256 special tokens (ids 128000-128255)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        ranks = load_bpe_ranks(self.path)
        names = _NAMED_SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL - len(_NAMED_SPECIAL))]
        self.special = {name: len(ranks) + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(self.path.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special)
        self.n_words = len(ranks) + len(names)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.chat = ChatConfig(self.path.parent)
        self.stop_ids = frozenset({self.eos_id, self.special["<|eom_id|>"], self.special["<|eot_id|>"]}) | self.chat.eos_ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Special-token text inside `text` is encoded as plain text, as Meta does by default."""
        ids = self.model.encode(text, allowed_special=set(), disallowed_special=())
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_special(self, text: str) -> list[int]:
        """Text with special tokens written in it (a rendered chat template), those recognised; no BOS added."""
        return self.model.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.model.decode_bytes(list(ids))


class ChatFormat:
    """Llama 3 chat prompts: BOS, each message as header + content + <|eot_id|>, then an open assistant header."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def encode_header(self, role: str) -> list[int]:
        return [self.tok.special["<|start_header_id|>"], *self.tok.encode(role),
                self.tok.special["<|end_header_id|>"], *self.tok.encode("\n\n")]

    def encode_message(self, role: str, content: str) -> list[int]:
        return self.encode_header(role) + self.tok.encode(content.strip()) + [self.tok.special["<|eot_id|>"]]

    def encode_dialog(self, messages: Sequence[dict]) -> list[int]:
        ids = [self.tok.bos_id]
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise StreamerError(f"message {i}: expected {{'role': str, 'content': str}}")
            ids += self.encode_message(m["role"], m["content"])
        return ids + self.encode_header("assistant")


class Llama2cTokenizer:
    """llama2.c's tokenizer.bin format: int32 max piece length, then per piece a float32 merge score, an int32
    length and the bytes. Ids 0, 1, 2 are <unk>, <s> (BOS), </s> (EOS); ids 3..258 are the bytes <0x00>..<0xFF>.
    Encoding follows llama2.c's run.c: a dummy prefix space, one piece per UTF-8 character (its bytes where the
    character has none), then repeatedly the best-scoring merge of two neighbours."""

    bos_id, eos_id = 1, 2

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
            self.pieces, self.scores, off = [], [], 4
            while off < len(data):
                score, n = struct.unpack_from("<fi", data, off)
                self.pieces.append(data[off + 8:off + 8 + n])
                self.scores.append(score)
                off += 8 + n
        except OSError as e:
            raise StreamerError(f"{path}: cannot read tokenizer ({e.strerror})") from None
        except struct.error:
            raise StreamerError(f"{path}: truncated (not a llama2.c tokenizer.bin)") from None
        if len(self.pieces) < 259 or self.pieces[3] != b"<0x00>":
            raise StreamerError(f"{path}: not a llama2.c tokenizer.bin (no byte pieces at ids 3..258)")
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.n_words = len(self.pieces)
        self.chat = ChatConfig(self.path.parent)
        self.stop_ids = frozenset({self.eos_id}) | self.chat.eos_ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = []
        for ch in (" " + text) if text else "":
            b = ch.encode()
            ids += [self.ids[b]] if b in self.ids else [x + 3 for x in b]
        while True:
            merges = [(self.scores[m], -k, k, m) for k in range(len(ids) - 1)
                      if (m := self.ids.get(self.pieces[ids[k]] + self.pieces[ids[k + 1]])) is not None]
            if not merges:
                break
            *_, k, m = max(merges)  # the best score; the leftmost pair on a tie, as run.c
            ids[k:k + 2] = [m]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(bytes([t - 3]) if 3 <= t < 259 else self.pieces[t] for t in ids if t not in (0, 1, 2))

    def decode(self, ids: Sequence[int]) -> str:
        """The text; the dummy prefix space that encoding adds is dropped, as SentencePiece does."""
        text = self.decode_bytes(ids).decode("utf-8", "replace")
        return text[1:] if text.startswith(" ") else text


def gpt2_byte_table() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which byte-level BPE vocabularies are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}


class HFTokenizer:
    """A Hugging Face tokenizer.json, run by the `tokenizers` library as transformers runs it. BOS, EOS and
    whether prompts start with BOS come from the folder's tokenizer_config.json (else from what the
    tokenizer's own post-processor adds); stop ids are the EOS and generation_config.json's eos_token_id."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as Fast
        self.path = Path(path)
        try:
            self.model = Fast.from_file(str(self.path))
        except Exception as e:  # tokenizers raises plain Exceptions for bad JSON or unknown components
            raise StreamerError(f"{self.path}: not a tokenizer.json the `tokenizers` library reads ({e})") from None
        self.chat = ChatConfig(self.path.parent)
        self.n_words = self.model.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._id("bos_token")
        self.eos_id = self._id("eos_token")
        add_bos = self.chat.add_bos
        if add_bos is None:
            add_bos = self.bos_id is not None and self.model.encode("a").ids[:1] == [self.bos_id]
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.stop_ids = frozenset({self.eos_id} - {None}) | self.chat.eos_ids
        self._bytes: list[bytes] | None = None

    def _id(self, name: str) -> int | None:
        text = self.chat.special.get(name)
        return None if text is None else self.model.token_to_id(text)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """As transformers encodes: special tokens written in the text are recognised. BOS starts a prompt
        (bos=True) when the model adds one."""
        ids = self.model.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * (bos and self.add_bos) + ids + [self.eos_id] * (eos and self.eos_id is not None)

    def encode_special(self, text: str) -> list[int]:
        return self.model.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Each token's own bytes (so text streams token by token, split UTF-8 and all): byte-level tokens
        through GPT-2's byte map, SentencePiece pieces with ▁ as a space and <0xNN> as that byte."""
        if self._bytes is None:
            self._bytes = self._byte_table()
        return b"".join(self._bytes[t] if 0 <= t < len(self._bytes) else b"" for t in ids)

    def _byte_table(self) -> list[bytes]:
        byte_level = b"ByteLevel" in (self.model.decoder.__getstate__() if self.model.decoder else b"")
        inverse = {c: b for b, c in gpt2_byte_table().items()}
        added = {i: t.content for i, t in self.model.get_added_tokens_decoder().items()}
        table = [b""] * self.n_words
        for token, i in self.model.get_vocab(with_added_tokens=True).items():
            if i in added or i >= len(table):
                table[i] = added.get(i, token).encode()
            elif byte_level:
                table[i] = bytes(inverse[c] for c in token) if all(c in inverse for c in token) else token.encode()
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                table[i] = bytes([int(token[3:5], 16)])
            else:
                table[i] = token.replace("\u2581", " ").encode()
        return table


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer.bin", "tok512.bin")  # tiktoken, HF's, llama2.c's


def find_tokenizer(folder: Path) -> Path | None:
    return next((folder / n for n in TOKENIZER_FILES if (folder / n).is_file()), None)


def load_tokenizer(path: Path):
    """A Tokenizer for Meta's tokenizer.model, an HFTokenizer for tokenizer.json, a Llama2cTokenizer for
    llama2.c's .bin files."""
    path = Path(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    return Llama2cTokenizer(path) if path.suffix == ".bin" else Tokenizer(path)


def encode_chat(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Chat messages as prompt ids: the model's own chat template when its folder has one, else Llama 3's
    format for Meta's tokenizer."""
    if tokenizer.chat.template is None and isinstance(tokenizer, Tokenizer):
        return ChatFormat(tokenizer).encode_dialog(messages)
    return tokenizer.encode_special(tokenizer.chat.render(messages))  # render names a missing template
