"""DDIM and ancestral DDPM sampling written in EDM coordinates ``x = y + sigma n``.

A VP state ``x_vp = sqrt(abar) x`` moves to ``x_vp' = sqrt(abar') x'``; dividing by
``sqrt(abar')`` turns DDIM's update (Song et al. 2021a, Eq. 12) into
``x' = x0 + sigma_down (x - x0) / sigma + sigma_up z`` with
``sigma_up = eta sigma' sqrt(1 - sigma'^2 / sigma^2)`` and ``sigma_down = sqrt(sigma'^2 -
sigma_up^2)``, k-diffusion's ancestral step. ``eta = 0`` is Euler on the PF-ODE, ``eta = 1`` is
DDPM's ancestral step with the posterior variance ``beta~`` (Ho et al. 2020, Eq. 6-7).
"""

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from cm.protocols import Denoiser
from cm.solvers.rk import _sigma, euler_step

Noise = Callable[[Tensor], Tensor]


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of DDIM's step with ``eta`` (Song et al. 2021a, Eq. 16)."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(1 - sigma_next**2 / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def posterior_variance(
    sigma: float,
    sigma_next: float,
    v: Tensor | None = None,
    fixed: Literal["small", "large"] = "small",
) -> Tensor | float:
    """Variance of ``p(x' | x)`` in EDM coordinates (Nichol & Dhariwal 2021, Eq. 15).

    ``beta = 1 - abar / abar'`` and ``beta~ = beta (1 - abar') / (1 - abar)`` of the step
    ``sigma -> sigma_next``, scaled by ``1 / abar' = 1 + sigma_next^2``. A learned ``v`` in [0, 1]
    interpolates their logs; otherwise ``fixed`` picks ``beta~`` ("small") or ``beta`` ("large").
    """
    beta = (sigma**2 - sigma_next**2) / (1 + sigma**2)
    beta_tilde = beta * sigma_next**2 * (1 + sigma**2) / ((1 + sigma_next**2) * sigma**2)
    scale = 1 + sigma_next**2
    if v is not None:
        return torch.exp(v * math.log(beta) + (1 - v) * math.log(beta_tilde)) * scale
    return (beta_tilde if fixed == "small" else beta) * scale


def clip_x0(denoiser: Denoiser) -> Denoiser:
    """The denoiser with ``x0_hat`` clamped to the data range [-1, 1] (Ho et al. 2020's sampler).

    Stepping with the clamped ``x0_hat`` is improved-diffusion's ``clip_denoised=True``: its
    ``eps`` is recomputed from the clipped ``x0``, which is what the EDM-form step does.
    """
    return lambda x, sigma, labels=None: denoiser(x, sigma, labels).clamp(-1, 1)


def ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    eta: float = 0.0,
    noise: Noise | None = None,
    clip_denoised: bool = False,
) -> Tensor:
    """Song et al. 2021a, Eq. 12 in EDM form; ``eta = 0`` is deterministic (Euler), 1 is DDPM.

    ``clip_denoised`` clamps ``x0_hat`` to [-1, 1] before each step (off, as DDIM's code).
    """
    noise = noise or torch.randn_like
    denoiser = clip_x0(denoiser) if clip_denoised else denoiser
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        if eta == 0:
            x = euler_step(denoiser, x, sigma, sigma_next, labels)
            continue
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
        x = euler_step(denoiser, x, sigma, sigma_down, labels)
        if sigma_up > 0:
            x = x + sigma_up * noise(x)
    return x


def ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    fixed: Literal["small", "large"] = "large",
    noise: Noise | None = None,
    clip_denoised: bool = True,
) -> Tensor:
    """Ho et al. 2020, Alg. 2 (and respaced subsequences): ancestral sampling in EDM form.

    The mean is the posterior mean ``x0 + (sigma'/sigma)^2 (x - x0)`` (Eq. 7); the variance is the
    model's learned one for ``IDDPMPrecond`` (Nichol & Dhariwal 2021, Eq. 15), else ``beta``
    (``fixed="large"``, improved-diffusion's default) or ``beta~`` (``"small"``). The last step to
    ``sigma = 0`` returns ``x0`` without noise.

    Args:
        denoiser: any denoiser; ``predict(x, sigma, labels) -> (eps, v)`` supplies ``v``.
        x: start ``[N, C, H, W]`` at ``sigmas[0]``.
        sigmas: decreasing grid ending in 0, e.g. ``cm.schedules.vp_timestep_sigmas``.
        labels: one-hot ``[N, L]`` or None.
        fixed: variance when the denoiser has none: ``"large"`` (beta) or ``"small"`` (beta~).
        noise: ``noise(x)`` draws the standard normal added each step (seeded by the Sampler).
        clip_denoised: clamp ``x0_hat`` to [-1, 1] before the posterior mean, as Ho et al. 2020
            and improved-diffusion sample (their FIDs assume it).
    """
    noise = noise or torch.randn_like
    learned = getattr(denoiser, "learned_variance", False)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        s = _sigma(sigma, x)
        if learned:
            eps, v = denoiser.predict(x, s, labels)
            x0 = x - sigma * eps
        else:
            x0, v = denoiser(x, s, labels), None
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        if sigma_next == 0:
            return x0
        mean = x0 + (sigma_next / sigma) ** 2 * (x - x0)
        var = posterior_variance(sigma, sigma_next, v, fixed)
        x = mean + torch.as_tensor(var, dtype=x.dtype, device=x.device).sqrt() * noise(x)
    return x
