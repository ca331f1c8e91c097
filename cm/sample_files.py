"""Sample files: uint8 NHWC ``.npz`` (``arr_0``, OpenAI's evaluator layout) and PNG grids."""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from cm.files import atomic_open, atomic_path


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` NCHW floats to uint8 NHWC (the ``arr_0`` layout of OpenAI's evaluator)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_npz(images: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None) -> Path:
    """Write uint8 NHWC ``images`` as ``arr_0`` (and class indices as ``arr_1``) to ``path``."""
    path = Path(path)
    arrays = {"arr_0": images.numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy()
    with atomic_open(path) as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write uint8 NHWC ``images`` as one PNG grid, upscaled to at least 32 px per image."""
    path = Path(path)
    x = images.permute(0, 3, 1, 2)
    scale = max(1, math.ceil(32 / x.shape[-1]))
    x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    nrow = nrow or math.ceil(math.sqrt(len(x)))
    grid = make_grid(x, nrow=nrow, padding=scale, pad_value=255).permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(grid[..., 0] if images.shape[-1] == 1 else grid).save(tmp, format="PNG")
    return path
