"""Where the agents and the benchmarks run (torch only: the GPU check imports it on a bare image)."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when there is a device, else CPU; otherwise ``torch.device(name)``.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
