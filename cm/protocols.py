"""The one interface of cm: a denoiser ``D(x, sigma, labels) -> x0_hat`` (see DESIGN.md)."""

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """EDM denoiser: ``x = y + sigma * n``; estimates ``y`` (Karras et al. 2022, Eq. 2).

    Shapes: ``x`` is ``[N, C, H, W]``, ``sigma`` is ``[N]``, ``labels`` ``[N, L]`` one-hot or None.
    """

    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """Return ``x0_hat = D(x; sigma, labels)``."""


@runtime_checkable
class Network(Protocol):
    """Raw network behind a preconditioner: sees ``c_noise``, never ``sigma`` (EDM Table 1)."""

    def __call__(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """Return ``F(x; c_noise, labels)``."""
