"""streamer: run Llama models block by block from disk, in a small fraction of their size in RAM.

The public API is the Engine (engine.py); the rest are the pieces it is made of."""
from .args import ModelArgs
from .engine import Completion, Engine, Piece
from .errors import StreamerError
from .generate import GenStats, SamplingParams
from .kvcache import DiskKVCache, MemoryKVCache
from .layout import ModelFiles
from .runner import Runner
from .tokenizer import ChatFormat, Tokenizer

__all__ = ["Engine", "Completion", "Piece", "GenStats", "ModelArgs", "StreamerError", "SamplingParams", "DiskKVCache",
           "MemoryKVCache", "ModelFiles", "Runner", "ChatFormat", "Tokenizer"]
