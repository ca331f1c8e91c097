"""AMED-Solver and AMED-Plugin (Zhou et al. 2024, Sec. 4; zju-pi/diff-sampler, Apache-2.0).

Per interval ``t_n -> t_{n+1}`` a trained predictor (``cm.networks.AMEDPredictor``) reads the
denoiser's bottleneck at ``t_n`` and returns ``r_n``, ``c_n`` and ``a_n``; the intermediate time is
``s_n = t_{n+1}^r t_n^(1 - r)`` (Eq. 10), ``y_n`` is the base step ``t_n -> s_n`` and the model is
evaluated at ``(y_n, a_n s_n)``. AMED-Solver then takes ``x_{n+1} = x_n + c_n (t_{n+1} - t_n)
d(y_n; s_n)`` (Eq. 11, a learned midpoint rule); AMED-Plugin takes the base solver's step
``s_n -> t_{n+1}`` with its increment scaled by ``c_n``, multistep histories running through the
inserted points. Two NFE per interval, the first saved by AFS: ``N`` points cost ``2 (N - 1) - 1``.
As in diff-sampler (``denoise_to_zero=False``) sampling ends at the last positive sigma of the
grid: a trailing 0 of ``sigmas`` is dropped.
"""

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from cm.errors import UserError
from cm.protocols import Denoiser
from cm.solvers.multistep import afs_denoised, dpmpp_step, ipndm_step
from cm.solvers.rk import _sigma, column


class StepPredictor(Protocol):
    """What the AMED solvers need of a predictor (``cm.networks.AMEDPredictor``)."""

    solver: str
    afs: bool
    afs_history: bool
    max_order: int

    def __call__(self, features: Tensor, sigma: float, sigma_next: float) -> tuple[Tensor, ...]:
        """``(r, c, a)``, each ``[N]``."""

    def watch(self, denoiser: Any) -> Any:
        """Context manager yielding a feature tap with ``reset()`` and ``take(n, device)``."""


@dataclass(frozen=True)
class Point:
    """One model evaluation: noise level (float or ``[N, 1, 1, 1]``), ``D`` and ``d``."""

    sigma: Tensor | float
    D: Tensor
    d: Tensor

    def detach(self) -> "Point":
        """The same point without autograd history (histories carry values, not gradients)."""
        sigma = self.sigma.detach() if isinstance(self.sigma, Tensor) else self.sigma
        return Point(sigma, self.D.detach(), self.d.detach())


def _base_step(
    base: str, x: Tensor, sigma_next: Tensor | float, hist: list[Point], max_order: int
) -> Tensor:
    """The base solver's step from ``hist[-1].sigma`` to ``sigma_next`` (``hist`` newest last)."""
    sigma = hist[-1].sigma
    match base:
        case "ipndm":
            return ipndm_step(x, sigma, sigma_next, [p.d for p in reversed(hist[-max_order:])])
        case "dpmpp":
            used = hist[-max_order:]
            return dpmpp_step(x, sigma, sigma_next, [p.D for p in used], [p.sigma for p in used])
        case _:  # euler, and the first half of the AMED-Solver step
            return x + (sigma_next - sigma) * hist[-1].d


def _scaled(base: str, x: Tensor, x_base: Tensor, ratio: Tensor, c: Tensor) -> Tensor:
    """Scale a step's increment by ``c_n`` (Zhou et al. 2024, Sec. 4.3).

    Euler and iPNDM scale ``x' - x``; DPM-Solver++ scales the data term ``x' - (sigma'/sigma) x``,
    as diff-sampler's ``dpm_pp_update(scale=)``.
    """
    anchor = ratio * x if base == "dpmpp" else x
    return anchor + c * (x_base - anchor)


