"""A model's own chat template, BOS/EOS and stop tokens, read from the files a split keeps beside its
tokenizer: tokenizer_config.json (or chat_template.jinja) and generation_config.json, as Hugging Face
writes them (and as split writes them for a GGUF's metadata).

Templates are rendered as transformers' apply_chat_template renders them: Jinja2's immutable sandbox with
trim_blocks and lstrip_blocks, the loopcontrols extension, raise_exception, strftime_now and a tojson that
keeps non-ASCII text, with the special tokens (bos_token, eos_token, ...) and add_generation_prompt=True.
The rendered text is then encoded with its special tokens recognised and no BOS added.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Sequence

from .errors import StreamerError

CONFIG_FILES = ("tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StreamerError(f"{path}: cannot read ({e})") from None
    if not isinstance(value, dict):
        raise StreamerError(f"{path}: expected a JSON object")
    return value


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class ChatConfig:
    """What a model folder says about chat: its template, its special tokens, and its end-of-turn ids."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        tok = _read_json(folder / "tokenizer_config.json")
        gen = _read_json(folder / "generation_config.json")
        template = tok.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja = folder / "chat_template.jinja"
        self.template: str | None = jinja.read_text() if jinja.is_file() else template
        self.special = {k: token_text(v) for k, v in tok.items()
                        if k.endswith("_token") and isinstance(token_text(v), str)}
        self.add_bos: bool | None = tok.get("add_bos_token")
        eos = gen.get("eos_token_id")
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.source = folder

    def render(self, messages: Sequence[dict]) -> str:
        if self.template is None:
            raise StreamerError(f"{self.source}: the model has no chat template (tokenizer_config.json's "
                                "chat_template), so --chat cannot format messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise StreamerError(f"message {i}: expected {{'role': str, 'content': str}}")
        import jinja2
        try:
            return _compile(self.template).render(messages=list(messages), add_generation_prompt=True, tools=None,
                                                  documents=None, **self.special)
        except jinja2.TemplateError as e:
            raise StreamerError(f"{self.source}: chat template: {e}") from None


_compiled: dict[str, object] = {}


def _compile(template: str):
    if template not in _compiled:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            _compiled[template] = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise StreamerError(f"chat template, line {e.lineno}: {e.message}") from None
    return _compiled[template]
