"""Full precision for feature networks (Inception, CLIP) even inside a bf16/fp16 step."""

import contextlib

import torch


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Full precision for the feature networks even inside a bf16/fp16 training step."""
    return torch.autocast(device.type, enabled=False)
