"""The error types equishift raises for bad user input. Each message says what was wrong and what to do.

All derive from ``EquishiftError`` (and from ValueError, so generic handlers still catch them); the
dashboard shows any of them as an ``st.error`` and keeps the rest of the page working."""
from __future__ import annotations

__all__ = ["EquishiftError", "ImageError", "CheckpointError", "ModelSpecError", "DataError", "LimitError"]


class EquishiftError(ValueError):
    """Base class: bad input from the user, explained in the message."""


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
