"""The one tangent pass of the continuous-time objectives (sCT/sCD, MeanFlow).

``d/ds fn(primals + s tangents)`` at ``s = 0`` by forward-mode AD (``torch.func.jvp``) or, as the
documented fallback for networks without forward-mode AD, a central difference along the same
direction. Both run without gradients and under SDPA's math kernel (the fused attention kernels
have no forward-mode AD); the caller passes the unwrapped network, and its gradient pass is the
ordinary call, so DDP synchronises gradients as for every other objective.
"""

import contextlib
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from cm.errors import UserError

Tangent = Literal["jvp", "finite_difference"]
TangentPrecision = Literal["autocast", "float32"]


@torch.no_grad()
def tangent(
    fn: Callable[..., Tensor],
    primals: tuple[Tensor, ...],
    tangents: tuple[Tensor, ...],
    method: Tangent = "jvp",
    epsilon: float = 1e-3,
    precision: TangentPrecision = "autocast",
) -> Tensor:
    """Directional derivative ``J_fn(primals) . tangents`` (Lu & Song 2024, Sec. 4; Geng 2025).

    Args:
        fn: the function of ``primals`` (a closure over the unwrapped network and its labels).
        primals: the point, e.g. ``(x_t, t)``.
        tangents: the direction, one tensor per primal.
        method: ``"jvp"`` (exact, ``torch.func.jvp``) or ``"finite_difference"`` (central
            difference with step ``epsilon``; both calls draw the same dropout mask).
        epsilon: step of the central difference.
        precision: ``"autocast"`` runs the pass like the training step (bf16 under
            ``bf16-mixed``); ``"float32"`` turns autocast off for it (FastGen's
            ``precision_amp_jvp``).
    """
    device = primals[0].device
    amp = (
        torch.autocast(device.type, enabled=False)
        if precision == "float32"
        else contextlib.nullcontext()  # whatever autocast the training step runs under
    )
    with sdpa_kernel(SDPBackend.MATH), amp:
        if method == "finite_difference":
            h = epsilon
            plus = tuple(p + h * v for p, v in zip(primals, tangents, strict=True))
            minus = tuple(p - h * v for p, v in zip(primals, tangents, strict=True))
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # one dropout mask for both calls
                f_plus = fn(*plus)
            return (f_plus - fn(*minus)) / (2 * h)
        try:
            _, df = torch.func.jvp(fn, primals, tangents)
        except (RuntimeError, NotImplementedError) as error:
            raise UserError(
                f"The network does not support forward-mode AD ({str(error).splitlines()[0]}); "
                "set the objective's tangent: finite_difference, or train without "
                "torch.compile (cm.training.Compile) for continuous-time objectives."
            ) from None
    return df
