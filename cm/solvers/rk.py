"""Runge-Kutta solvers of the EDM probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma``."""

from torch import Tensor

from cm.protocols import Denoiser


def _sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """A scalar noise level as a ``[N]`` float32 tensor for the denoiser."""
    return x.new_full((x.shape[0],), float(sigma))


def to_d(denoiser: Denoiser, x: Tensor, sigma: float, labels: Tensor | None) -> Tensor:
    """Karras et al. 2022, Eq. 3: the ODE slope ``d = (x - D(x; sigma)) / sigma``."""
    return (x - denoiser(x, _sigma(sigma, x), labels)) / sigma


def euler_step(
    denoiser: Denoiser, x: Tensor, sigma: float, sigma_next: float, labels: Tensor | None = None
) -> Tensor:
    """Karras et al. 2022, Alg. 1 line 5: ``x + (sigma_next - sigma) d(x; sigma)``."""
    return x + (sigma_next - sigma) * to_d(denoiser, x, sigma, labels)


def heun_step(
    denoiser: Denoiser, x: Tensor, sigma: float, sigma_next: float, labels: Tensor | None = None
) -> Tensor:
    """Karras et al. 2022, Alg. 1 lines 5-8: Heun's step; Euler when ``sigma_next == 0``."""
    d = to_d(denoiser, x, sigma, labels)
    x_next = x + (sigma_next - sigma) * d
    if sigma_next == 0:
        return x_next
    d_next = to_d(denoiser, x_next, sigma_next, labels)
    return x + (sigma_next - sigma) * (d + d_next) / 2


def euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, labels: Tensor | None = None) -> Tensor:
    """Euler's method over the grid ``sigmas`` (1 NFE per step); ``x`` is at ``sigmas[0]``."""
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        x = euler_step(denoiser, x, sigma, sigma_next, labels)
    return x


def heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, labels: Tensor | None = None) -> Tensor:
    """Karras et al. 2022, Alg. 1: Heun's method, Euler on the last step to 0 (2n - 1 NFE)."""
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        x = heun_step(denoiser, x, sigma, sigma_next, labels)
    return x
