"""Device choice: CUDA when available, else CPU."""
from __future__ import annotations

from typing import Optional, Union

import torch


def default_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``device`` if given, else ``cuda`` when a GPU is visible, else ``cpu``."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
