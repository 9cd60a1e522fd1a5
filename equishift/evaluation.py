"""Accuracy and shift-consistency protocols on a dataset: ``evaluate`` and ``python -m equishift evaluate``.

Definitions: shared/notes/metrics.md; the exact protocols are documented in ``PROTOCOLS`` below and in
the README section ``evaluate``. (Work in progress: the API signature is fixed, the body is landing.)
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

__all__ = ["PROTOCOLS", "evaluate", "card_metrics", "add_arguments", "run"]

PROTOCOLS = ("clean", "consistency-a", "consistency-b", "period-orbit", "shifted-accuracy", "zero-pad",
             "crop", "crop-accuracy", "flip-accuracy", "affine-accuracy")


def evaluate(loaded, dataset, protocols: Union[str, Sequence[str]] = "all", *, batch_size: int = 256,
             limit: Optional[int] = None, seed: int = 0, device=None, progress: bool = False,
             ) -> Dict[str, Any]:
    """Run shift protocols on ``dataset`` with a model from ``equishift.zoo.load_model``.

    ``loaded``: a ``LoadedModel`` (its ``.preprocess`` and card say how to prepare images).
    ``dataset``: a sequence / torch Dataset of ``(image, label)`` — ``image`` a PIL image (prepared with
    the model's preprocessing) or a float tensor (C, H, W) already prepared for the model (normalised,
    at the model's input size); ``label`` an int index into ``loaded.classes``. The strings
    ``"fashion-mnist"`` (the 10 000-image test split) or a directory path are also accepted.
    ``protocols``: ``"all"``, one name or a list of names from ``PROTOCOLS``.
    ``limit``: use only the first ``limit`` images; ``seed``: every random shift is a function of
    (seed, protocol, image index), so results do not depend on batch size or on the number of processes.

    Returns a JSON-able dict::

        {"model": spec, "dataset": str, "n_images": N, "seed": S, "device": str,
         "protocols": {name: {"protocol", "metric", "shift_mode", "range", "n_images", "count",
                              "value", "ci95": [lo, hi], "ci_method", "seed", ...}}}

    ``value`` is a proportion in [0, 1] (``count / n_images``); ``ci95`` its 95% Wilson interval.
    ``shifted-accuracy`` also carries ``clean_accuracy``, ``drop`` and ``drop_ci95``.
    For a model card: ``card["metrics"] = card_metrics(result)``.
    """
    raise NotImplementedError("evaluate is landing; the signature above is final")


def card_metrics(result: Dict[str, Any]) -> Dict[str, Any]:
    """The compact form stored in a model card's ``"metrics"``: {protocol: {"value", "ci95", "n_images",
    "seed", "shift_mode", "range"}}."""
    raise NotImplementedError
