"""Flow-map sampler: ``x <- Phi(x, sigma_i, sigma_{i+1})`` without re-noising (DESIGN.md)."""

from torch import Tensor

from cm.errors import UserError
from cm.protocols import Denoiser


def flowmap(denoiser: Denoiser, x: Tensor, sigmas: Tensor, labels: Tensor | None = None) -> Tensor:
    """Geng et al. 2025, Sec. 4 (MeanFlow's 1- and N-NFE sampling): ``N`` jumps of ``Phi``.

    ``x_{i+1} = Phi(x_i, sigma_i, sigma_{i+1})`` on the grid ``sigmas`` (e.g.
    ``cm.schedules.flow_uniform_sigmas``); deterministic, one network call per step.

    Args:
        denoiser: a flow map, i.e. a denoiser with ``flow_map(x, sigma, sigma_to, labels)``
            (``cm.flowmap.MeanFlowPrecond``).
        x: the initial noise already scaled to ``sigmas[0]``, ``[N, C, H, W]``.
        sigmas: decreasing sigmas ending in 0.
        labels: optional one-hot labels ``[N, L]``.
    """
    flow_map = getattr(denoiser, "flow_map", None)
    if flow_map is None:
        raise UserError(
            "cm.solvers.flowmap.flowmap needs a flow map (a denoiser with flow_map, e.g. "
            "cm.flowmap.MeanFlowPrecond); use a consistency or ODE solver for this denoiser."
        )
    for sigma, sigma_to in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        x = flow_map(x, sigma, sigma_to, labels)
    return x
