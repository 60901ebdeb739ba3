"""The weight stream: any ring size, reader count, pass size or set of resident blocks gives the same output."""
import pytest
import torch

from conftest import GQA, assert_logprobs_close, make_split, stream
from streamer import ModelFiles
from streamer.memory import rss_parts
from streamer.runner import _passes
from streamer.stream import WeightStream, file_pieces, map_whole, min_ring_bytes, read_whole

PROMPT = [5, 9, 77, 120, 3, 3, 400, 12, 18, 260, 7, 91, 44]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_split(tmp_path_factory.mktemp("s"), {**GQA, "n_layers": 4})


@pytest.fixture(scope="module")
def reference(folder):
    return stream(folder, PROMPT, 12)[0]


@pytest.mark.parametrize("kw", [
    {"ring_bytes": 1, "readers": 1},  # the smallest ring: every piece wraps around it
    {"ring_bytes": 1, "readers": 4},
    {"ring_bytes": 1 << 30, "readers": 3},  # the whole model fits ahead
    {"max_pass_tokens": 4},  # the prompt is prefilled over four passes
    {"resident": ["block_001.safetensors", "head.safetensors"]},
    {"resident": ["block_000.safetensors", "block_001.safetensors", "block_002.safetensors", "block_003.safetensors",
                  "head.safetensors"]},  # nothing left to stream
    {"resident": ["block_001.safetensors", "head.safetensors"], "mapped": True},  # the files' own pages
    {"resident": ["block_000.safetensors", "block_001.safetensors", "block_002.safetensors", "block_003.safetensors",
                  "head.safetensors"], "mapped": False},  # private copies
], ids=["tiny-ring", "tiny-ring-4-readers", "big-ring", "4-passes", "some-resident", "all-resident",
        "some-resident-mapped", "all-resident-private"])
def test_same_output_whatever_the_streaming(folder, reference, kw):
    steps, _ = stream(folder, PROMPT, 12, runner_kw=kw)
    assert [s.token for s in steps] == [s.token for s in reference]
    assert_logprobs_close([s.logprob for s in steps], [s.logprob for s in reference])


def test_resident_files_mapped_or_private(folder):
    """map_whole gives the file's own mapped pages (no private copy), read_whole a private copy: same bytes."""
    path = folder / "block_000.safetensors"
    mapped, private = map_whole(path), read_whole(path)
    assert torch.equal(mapped, private) and len(mapped) == path.stat().st_size

    def mapping_of(t):
        for line in open("/proc/self/maps"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= t.data_ptr() < hi:
                return line.split(None, 5)[5].strip() if len(line.split(None, 5)) == 6 else ""
    assert mapping_of(mapped) == str(path)
    assert mapping_of(private) != str(path)


def test_ring_is_bounded_and_reads_in_order(folder):
    files = ModelFiles(folder)
    names = files.step_files()
    pieces = [(folder / n, file_pieces(folder / n, files.headers[n])) for n in names]
    s = WeightStream(pieces, 1, readers=2)
    try:
        assert s.size == min_ring_bytes(s.order)
        for _ in range(3):  # three passes: the planner wraps around the sequence and the ring
            for q in s.order:
                t = s.take(q.name)
                assert t.shape == q.shape and t.dtype == q.dtype
                s.release()
        with pytest.raises(Exception, match="expected tensor 'wo' next"):
            s.take("wo")
    finally:
        s.close()


def test_ring_memory_is_taken_up_front_and_given_back_on_close(folder):
    files = ModelFiles(folder)
    pieces = [(folder / n, file_pieces(folder / n, files.headers[n])) for n in files.step_files()]
    before = rss_parts()["private"]
    s = WeightStream(pieces, 64 << 20, readers=2)
    held = rss_parts()["private"] - before  # touched at creation, so the first step pays no page faults
    view = s.take(s.order[0].name)  # a tensor still viewing the ring does not keep its memory alive
    s.close()
    assert held > 60 << 20 and rss_parts()["private"] - before < 8 << 20
    assert view.numel() > 0


def test_passes_split_long_chunks():
    parts = list(_passes([(0, [1, 2, 3, 4, 5]), (1, [6]), (2, [7, 8])], 3))
    assert [[(k, ids, last) for k, (_, ids), last in p] for p in parts] == [
        [(0, [1, 2, 3], False)], [(0, [4, 5], True), (1, [6], True)], [(2, [7, 8], True)]]
