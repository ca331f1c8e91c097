"""The one interface of cm: a denoiser ``D(x, sigma, labels) -> x0_hat`` (see DESIGN.md)."""

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from cm.errors import UserError


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


def image_spec(denoiser: Any) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), label_dim)`` of a denoiser's images: from its network, or an oracle's means."""
    net = getattr(denoiser, "net", denoiser)
    label_dim = int(getattr(net, "label_dim", 0))
    if hasattr(net, "img_resolution"):
        side = int(net.img_resolution)
        return (int(net.in_channels), side, side), label_dim
    means = getattr(denoiser, "means", None)  # cm.oracle mixtures: [K, C, H, W]
    if means is not None:
        return tuple(int(n) for n in means.shape[1:]), label_dim
    raise UserError(
        "Cannot tell the image shape of this denoiser (no network with img_resolution, no "
        "oracle means): pass the shape explicitly, e.g. image_shape [3, 32, 32]."
    )
