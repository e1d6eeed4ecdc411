"""The one error type of checkpoint import, and a helper that keeps foreign messages to one line."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported: unreadable or corrupt, of an unknown layout, with non-finite
    weights, or not matching its config. The message names the file (and key) and the reason, on one line."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """`error` as one short line: its type when it has no message, whitespace collapsed, cut at `limit`."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
