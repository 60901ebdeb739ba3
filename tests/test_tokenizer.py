"""Tokenizer against Meta's golden ids (llama_models/llama3/tests, the tutorial, LLAMA3_FACTS.md)."""
import pytest

from streamer.errors import StreamerError
from streamer.tokenizer import ChatFormat, Tokenizer

TUTORIAL = "the answer to the ultimate question of life, the universe, and everything is "


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


def test_golden_ids(tok):
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]


def test_tutorial_prompt(tok):
    ids = tok.encode(TUTORIAL, bos=True)
    assert ids == [128000, 1820, 4320, 311, 279, 17139, 3488, 315, 2324, 11, 279, 15861, 11, 323, 4395, 374, 220]
    assert tok.decode([2983]) == "42"


def test_special_tokens(tok):
    assert tok.n_words == 128256
    assert tok.special["<|eot_id|>"] == 128009 and tok.special["<|start_header_id|>"] == 128006
    assert tok.stop_ids == {128001, 128008, 128009}
    assert tok.encode("<|eot_id|>") != [128009]  # special text in user input stays plain text


def test_chat_format(tok):
    chat = ChatFormat(tok)
    assert chat.encode_message("user", "This is a test sentence.") == [128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]
    dialog = chat.encode_dialog([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert dialog[:4] == [128000, 128006, 9125, 128007] and dialog[-4:] == [128006, 78191, 128007, 271]


def test_not_a_tokenizer(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not base64 and not a rank at all\n")
    with pytest.raises(StreamerError, match="tokenizer.model"):
        Tokenizer(bad)


def test_modules_import_as_modules():
    """`import streamer.generate` gives the module, not a function of the same name re-exported by the package."""
    import importlib
    import types
    for name in ("generate", "batch", "split", "engine", "memcap", "files"):
        assert isinstance(importlib.import_module(f"streamer.{name}"), types.ModuleType)
    import streamer.generate
    import streamer.split
    assert isinstance(streamer.generate, types.ModuleType) and isinstance(streamer.split, types.ModuleType)
