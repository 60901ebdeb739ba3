"""The one exception type the CLI turns into a one-line message."""
from __future__ import annotations


class StreamerError(Exception):
    """A problem with the user's input or files; the message names the culprit.

    `param` names the parameter at fault (`max_new_tokens`); the message then reads "max_new_tokens must be
    ...", and the CLI shows the flag the user typed instead (`--max-new-tokens must be ...`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(f"{param} {message}" if param else message)
        self.param, self.detail = param, message
