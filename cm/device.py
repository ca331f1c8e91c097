"""The ``--device`` of every command: ``auto`` is CUDA when available, else the CPU."""

import torch


def resolve_device(name: str) -> torch.device:
    """The ``--device`` of the CLIs: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
