"""The zero-shot editing loop (Song et al. 2023, Alg. 4) for any denoiser and any solver.

Alg. 4 replaces the known coordinates of each denoised estimate ``x0 = f(x, t)`` by those of the
reference ``y`` before re-noising. Here the replacement wraps the denoiser
(:class:`Replaced`), so the loop is an unchanged ``cm.solvers`` function:

- ``cm.solvers.consistency.multistep`` on a ``Replaced`` consistency model is Alg. 4 line by line
  (denoise, replace, re-noise ``x = x0 + z sqrt(t^2 - sigma_min^2)``);
- a diffusion solver (Euler, Heun, DPM-Solver++ ...) steps with ``D'(x) = replace(y, D(x))``.
  Its update is linear in ``D``, so the known coordinates of the state follow
  ``A x = A y + sigma * (A z)`` (the replacement method of Song et al. 2021, Sec. 5 with fixed
  noise) and land exactly on ``A y`` at ``sigma = 0``. RePaint's jump-backs (``resample``) let
  the generated part agree with ``y`` before it is committed.
"""

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cm.editing.operators import Operator
from cm.errors import UserError
from cm.protocols import Denoiser
from cm.schedules import karras_sigmas
from cm.solvers.consistency import multistep, onestep
from cm.solvers.rk import heun_step
from cm.solvers.sampling import SeededNoise

Solver = Callable[..., Tensor]


class Replaced(nn.Module):
    """Song et al. 2023, Alg. 4 lines 4-5: ``D'(x) = A^{-1}[(A y)(1 - Omega) + (A D(x)) Omega]``.

    Args:
        denoiser: any ``D(x, sigma, labels)`` (a consistency model or a diffusion denoiser).
        y: the reference image ``[N, C, H, W]`` in [-1, 1].
        operator: the transform ``A`` and mask ``Omega``.
    """

    def __init__(self, denoiser: Denoiser, y: Tensor, operator: Operator) -> None:
        super().__init__()
        self.denoiser, self.y, self.operator = denoiser, y, operator

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """The denoised estimate with the known coordinates of ``y``."""
        return self.operator.replace(self.y.to(x), self.denoiser(x, sigma, labels))


def start(y: Tensor, sigma: float, z: Tensor, operator: Operator | None = None) -> Tensor:
    """Song et al. 2023, Alg. 4 lines 2-3: ``x = A^{-1}[(A y)(1 - Omega)] + sigma z``.

    Without an operator this is SDEdit's start (Meng et al. 2022, Eq. 5): ``x = y + sigma z``.

    Args:
        y: the reference (or stroke) image ``[N, C, H, W]``.
        sigma: the starting noise level ``t_1``.
        z: standard normal noise shaped like ``y``.
        operator: keep only the known coordinates of ``y`` first.
    """
    y = y if operator is None else operator.project(y)
    return y + sigma * z


def slerp(z0: Tensor, z1: Tensor, alpha: float | Tensor) -> Tensor:
    """Song et al. 2023, Sec. 6.1 (interpolation): spherical interpolation of two noises ``x_T``.

    Args:
        z0: noise at ``alpha = 0``, ``[N, C, H, W]``.
        z1: noise at ``alpha = 1``, same shape.
        alpha: the position in [0, 1], a float or ``[N]``.
    """
    alpha = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device).reshape(-1, 1, 1, 1)
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1)).reshape(-1, 1, 1, 1)  # [N, 1, 1, 1]
    # sin(theta) > 0 for independent Gaussian noises; fall back to lerp for (anti)parallel ones.
    s = torch.sin(theta)
    safe = s.abs() > 1e-6
    w0 = torch.where(safe, torch.sin((1 - alpha) * theta) / s.where(safe, 1), 1 - alpha)
    w1 = torch.where(safe, torch.sin(alpha * theta) / s.where(safe, 1), alpha)
    return w0 * z0 + w1 * z1


