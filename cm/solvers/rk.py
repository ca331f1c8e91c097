"""Runge-Kutta solvers of the EDM probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma``.

The step functions take a noise level as a Python float (samplers: one sigma for the batch) or as
a ``[N]`` tensor (CD's teacher step, progressive distillation: one sigma per sample).
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from cm.protocols import Denoiser


def _sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """A scalar or ``[N]`` noise level as a ``[N]`` tensor in ``x``'s dtype for the denoiser."""
    if isinstance(sigma, Tensor):
        return sigma.to(device=x.device, dtype=x.dtype).expand(x.shape[0])
    return x.new_full((x.shape[0],), float(sigma))


def column(v: Tensor | float, x: Tensor) -> Tensor | float:
    """A float unchanged, a ``[N]`` tensor as ``[N, 1, 1, 1]`` on ``x``'s device and dtype."""
    if isinstance(v, Tensor):
        return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return v


def to_d(denoiser: Denoiser, x: Tensor, sigma: Tensor | float, labels: Tensor | None) -> Tensor:
    """Karras et al. 2022, Eq. 3: the ODE slope ``d = (x - D(x; sigma)) / sigma``."""
    return (x - denoiser(x, _sigma(sigma, x), labels)) / column(sigma, x)


def euler_step(
    denoiser: Denoiser,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    labels: Tensor | None = None,
) -> Tensor:
    """Karras et al. 2022, Alg. 1 line 5: ``x + (sigma_next - sigma) d(x; sigma)``."""
    return x + column(sigma_next - sigma, x) * to_d(denoiser, x, sigma, labels)


def heun_step(
    denoiser: Denoiser,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    labels: Tensor | None = None,
) -> Tensor:
    """Karras et al. 2022, Alg. 1 lines 5-8: Heun's step; Euler where ``sigma_next == 0``."""
    d = to_d(denoiser, x, sigma, labels)
    h = column(sigma_next - sigma, x)
    x_next = x + h * d
    if not isinstance(sigma_next, Tensor):
        if sigma_next == 0:
            return x_next
        return x + h * (d + to_d(denoiser, x_next, sigma_next, labels)) / 2
    last = sigma_next == 0  # [N]
    if bool(last.all()):
        return x_next
    # Samples that reach 0 keep their Euler step; a dummy sigma of 1 avoids dividing by 0.
    d_next = to_d(denoiser, x_next, torch.where(last, 1.0, sigma_next), labels)
    return torch.where(column(last, x) > 0, x_next, x + h * (d + d_next) / 2)


def _over_grid(
    step: Callable[..., Tensor],
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None,
) -> Tensor:
    """Apply a one-step method to each consecutive pair of the decreasing grid ``sigmas``."""
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        x = step(denoiser, x, sigma, sigma_next, labels)
    return x


def euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, labels: Tensor | None = None) -> Tensor:
    """Euler's method over the grid ``sigmas`` (1 NFE per step); ``x`` is at ``sigmas[0]``."""
    return _over_grid(euler_step, denoiser, x, sigmas, labels)


def heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, labels: Tensor | None = None) -> Tensor:
    """Karras et al. 2022, Alg. 1: Heun's method, Euler on the last step to 0 (2n - 1 NFE)."""
    return _over_grid(heun_step, denoiser, x, sigmas, labels)


def dpm2_step(
    denoiser: Denoiser,
    x: Tensor,
    sigma: float,
    sigma_next: float,
    labels: Tensor | None = None,
) -> Tensor:
    """Lu et al. 2022a, Alg. 1 (DPM-Solver-2, r = 1/2): midpoint in log sigma; Euler to 0."""
    d = to_d(denoiser, x, sigma, labels)
    if sigma_next == 0:
        return x + (sigma_next - sigma) * d
    sigma_mid = math.sqrt(sigma * sigma_next)  # exp of the mean of log sigmas
    d_mid = to_d(denoiser, x + (sigma_mid - sigma) * d, sigma_mid, labels)
    return x + (sigma_next - sigma) * d_mid


def dpm2(denoiser: Denoiser, x: Tensor, sigmas: Tensor, labels: Tensor | None = None) -> Tensor:
    """Lu et al. 2022a, Alg. 1: DPM-Solver-2 as k-diffusion's ``sample_dpm_2`` (2n - 1 NFE)."""
    return _over_grid(dpm2_step, denoiser, x, sigmas, labels)


def edm_stochastic(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Karras et al. 2022, Alg. 2: Heun with churn; ``s_churn = 0`` is ``heun`` (2n - 1 NFE).

    Args:
        denoiser: any denoiser.
        x: start at ``sigmas[0]``.
        sigmas: decreasing grid ending in 0.
        labels: one-hot ``[N, L]`` or None.
        s_churn: total churn; each step raises sigma by ``gamma = min(s_churn / n, sqrt2 - 1)``.
        s_tmin: churn only where ``s_tmin <= sigma <= s_tmax``.
        s_tmax: see ``s_tmin``.
        s_noise: scale of the added noise (slightly above 1 offsets the denoiser's bias).
        noise: ``noise(x)`` draws the standard normal (seeded by the Sampler); ``randn_like``.
    """
    noise = noise or torch.randn_like
    n = len(sigmas) - 1
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        if gamma > 0:
            sigma_hat = sigma * (1 + gamma)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise(x)
            sigma = sigma_hat
        x = heun_step(denoiser, x, sigma, sigma_next, labels)
    return x
