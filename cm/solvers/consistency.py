"""Consistency-model samplers (Song et al. 2023, Alg. 1)."""

from collections.abc import Callable

import torch
from torch import Tensor

from cm.protocols import Denoiser


def onestep(denoiser: Denoiser, x: Tensor, sigmas: Tensor, labels: Tensor | None = None) -> Tensor:
    """Song et al. 2023, Alg. 1 with one step: ``x0 = f(x_T, T)`` with ``T = sigmas[0]`` (1 NFE)."""
    return denoiser(x, x.new_full((x.shape[0],), float(sigmas[0])), labels)


def multistep(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    sigma_min: float = 0.002,
    noise: Callable[[Tensor], Tensor] = torch.randn_like,
) -> Tensor:
    """Song et al. 2023, Alg. 1: denoise, re-noise ``x = x0 + z sqrt(t^2 - sigma_min^2)``, repeat.

    Args:
        denoiser: a consistency function ``f(x, sigma, labels)``.
        x: the initial noise already scaled to ``sigmas[0]``, ``[N, C, H, W]``.
        sigmas: decreasing times ``T = t_0 > t_1 > ...``; zeros (a trailing 0) are skipped.
        labels: optional one-hot labels ``[N, L]``.
        sigma_min: the consistency model's boundary ``epsilon``.
        noise: draws ``z`` shaped like its argument (pass a per-seed generator for determinism).
    """
    x0 = onestep(denoiser, x, sigmas, labels)
    for t in sigmas[1:].tolist():
        if t <= sigma_min:
            continue
        x = x0 + noise(x0) * (t**2 - sigma_min**2) ** 0.5
        x0 = denoiser(x, x.new_full((x.shape[0],), t), labels)
    return x0
