"""Differentiable augmentation shared by two inputs: E-LatentLPIPS' ensemble (Kang et al. 2024).

The presets are those of the ``elatentlpips`` release, which uses Karras et al. 2020's ADA
pipeline (App. B) at probability 1: ``b`` = x-flip, 90-degree rotation, integer translation up to
1/8 of the size; ``g`` = isotropic scale, rotation, anisotropic scale, fractional translation;
``c`` = brightness, contrast, saturation; ``o`` = cutout of half the size. Presets combine by
concatenation (``"bg"``, the default, or ``"bgco"``).

All geometric ops compose into one inverse affine map per sample (as ADA does) executed by a
single ``F.grid_sample`` with reflection padding: nearest sampling when only ``b`` is active
(pixel centres map to pixel centres, so flips, rotations and integer shifts are exact) and
bilinear otherwise. ADA's 2x wavelet up/down-sampling around the warp is left out.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cm.errors import UserError

PRESETS = "bgco"

# ADA's ranges (Karras et al. 2020, App. B; elatentlpips ada_aug.py defaults).
XINT_MAX, SCALE_STD, ANISO_STD, XFRAC_STD, CUTOUT_SIZE = 0.125, 0.2, 0.2, 0.125, 0.5


def _affine(a: Tensor, b: Tensor, c: Tensor, d: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """Batched homogeneous 2D matrices ``[[a, b, tx], [c, d, ty], [0, 0, 1]]``, ``[N, 3, 3]``."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], -1).view(-1, 3, 3)


def _scale(sx: Tensor, sy: Tensor) -> Tensor:
    z = torch.zeros_like(sx)
    return _affine(sx, z, z, sy, z, z)


def _rotate(theta: Tensor) -> Tensor:
    z = torch.zeros_like(theta)
    return _affine(theta.cos(), -theta.sin(), theta.sin(), theta.cos(), z, z)


def _translate(tx: Tensor, ty: Tensor) -> Tensor:
    o, z = torch.ones_like(tx), torch.zeros_like(tx)
    return _affine(o, z, z, o, tx, ty)


def geometric(
    preset: str, n: int, height: int, width: int, generator: torch.Generator | None = None
) -> Tensor | None:
    """ADA's inverse map (output pixel -> input pixel, centred pixel units), ``[N, 3, 3]``.

    Karras et al. 2020, App. B (pixel blitting ``b``, general geometric ``g``); None when the
    preset has no geometric letter.
    """
    dev = generator.device if generator is not None else None
    rand = lambda *shape: torch.rand(shape, generator=generator, device=dev)  # noqa: E731
    randn = lambda *shape: torch.randn(shape, generator=generator, device=dev)  # noqa: E731
    G_inv = torch.eye(3, device=dev).expand(n, 3, 3)
    if "b" in preset:
        flip = torch.floor(rand(n) * 2)
        G_inv = G_inv @ _scale(1 / (1 - 2 * flip), torch.ones(n, device=dev))
        k = torch.floor(rand(n) * 4)
        G_inv = G_inv @ _rotate(math.pi / 2 * k)  # rotate2d_inv(-pi/2 k) in ADA's notation
        t = (rand(n, 2) * 2 - 1) * XINT_MAX
        G_inv = G_inv @ _translate(-torch.round(t[:, 0] * width), -torch.round(t[:, 1] * height))
    if "g" in preset:
        s = torch.exp2(randn(n) * SCALE_STD)
        G_inv = G_inv @ _scale(1 / s, 1 / s)
        # ADA applies rotation before and after the anisotropic scale, each with p_rot = 1 at p = 1.
        G_inv = G_inv @ _rotate((rand(n) * 2 - 1) * math.pi)
        s = torch.exp2(randn(n) * ANISO_STD)
        G_inv = G_inv @ _scale(1 / s, s)
        G_inv = G_inv @ _rotate((rand(n) * 2 - 1) * math.pi)
        t = randn(n, 2) * XFRAC_STD
        G_inv = G_inv @ _translate(-t[:, 0] * width, -t[:, 1] * height)
    return G_inv if ("b" in preset or "g" in preset) else None


