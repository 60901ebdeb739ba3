"""A real trained model: Karpathy's stories260K in Meta's layout (../shared/models) must tell its story."""
import struct

import pytest

from conftest import SHARED, stream
from streamer.split import split

STORIES = SHARED / "models" / "stories260K"
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def decode_llama2c(path, ids):
    """llama2.c's tok512.bin: int32 max length, then per token float32 score, int32 length, bytes."""
    data, vocab, off = path.read_bytes(), [], 4
    while off < len(data):
        _, n = struct.unpack_from("<fi", data, off)
        vocab.append(data[off + 8: off + 8 + n])
        off += 8 + n
    pieces = []
    for prev, t in zip([1] + ids, ids):
        piece = vocab[t]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]  # the first token's leading space is dropped after BOS
        if piece.startswith(b"<0x") and piece.endswith(b">") and len(piece) == 6:
            piece = bytes([int(piece[3:5], 16)])
        pieces.append(piece)
    return b"".join(pieces).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is absent (../shared holds the trained stories260K model)")
    out = tmp_path_factory.mktemp("stories") / "layers"
    split(STORIES, out, progress=False)
    return out


def test_greedy_story(stories):
    steps, _ = stream(stories, [1], 256)
    text = decode_llama2c(STORIES / "tok512.bin", [s.token for s in steps])
    assert text.startswith(STORY), text[:200]
