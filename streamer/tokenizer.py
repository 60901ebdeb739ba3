"""Tokenizers: Llama 3's tiktoken BPE and chat format (Meta's tokenizer.model), and llama2.c's small
SentencePiece-style vocabularies (tokenizer.bin, tok512.bin), which the trained stories260K model uses."""
from __future__ import annotations

import base64
import importlib.util
import struct
from pathlib import Path
from typing import Sequence

import tiktoken

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
        self.stop_ids = frozenset({self.eos_id, self.special["<|eom_id|>"], self.special["<|eot_id|>"]})

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Special-token text inside `text` is encoded as plain text, as Meta does by default."""
        ids = self.model.encode(text, allowed_special=set(), disallowed_special=())
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

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
        self.stop_ids = frozenset({self.eos_id})

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


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.bin", "tok512.bin")  # the tiktoken file, or llama2.c's


def find_tokenizer(folder: Path) -> Path | None:
    return next((folder / n for n in TOKENIZER_FILES if (folder / n).is_file()), None)


def load_tokenizer(path: Path):
    """A Tokenizer for Meta's tokenizer.model, a Llama2cTokenizer for llama2.c's .bin files."""
    path = Path(path)
    return Llama2cTokenizer(path) if path.suffix == ".bin" else Tokenizer(path)
