"""Bare denoisers on disk: ``model.safetensors`` + ``config.json`` (the constructor config).

``config.json`` holds ``{"denoiser": {"class_path": ..., "init_args": ...}}`` as written in the
training YAML, so ``load`` rebuilds the denoiser with jsonargparse and no pickle is ever read.
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def build(config: dict[str, Any]) -> nn.Module:
    """Instantiate a module from a ``{"class_path", "init_args"}`` config (nested ones too)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(nn.Module, "module", fail_untyped=False)
    cfg = parser.parse_object({"module": config})
    return parser.instantiate_classes(cfg).module


def export(denoiser: nn.Module, path: str | Path, config: dict[str, Any]) -> Path:
    """Write ``denoiser``'s weights and constructor ``config`` to the directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}
    save_file(state, str(path / WEIGHTS))
    (path / CONFIG).write_text(json.dumps({"denoiser": config}, indent=2))
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported denoiser from the directory ``path`` (eval mode)."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise FileNotFoundError(
            f"No exported denoiser at '{path}': expected {WEIGHTS} and {CONFIG} there "
            "(write them with `cm export` or cm.io.export)."
        )
    denoiser = build(json.loads((path / CONFIG).read_text())["denoiser"])
    denoiser.load_state_dict(load_file(str(path / WEIGHTS), device=str(map_location)))
    return denoiser.eval()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` NCHW floats to uint8 NHWC (the ``arr_0`` layout of OpenAI's evaluator)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_npz(images: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None) -> Path:
    """Write uint8 NHWC ``images`` as ``arr_0`` (and class indices as ``arr_1``) to ``path``."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images.numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy()
    np.savez(path, **arrays)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write uint8 NHWC ``images`` as one PNG grid, upscaled to at least 32 px per image."""
    import math

    from PIL import Image
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = images.permute(0, 3, 1, 2)
    scale = max(1, math.ceil(32 / x.shape[-1]))
    x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    nrow = nrow or math.ceil(math.sqrt(len(x)))
    grid = make_grid(x, nrow=nrow, padding=scale, pad_value=255).permute(1, 2, 0).numpy()
    Image.fromarray(grid[..., 0] if images.shape[-1] == 1 else grid).save(path)
    return path


def load_checkpoint(
    path: str | Path, ema: bool = True, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the (EMA) denoiser of a ``cm fit`` checkpoint and return it with its hparams.

    Reads with ``weights_only=True``; the denoiser comes from the ``denoiser`` config that the
    CLI stored in the checkpoint's hyperparameters.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint '{path}' does not exist: pass the .ckpt written by cm fit."
        )
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    hparams = dict(ckpt.get("hyper_parameters", {}))
    config = hparams.get("denoiser")
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(
            f"'{path}' holds no denoiser config: checkpoints written by `cm fit` have one; "
            "for a module built in Python use cm.io.export with the constructor config."
        )
    denoiser = build(config)
    state = ckpt["state_dict"]
    prefix = (
        "ema_denoiser."
        if ema and any(k.startswith("ema_denoiser.") for k in state)
        else ("denoiser.")
    )
    denoiser.load_state_dict(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    )
    return denoiser.eval(), hparams


def load_any(path: str | Path, ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A denoiser from a ``.ckpt`` file or an exported directory, with its hparams (may be {})."""
    path = Path(path)
    if path.is_dir():
        return load(path), json.loads((path / CONFIG).read_text())
    return load_checkpoint(path, ema)