def amed_interval(
    denoiser: Denoiser,
    predictor: StepPredictor,
    tap: Any,
    x: Tensor,
    sigma: float,
    sigma_next: float,
    labels: Tensor | None = None,
    hist: list[Point] | None = None,
    first: bool = False,
) -> tuple[Tensor, list[Point], tuple[Tensor, ...]]:
    """Zhou et al. 2024, Alg. 1 lines 3-7: one interval ``t_n -> t_{n+1}`` (2 NFE; 1 with AFS).

    Args:
        denoiser: the frozen denoiser, hooked by ``tap`` (``predictor.watch(denoiser)``).
        predictor: gives ``(r, c, a)``; its ``solver``, ``afs``, ``afs_history`` and
            ``max_order`` apply.
        tap: the feature tap of ``predictor.watch``.
        x: the state at ``sigma``.
        sigma: ``t_n``.
        sigma_next: ``t_{n+1} > 0``.
        labels: one-hot ``[N, L]`` or None.
        hist: the multistep history before this interval (``[]`` at the start).
        first: this is the first interval (AFS applies).

    Returns:
        ``x_{n+1}``, the history after it (detached), and ``(r, c, a)`` as ``[N]`` tensors.
    """
    base, max_order = predictor.solver, predictor.max_order
    tap.reset()
    if first and predictor.afs:
        D = afs_denoised(x, sigma)
    else:
        D = denoiser(x, _sigma(sigma, x), labels)
    r, c, a = (column(v, x) for v in predictor(tap.take(x.shape[0], x.device), sigma, sigma_next))
    hist = [*(hist or []), Point(sigma, D, (x - D) / sigma)]
    s = sigma_next**r * sigma ** (1 - r)  # [N, 1, 1, 1], Eq. 10
    y = _base_step(base, x, s, hist, max_order)
    if first and predictor.afs and not predictor.afs_history:
        hist = []  # the AFS slope served the first substep only
    D_mid = denoiser(y, _sigma((a * s).flatten(), y), labels)
    d_mid = (y - D_mid) / s
    if base == "amed":  # Eq. 11
        return x + c * (sigma_next - sigma) * d_mid, [], (r.flatten(), c.flatten(), a.flatten())
    hist = [*hist, Point(s, D_mid, d_mid)]
    x_next = _scaled(base, y, _base_step(base, y, sigma_next, hist, max_order), sigma_next / s, c)
    hist = [p.detach() for p in hist[-max_order:]]
    return x_next, hist, (r.flatten(), c.flatten(), a.flatten())


def positive_grid(sigmas: Tensor) -> list[float]:
    """The grid without its trailing 0 (AMED ends at the smallest positive sigma)."""
    grid = sigmas.tolist()
    grid = grid[:-1] if grid[-1] == 0 else grid
    if len(grid) < 2:
        raise UserError(f"AMED needs at least two positive sigmas, got {sigmas.tolist()}.")
    return grid


@torch.no_grad()
def _run(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None,
    predictor: StepPredictor | None,
) -> Tensor:
    """Every interval of the positive grid with one predictor."""
    if predictor is None:
        raise UserError(
            "AMED needs a trained predictor: pass predictor= (cm sample --predictor FILE)."
        )
    grid, hist = positive_grid(sigmas), []
    with predictor.watch(denoiser) as tap:
        for n, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
            x, hist, _ = amed_interval(
                denoiser, predictor, tap, x, sigma, sigma_next, labels, hist, first=n == 0
            )
    return x


def amed(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    predictor: StepPredictor | None = None,
) -> Tensor:
    """Zhou et al. 2024, Alg. 1: AMED-Solver (``predictor.solver == "amed"``), ``2(N-1) - afs`` NFE.

    ``sigmas`` should be the grid the predictor was trained on (``predictor.grid()``).
    """
    if predictor is not None and predictor.solver != "amed":
        raise UserError(
            f"This predictor was trained for AMED-Plugin on {predictor.solver!r}: use "
            "cm.solvers.amed_plugin."
        )
    return _run(denoiser, x, sigmas, labels, predictor)


def amed_plugin(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    predictor: StepPredictor | None = None,
) -> Tensor:
    """Zhou et al. 2024, Sec. 4.3: AMED-Plugin on ``predictor.solver`` (euler, ipndm, dpmpp).

    The base solver's update runs over ``t_n, s_n, t_{n+1}, ...``; ``2(N-1) - afs`` NFE.
    """
    if predictor is not None and predictor.solver == "amed":
        raise UserError("This predictor was trained for AMED-Solver: use cm.solvers.amed.")
    return _run(denoiser, x, sigmas, labels, predictor)
