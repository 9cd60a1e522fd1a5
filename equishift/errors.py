"""The error types equishift raises for bad user input. Each message says what was wrong and what to do.

All derive from ``EquishiftError`` (and from ValueError, so generic handlers still catch them); the
dashboard shows any of them as an ``st.error`` and keeps the rest of the page working."""
from __future__ import annotations

__all__ = ["EquishiftError", "ImageError", "CheckpointError", "ModelSpecError", "DataError", "LimitError",
           "shorten", "MAX_MESSAGE_CHARS"]

MAX_MESSAGE_CHARS = 2000   # a message longer than this lost its point: something echoed user input


def shorten(text: object, limit: int = 80) -> str:
    """``text`` (str() of it) cut to at most ``limit`` characters, keeping both ends: a path keeps its file
    name, a spec its scheme. What messages quote of user input (a spec, a path, a file name) goes through
    this, so a 1 MB spec is never echoed back."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(limit - 1, 2)
    head = keep - keep // 3
    return text[:head] + "…" + text[len(text) - (keep - head):]


class EquishiftError(ValueError):
    """Base class: bad input from the user, explained in the message.

    A message over ``MAX_MESSAGE_CHARS`` is cut in the middle: a last guard for a raise site that quoted
    user input without ``shorten``."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str) and len(args[0]) > MAX_MESSAGE_CHARS:
            args = (shorten(args[0], MAX_MESSAGE_CHARS),)
        super().__init__(*args)


class ImageError(EquishiftError):
    """An image could not be read or is not supported (empty, corrupt, wrong format, over the size limit)."""


class CheckpointError(EquishiftError):
    """A weights file is unreadable, unsafe (pickled code), too large, or does not fit the architecture."""


class ModelSpecError(EquishiftError):
    """A model spec (``zoo:``, ``timm:``, ``anchored:``) is malformed, unknown, or cannot be satisfied offline."""


class DataError(EquishiftError):
    """A dataset is missing or corrupt (e.g. Fashion-MNIST IDX files)."""


class LimitError(EquishiftError):
    """A request exceeds a resource limit (shift grid size, memory budget); the message names the limit."""
