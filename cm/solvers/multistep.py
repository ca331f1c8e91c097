"""Multistep solvers of the EDM PF-ODE: DPM-Solver++(2M/3M), iPNDM, UniPC; ancestral Euler.

All work on a decreasing grid ``sigmas`` ending in 0 (``cm.schedules``) and spend one model
evaluation (NFE) per step except where the docstring says otherwise. In EDM coordinates
``lambda = -log sigma`` and the first-order data-prediction step (DDIM) is
``x' = D + (sigma' / sigma) (x - D)``; a step to ``sigma' = 0`` returns the current ``D``.
``afs=True`` replaces the first model evaluation by the analytical first step (Zhou et al. 2024,
as zju-pi/diff-sampler): ``d = x / sqrt(1 + sigma^2)``, i.e.
``D = x - sigma x / sqrt(1 + sigma^2)`` (about 0 at ``sigma_max``), saving one NFE.
"""

import math

import torch
from torch import Tensor

from cm.errors import UserError
from cm.protocols import Denoiser
from cm.solvers.ancestral import Noise, ddim
from cm.solvers.rk import _sigma


def afs_denoised(x: Tensor, sigma: float) -> Tensor:
    """Zhou et al. 2024 (AMED), AFS: ``D(x; sigma) ~ x - sigma x / sqrt(1 + sigma^2)``."""
    return x - sigma * x / math.sqrt(1 + sigma**2)


def _denoised(
    denoiser: Denoiser, x: Tensor, sigma: float, labels: Tensor | None, afs: bool
) -> Tensor:
    """``D(x; sigma)``: the model, or the analytical first step when ``afs``."""
    return afs_denoised(x, sigma) if afs else denoiser(x, _sigma(sigma, x), labels)


def _lam(sigma: Tensor | float) -> Tensor | float:
    """Half the log-SNR, ``lambda = -log sigma`` (Lu et al. 2022b, Sec. 3); floats or tensors."""
    return -sigma.log() if isinstance(sigma, Tensor) else -math.log(sigma)


def _expm1(h: Tensor | float) -> Tensor | float:
    """``exp(h) - 1`` of a float or a tensor."""
    return h.expm1() if isinstance(h, Tensor) else math.expm1(h)


def dpmpp_step(
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    D_hist: list[Tensor],
    sigma_hist: list[Tensor | float],
) -> Tensor:
    """Lu et al. 2022b, Alg. 2 and App. B (DPM-Solver++ multistep, orders 1-3) in EDM form.

    ``D_hist[-1]`` is ``D`` at ``sigma = sigma_hist[-1]``; earlier entries raise the order
    (one: 2M, Alg. 2; two: 3M, the third-order multistep update with ``phi_2, phi_3``).
    The 3M update keeps the published coefficients (DPM-Solver's code, k-diffusion): ``D2``
    approximates ``h^2 D'' / 2`` but is weighted by ``phi_3``, not ``2 phi_3``, so the step is
    locally ``O(h^3)`` like 2M's (tests/test_solvers.py measures it), with a smaller constant.
    Sigmas are floats or ``[N, 1, 1, 1]`` tensors (AMED's per-sample intermediate times).
    """
    D0, ratio = D_hist[-1], sigma_next / sigma
    if not isinstance(sigma_next, Tensor) and sigma_next == 0:
        return D0
    h = _lam(sigma_next) - _lam(sigma)
    if len(D_hist) == 1:
        return D0 + ratio * (x - D0)
    r0 = (_lam(sigma) - _lam(sigma_hist[-2])) / h
    D1_0 = (D0 - D_hist[-2]) / r0
    if len(D_hist) == 2:  # Alg. 2: D = (1 + 1/(2 r)) D_i - 1/(2 r) D_{i-1}
        D = D0 + D1_0 / 2
        return D + ratio * (x - D)
    r1 = (_lam(sigma_hist[-2]) - _lam(sigma_hist[-3])) / h
    D1_1 = (D_hist[-2] - D_hist[-3]) / r1
    D1 = D1_0 + (D1_0 - D1_1) * r0 / (r0 + r1)
    D2 = (D1_0 - D1_1) / (r0 + r1)
    phi_2 = _expm1(-h) / h + 1
    phi_3 = phi_2 / h - 0.5
    return D0 + ratio * (x - D0) + phi_2 * D1 - phi_3 * D2


def _dpmpp(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None,
    order: int,
    afs: bool,
) -> Tensor:
    """DPM-Solver++ multistep of ``order`` with warm-up at lower orders (n NFE, n - 1 with AFS)."""
    grid = sigmas.tolist()
    D_hist: list[Tensor] = []
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        D = _denoised(denoiser, x, sigma, labels, afs and i == 0)
        D_hist = [*D_hist, D][-order:]
        x = dpmpp_step(x, sigma, sigma_next, D_hist, grid[max(i + 1 - order, 0) : i + 1])
    return x


def dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    afs: bool = False,
) -> Tensor:
    """Lu et al. 2022b, Alg. 2: DPM-Solver++(2M), k-diffusion's ``sample_dpmpp_2m`` (n NFE).

    ``afs`` uses the analytical first step (n - 1 NFE).
    """
    return _dpmpp(denoiser, x, sigmas, labels, 2, afs)


