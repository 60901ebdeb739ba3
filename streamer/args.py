"""ModelArgs: the model's fixed shape, read from Meta's params.json, with derived sizes computed once."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StreamerError

DEFAULT_MAX_SEQ_LEN = 8192  # Llama 3's trained context


@dataclass(frozen=True)
class ModelArgs:
    dim: int  # width of the residual stream (4096 for 8B)
    n_layers: int  # Transformer blocks
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention); n_heads when absent
    vocab_size: int
    multiple_of: int = 256  # FFN hidden size is rounded up to this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1+ frequency scaling (apply_scaling)
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN  # trained context; the KV cache default
    # Llama 3.1 scaling constants; Meta's code hard-codes these (factor 8), HF configs may say 32 for 3.2.
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    # Other Llama-architecture families (absent from Meta's params.json): a head width other than dim / n_heads
    # (Mistral Nemo's 128 at dim 5120), and linear RoPE scaling (positions divided by the factor: CodeLlama-style
    # configs with rope_scaling {"type": "linear"}).
    head_dim: int | None = None
    rope_linear_factor: float | None = None
    # derived, never read from params.json
    ffn_dim: int = field(init=False)

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise StreamerError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise StreamerError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim <= 0:
            raise StreamerError(f"head_dim must be a positive integer, got {self.head_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise StreamerError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise StreamerError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rope_linear_factor is not None and not self.rope_linear_factor > 0:
            raise StreamerError(f"rope_linear_factor must be positive, got {self.rope_linear_factor}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise StreamerError(f"norm_eps and rope_theta must be positive, got {self.norm_eps}, {self.rope_theta}")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise StreamerError(f"ffn_dim_multiplier must be positive, got {self.ffn_dim_multiplier}")
        object.__setattr__(self, "ffn_dim", ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier))

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_params(cls, params: dict, source: str = "params.json", **overrides) -> "ModelArgs":
        """Read Meta's params.json dict; unknown keys are warned about, never fatal."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        values = {}
        for key, value in params.items():
            if key in known:
                values[key] = value
            else:
                warnings.warn(f"{source}: ignoring unknown key {key!r}", stacklevel=2)
        if values.get("n_kv_heads") is None:
            values["n_kv_heads"] = values.get("n_heads")
        values.update(overrides)
        missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if values.get(k) is None]
        if missing:
            raise StreamerError(f"{source}: missing {', '.join(missing)}")
        if values.get("vocab_size", 0) == -1:
            raise StreamerError(f"{source}: vocab_size is -1 (set it to the tokenizer's size, e.g. 128256)")
        try:
            return cls(**values)
        except TypeError as e:
            raise StreamerError(f"{source}: {e}") from None
        except StreamerError as e:
            raise StreamerError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: Path, **overrides) -> "ModelArgs":
        path = Path(path)
        if not path.is_file():
            raise StreamerError(f"{path}: not found (a Meta checkpoint folder holds params.json)")
        try:
            params = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StreamerError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(params, dict):
            raise StreamerError(f"{path}: expected a JSON object")
        return cls.from_params(params, source=str(path), **overrides)

    def to_dict(self) -> dict:
        """The init fields, as params.json holds them; head_dim only when it is not dim / n_heads, and
        rope_linear_factor only when set, so Meta-shaped models keep Meta's keys."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if d["head_dim"] * self.n_heads == self.dim:
            del d["head_dim"]
        if d["rope_linear_factor"] is None:
            del d["rope_linear_factor"]
        return d


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward sizing: 14336 for Llama 3 8B."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
