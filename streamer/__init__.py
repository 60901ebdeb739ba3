"""streamer: run Llama 3 models block by block from disk, in a small fraction of their size in RAM."""
from .args import ModelArgs
from .errors import StreamerError
from .generate import SamplingParams, Step, generate
from .kvcache import DiskKVCache, MemoryKVCache
from .layout import ModelFiles
from .runner import Runner
from .split import split
from .tokenizer import ChatFormat, Tokenizer

__all__ = ["ModelArgs", "StreamerError", "SamplingParams", "Step", "generate", "DiskKVCache", "MemoryKVCache",
           "ModelFiles", "Runner", "split", "ChatFormat", "Tokenizer"]