def dpmpp_3m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    afs: bool = False,
) -> Tensor:
    """Lu et al. 2022b, App. B: DPM-Solver++(3M), 2M warm-up, deterministic (n NFE).

    k-diffusion's ``sample_dpmpp_3m_sde`` with ``eta = 0`` except for the second step, which
    uses Alg. 2's 2M update as the DPM-Solver code does. ``afs``: n - 1 NFE. Published
    coefficients, which make it locally only second order (see ``dpmpp_step``).
    """
    return _dpmpp(denoiser, x, sigmas, labels, 3, afs)


# Adams-Bashforth coefficients of orders 1-4 (newest slope first).
_AB = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    max_order: int = 4,
    afs: bool = False,
) -> Tensor:
    """Zhang & Chen 2023 (DEIS paper), iPNDM: Adams-Bashforth on ``d``, lower-order warm-up (n NFE).

    Fixed-step coefficients as diff-sampler's ``ipndm_sampler``: order ``max_order`` on a grid
    uniform in sigma, second order on a smooth non-uniform one. The step to 0 also uses the
    history, as k-diffusion's ``sample_ipndm``. ``afs``: n - 1 NFE.
    """
    if not 1 <= max_order <= 4:
        raise UserError(f"ipndm needs 1 <= max_order <= 4, got {max_order}.")
    grid = sigmas.tolist()
    ds: list[Tensor] = []  # newest first
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        D = _denoised(denoiser, x, sigma, labels, afs and i == 0)
        ds = [(x - D) / sigma, *ds][:max_order]
        x = ipndm_step(x, sigma, sigma_next, ds)
    return x


def ipndm_step(
    x: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, ds: list[Tensor]
) -> Tensor:
    """Adams-Bashforth of order ``len(ds)`` (at most 4) on the slopes ``ds``, newest first."""
    return x + (sigma_next - sigma) * sum(c * d for c, d in zip(_AB[len(ds) - 1], ds, strict=True))


def _unipc_rhos(h: float, rks: list[float]) -> list[float]:
    """Zhao et al. 2023 (UniPC), ``B(h) = e^h - 1`` (bh2): solve ``R rho = b`` for ``rho``."""
    if len(rks) == 1:
        return [0.5]
    hh = -h  # data prediction
    b, h_phi_k, factorial = [], math.expm1(hh) / hh - 1, 1
    for i in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / math.expm1(hh))
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.tensor(
        [[r ** (i - 1) for r in rks] for i in range(1, len(rks) + 1)], dtype=torch.float64
    )
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def unipc_step(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    D_hist: list[Tensor],
    sigma_hist: list[float],
    D_next: Tensor | None = None,
) -> Tensor:
    """Zhao et al. 2023: UniP (UniC when ``D_next = D(x_pred; sigma_next)`` is given).

    ``D_hist[-1]`` is ``D`` at ``sigma``; earlier entries (at ``sigma_hist``) raise the order.
    """
    D0, ratio = D_hist[-1], sigma_next / sigma
    if sigma_next == 0:
        return D0
    h = _lam(sigma_next) - _lam(sigma)
    B_h = math.expm1(-h)
    rks = [(_lam(s) - _lam(sigma)) / h for s in reversed(sigma_hist[:-1])]
    D1s = [(D - D0) / r for D, r in zip(reversed(D_hist[:-1]), rks, strict=True)]
    if D_next is not None:
        rks, D1s = [*rks, 1.0], [*D1s, D_next - D0]
    x_next = D0 + ratio * (x - D0)
    if not D1s:
        return x_next
    rhos = _unipc_rhos(h, rks)
    return x_next - B_h * sum(rho * D1 for rho, D1 in zip(rhos, D1s, strict=True))


def unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    order: int = 2,
    afs: bool = False,
) -> Tensor:
    """Zhao et al. 2023: UniPC-bh2 in data prediction (n NFE, n - 1 with ``afs``).

    The corrector reuses the model evaluation at the predicted point, which is the next step's
    ``D``; the last step has no corrector. A step to 0 returns the current ``D``.
    """
    if not 1 <= order <= 3:
        raise UserError(f"unipc needs 1 <= order <= 3, got {order}.")
    grid = sigmas.tolist()
    D_hist, sigma_hist = [_denoised(denoiser, x, grid[0], labels, afs)], [grid[0]]
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        x_pred = unipc_step(x, sigma, sigma_next, D_hist, sigma_hist)
        if i == len(grid) - 2 or sigma_next == 0:
            return x_pred
        D_next = denoiser(x_pred, _sigma(sigma_next, x), labels)
        x = unipc_step(x, sigma, sigma_next, D_hist, sigma_hist, D_next)
        D_hist, sigma_hist = [*D_hist, D_next][-order:], [*sigma_hist, sigma_next][-order:]
    return x


def euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    eta: float = 1.0,
    noise: Noise | None = None,
) -> Tensor:
    """k-diffusion's ``sample_euler_ancestral``: ``ddim`` with ``eta = 1`` by default (n NFE).

    ``eta = 0`` is ``euler``; the step and its noise split are ``cm.solvers.ancestral``'s.
    """
    return ddim(denoiser, x, sigmas, labels, eta=eta, noise=noise)