def warp(x: Tensor, G_inv: Tensor, exact: bool = False) -> Tensor:
    """Resample ``x`` ``[N, C, H, W]`` at ``G_inv @ pixel`` (centred pixel units)."""
    n, _, h, w = x.shape
    # affine_grid works in [-1, 1] with align_corners=False: u = 2 * (centred pixel) / size.
    S = torch.diag(torch.tensor([2 / w, 2 / h, 1.0], device=G_inv.device, dtype=G_inv.dtype))
    theta = (S @ G_inv @ torch.linalg.inv(S))[:, :2].to(x)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    mode = "nearest" if exact else "bilinear"
    return F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)


def color(x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """ADA-style brightness, contrast, saturation (elatentlpips' ``c``), the same draw for both."""
    dev = generator.device if generator is not None else None
    n = x.shape[0]
    u = torch.rand(3, n, 1, 1, 1, generator=generator, device=dev).to(x)
    x, y = x + (u[0] - 0.5), y + (u[0] - 0.5)
    # each input keeps its own mean (as the release): the contrast factor is what is shared
    x = (x - x.mean([1, 2, 3], keepdim=True)) * (u[1] + 0.5) + x.mean([1, 2, 3], keepdim=True)
    y = (y - y.mean([1, 2, 3], keepdim=True)) * (u[1] + 0.5) + y.mean([1, 2, 3], keepdim=True)
    if x.shape[1] > 1:
        x = (x - x.mean(1, keepdim=True)) * (u[2] * 2) + x.mean(1, keepdim=True)
        y = (y - y.mean(1, keepdim=True)) * (u[2] * 2) + y.mean(1, keepdim=True)
    return x, y


def cutout_mask(
    n: int, height: int, width: int, generator: torch.Generator | None = None
) -> Tensor:
    """ADA's cutout: zero a ``size/2 x size/2`` rectangle at a uniform centre, ``[N, 1, H, W]``."""
    dev = generator.device if generator is not None else None
    centre = torch.rand(n, 2, 1, 1, generator=generator, device=dev)
    px = (torch.arange(width, device=dev) + 0.5) / width
    py = (torch.arange(height, device=dev) + 0.5) / height
    keep_x = (px.view(1, 1, -1) - centre[:, 0]).abs() >= CUTOUT_SIZE / 2
    keep_y = (py.view(1, -1, 1) - centre[:, 1]).abs() >= CUTOUT_SIZE / 2
    return (keep_x | keep_y).float()[:, None]


def augment(
    x: Tensor, y: Tensor, preset: str = "bg", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Kang et al. 2024, Sec. 3.2: one random augmentation per sample, applied to both inputs.

    Args:
        x: first batch, ``[N, C, H, W]``.
        y: second batch, same shape.
        preset: letters from ``b``, ``g``, ``c``, ``o`` (see the module docstring); ``""`` is none.
        generator: random source of the parameters (its device is where they are drawn).

    Returns:
        The augmented ``(x, y)``, differentiable with respect to both.
    """
    if unknown := set(preset) - set(PRESETS):
        raise UserError(
            f"Unknown augmentation letter(s) {''.join(sorted(unknown))!r} in {preset!r}: use "
            "letters from 'bgco' (b: flip/rot90/shift, g: geometric, c: color, o: cutout)."
        )
    if x.shape != y.shape or x.ndim != 4:
        raise UserError(
            f"augment needs two [N, C, H, W] batches of one shape, got {x.shape}, {y.shape}."
        )
    n, _, h, w = x.shape
    G_inv = geometric(preset, n, h, w, generator)
    if G_inv is not None:
        xy = warp(torch.cat([x, y]), G_inv.to(x.device).repeat(2, 1, 1), exact="g" not in preset)
        x, y = xy.chunk(2)
    if "c" in preset:
        x, y = color(x, y, generator)
    if "o" in preset:
        mask = cutout_mask(n, h, w, generator).to(x)
        x, y = x * mask, y * mask
    return x, y