@torch.no_grad()
def edit(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    y: Tensor | None = None,
    operator: Operator | None = None,
    solver: Solver = multistep,
    noise: SeededNoise | None = None,
    resample: int = 1,
    **options,
) -> Tensor:
    """Song et al. 2023, Alg. 4: run ``solver`` with the replacement after every denoising.

    Args:
        denoiser: a consistency model (with ``solver=multistep``) or a diffusion denoiser.
        x: the start state already at ``sigmas[0]`` (:func:`start`, or a noisy image to denoise).
        sigmas: decreasing noise levels ending in 0 (``cm.schedules.karras_sigmas``).
        labels: optional one-hot (or soft) labels ``[N, L]``.
        y: the reference image ``[N, C, H, W]``; needed with ``operator``.
        operator: ``A`` and ``Omega`` (``Inpaint``, ``Colorize``, ``SuperRes``); None runs the
            solver unchanged (SDEdit, denoising, interpolation).
        solver: any ``cm.solvers`` function ``fn(denoiser, x, sigmas, labels=None, ...)``.
        noise: per-seed noise for stochastic solvers (``multistep``'s re-noising), so an edit
            does not depend on the batch size.
        resample: RePaint's harmonization (Lugmayr et al. 2022, Alg. 1): run ``solver`` on
            each interval ``[sigma_i, sigma_i+1]``, jump back to ``sigma_i`` with fresh noise and
            repeat, ``resample`` times in all. Plain replacement commits the generated part
            before it agrees with ``y``; resampling fixes that for ODE solvers. For diffusion
            solvers only (their output is the state at the grid's end); a consistency loop
            re-noises at every step already, give it more steps instead.
        **options: passed on to ``solver``.
    """
    if operator is not None:
        if y is None:
            raise UserError("edit with an operator needs the reference image y.")
        denoiser = Replaced(denoiser, y, operator)
    if noise is not None and "noise" in inspect.signature(solver).parameters:
        options.setdefault("noise", noise.randn_like)
    if resample < 1:
        raise UserError(
            f"resample counts the passes over each step: use 1 or more, not {resample}."
        )
    if resample == 1:
        x = solver(denoiser, x, sigmas, labels, **options)
    elif solver in (multistep, onestep):
        raise UserError("resample is for diffusion solvers; give a consistency loop more steps.")
    else:
        draw = noise.randn_like if noise is not None else torch.randn_like
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            for r in range(resample):
                if r > 0:  # jump back: x(sigma) = x(sigma_next) + sqrt(sigma^2 - sigma_next^2) z
                    x = x + draw(x) * float(sigma**2 - sigma_next**2) ** 0.5
                x = solver(denoiser, x, torch.stack([sigma, sigma_next]), labels, **options)
    # Alg. 4 ends with a replacement; repeating it makes the known part exact for any solver.
    return x if operator is None else operator.replace(y.to(x), x)


class ODEConsistency(nn.Module):
    """Song et al. 2023, Eq. 3: the consistency function of a diffusion denoiser by PF-ODE solving.

    ``f(x, t)`` runs Heun (Karras et al. 2022, Alg. 1) from ``t`` to ``sigma_min`` on a per-sample
    Karras grid; ``f(x, sigma_min) = x``. With an exact denoiser (``cm.oracle``) this is the ideal
    consistency model, which tests Alg. 4 without training one.

    Args:
        denoiser: a diffusion denoiser ``D(x, sigma, labels)``.
        num_steps: Heun steps per call.
        sigma_min: the boundary ``epsilon``.
        rho: Karras grid exponent.
    """

    def __init__(
        self, denoiser: Denoiser, num_steps: int = 16, sigma_min: float = 0.002, rho: float = 7.0
    ) -> None:
        super().__init__()
        self.denoiser, self.num_steps = denoiser, num_steps
        self.sigma_min, self.rho = sigma_min, rho

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """``x(sigma_min)`` from ``x(sigma)`` along the PF-ODE, ``sigma [N]``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        t = sigma.clamp(min=self.sigma_min).cpu()
        # [num_steps + 1, N]: a Karras grid from t_i down to sigma_min for every sample.
        grid = torch.stack(
            [karras_sigmas(self.num_steps, self.sigma_min, float(s), self.rho)[:-1] for s in t]
        )
        grid = torch.cat([grid, torch.full_like(grid[:, :1], self.sigma_min)], 1).T
        for s, s_next in zip(grid[:-1], grid[1:], strict=True):
            x = heun_step(self.denoiser, x, s, s_next, labels)
        return x


def interpolation_alphas(num: int) -> Tensor:
    """Song et al. 2023, Sec. 6.1: ``num`` evenly spaced slerp positions, 0 and 1 included."""
    return torch.linspace(0, 1, num, dtype=torch.float64) if num > 1 else torch.zeros(1)


__all__ = [
    "ODEConsistency",
    "Replaced",
    "edit",
    "interpolation_alphas",
    "slerp",
    "start",
]
