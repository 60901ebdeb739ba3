"""The one exception type the CLI turns into a one-line message."""


class StreamerError(Exception):
    """A problem with the user's input or files; the message names the culprit."""
