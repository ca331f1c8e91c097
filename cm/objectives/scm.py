"""Continuous-time consistency models: sCT and sCD (Lu & Song 2024, "sCM", Alg. 1 and Sec. 4).

The trained denoiser is any ``D(x, sigma, labels)``; the loss reads it in TrigFlow's variables
through ``cm.precond.trigflow_flow`` (``TrigFlowPrecond`` is the paper's parameterization, an
``EDMPrecond`` network works as in FastGen). Per sample, with ``tan t = e^tau / sigma_d`` and
``x_t = cos t x0 + sin t z``:

``g = -cos^2 t (sigma_d F- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF-/dt)``  (Eq. 8 with the
tangent warm-up ``r``), normalised to ``g / (||g|| + c)``, and the loss
``e^{-logvar(t)} w(t) ||F_theta - F- - g||^2 / D + logvar(t)`` (Sec. 4.2, adaptive weighting).
``g`` is ``cos t df-/dt``: it vanishes for the exact consistency function, which the tests check
against ``cm.oracle``'s closed-form Gaussian PF-ODE.
"""

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.objectives.base import Objective, init_from_teacher, unwrap_denoiser
from cm.objectives.jvp import Tangent, TangentPrecision, tangent
from cm.precond import trigflow_flow
from cm.solvers.rk import column

TangentNorm = Literal["rms", "l2"]


class AdaptiveWeight(nn.Module):
    """Lu & Song 2024, Sec. 4.2: the learned ``logvar(t) = -w_phi(t)`` (EDM2's uncertainty head).

    Fourier features ``sqrt(2) cos(2 pi (f t + phi))`` of TrigFlow's ``t`` (fixed ``f ~ N(0, 1)``
    and ``phi ~ U[0, 1)`` from a fixed seed, so every rank and resume agree) and a zero-initialised
    linear layer, so training starts from uniform weighting.

    Args:
        channels: number of Fourier features.
    """

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", torch.randn(channels, generator=generator))
        self.register_buffer("phases", torch.rand(channels, generator=generator))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        """``logvar(t)`` ``[N]`` (float32) for TrigFlow times ``t`` ``[N]``."""
        features = torch.cos(2 * math.pi * (t.float().outer(self.freqs) + self.phases))
        return self.linear(features * math.sqrt(2)).squeeze(1).float()


class ContinuousConsistency(Objective):
    """Lu & Song 2024, Alg. 1: the continuous-time consistency loss; ``velocity`` gives ``dx_t/dt``.

    The tangent ``dF-/dt`` is a forward-mode JVP of the network (``torch.func.jvp``, no grad,
    SDPA's math kernel, since the fused kernels have no forward-mode AD) with the paper's
    rearranged tangents ``(cos t sin t dx_t/dt, cos t sin t)``, which keep bf16 from overflowing
    near ``t = pi/2``; ``tangent="finite_difference"`` replaces it by a central difference along
    the same direction (step ``epsilon``, relative to ``t`` through ``cos t sin t``). The JVP
    runs on the unwrapped denoiser without gradients; the gradient pass is the ordinary call, so
    DDP synchronises gradients as for every other objective (tested with 2 processes). The loss
    arithmetic is float32 (float64 for float64 data) whatever the network's autocast dtype.

    Args:
        p_mean: mean of ``tau = ln(sigma_d tan t)``, ``tau ~ N(p_mean, p_std^2)`` (-1.0 on
            CIFAR-10 and ImageNet 64x64, the paper's consistency-model settings and FastGen).
        p_std: standard deviation of ``tau`` (1.4 CIFAR-10, 1.6 ImageNet 64x64).
        sigma_data: ``sigma_d``; ``z ~ N(0, sigma_d^2 I)``.
        tangent_warmup_steps: ``r = min(1, step / H)`` scales the second tangent term (Sec. 4.2,
            10k steps); 0 disables the warm-up.
        tangent_norm_c: ``c`` of the tangent normalisation ``g / (||g|| + c)`` (0.1); negative
            disables it.
        tangent_norm: ``"rms"`` takes ``||g||`` per dimension (FastGen's spatially invariant
            norm, the default) or ``"l2"`` over the whole sample.
        prior_weighting: multiply by the prior weighting ``1 / (sigma_d tan t)`` (Sec. 4.2).
        adaptive_weighting: learn ``logvar(t)`` (``AdaptiveWeight``) with the model; off: 0.
        weighting_channels: Fourier features of the adaptive weighting head.
        tangent: ``"jvp"`` (exact) or ``"finite_difference"`` (the documented fallback for
            networks without forward-mode AD).
        epsilon: step of the finite difference along the rearranged tangent.
        tangent_precision: ``"autocast"`` runs the tangent pass like the network (bf16 under
            ``bf16-mixed``); ``"float32"`` turns autocast off for it (FastGen's
            ``precision_amp_jvp`` on ImageNet 64x64).
    """

    def __init__(
        self,
        p_mean: float = -1.0,
        p_std: float = 1.4,
        sigma_data: float = 0.5,
        tangent_warmup_steps: int = 10000,
        tangent_norm_c: float = 0.1,
        tangent_norm: TangentNorm = "rms",
        prior_weighting: bool = True,
        adaptive_weighting: bool = True,
        weighting_channels: int = 128,
        tangent: Tangent = "jvp",
        epsilon: float = 1e-3,
        tangent_precision: TangentPrecision = "autocast",
    ) -> None:
        super().__init__()
        if tangent_warmup_steps < 0 or p_std <= 0 or sigma_data <= 0 or epsilon <= 0:
            raise UserError(
                "tangent_warmup_steps must be >= 0 and p_std, sigma_data and epsilon positive; "
                "fix the objective's init_args."
            )
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data
        self.tangent_warmup_steps = tangent_warmup_steps
        self.tangent_norm_c, self.tangent_norm = tangent_norm_c, tangent_norm
        self.prior_weighting = prior_weighting
        self.weight_head = AdaptiveWeight(weighting_channels) if adaptive_weighting else None
        self.tangent, self.epsilon = tangent, epsilon
        self.tangent_precision = tangent_precision
        self._last: dict[str, float] = {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adaptive weighting head's parameters: they train with the model (Sec. 4.2)."""
        return [] if self.weight_head is None else list(self.weight_head.parameters())

    def velocity(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, labels: Tensor | None):
        """``dx_t/dt`` ``[N, ...]`` at ``x_t`` (TrigFlow's PF-ODE), without gradients."""
        raise NotImplementedError

    def sample_t(self, n: int, device: torch.device) -> Tensor:
        """Sec. 4.2: ``t = arctan(e^tau / sigma_d)``, ``tau ~ N(p_mean, p_std^2)``; float64 [n]."""
        tau = self.draws.randn(n, device).to(torch.float64) * self.p_std + self.p_mean
        return torch.atan(tau.exp() / self.sigma_data)

    def flow(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        """``F_theta(x_t, t)`` of the trained denoiser (``cm.precond.trigflow_flow``)."""
        return trigflow_flow(denoiser, x_t, t, labels, self.sigma_data)

    def flow_tangent(
        self, denoiser: nn.Module, x_t: Tensor, t: Tensor, dxt_dt: Tensor, labels: Tensor | None
    ) -> Tensor:
        """``cos t sin t dF-/dt`` ``[N, ...]``: Eq. 8's rearranged JVP (or a central difference)."""
        v_t = (torch.cos(t) * torch.sin(t)).to(torch.float64)  # [N]
        v_x = column(v_t, x_t) * dxt_dt

        def F(x: Tensor, time: Tensor) -> Tensor:
            return self.flow(denoiser, x, time, labels)

        primals = (x_t, t.to(torch.float64))
        return tangent(F, primals, (v_x, v_t), self.tangent, self.epsilon, self.tangent_precision)

    def tangent_target(
        self,
        F_minus: Tensor,
        dF: Tensor,
        x_t: Tensor,
        t: Tensor,
        dxt_dt: Tensor,
        r: float,
    ) -> Tensor:
        """Eq. 8: ``g = -cos^2 t (sigma_d F- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF-/dt)``.

        ``dF`` is the rearranged ``cos t sin t dF-/dt``; unnormalised, ``g = cos t df-/dt``.
        """
        cos_t, sin_t = column(torch.cos(t), x_t), column(torch.sin(t), x_t)
        sd = self.sigma_data
        return -(cos_t**2) * (sd * F_minus - dxt_dt) - r * (cos_t * sin_t * x_t + sd * dF)

    def normalize(self, g: Tensor) -> Tensor:
        """Sec. 4.2: tangent normalisation ``g / (||g|| + c)`` per sample."""
        if self.tangent_norm_c < 0:
            return g
        norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
        if self.tangent_norm == "rms":
            norm = norm / math.sqrt(g[0].numel())
        return g / column(norm + self.tangent_norm_c, g)

    def warmup(self, step: int) -> float:
        """Sec. 4.2: the tangent warm-up ``r = min(1, step / H)``."""
        if self.tangent_warmup_steps == 0:
            return 1.0
        return min(1.0, step / self.tangent_warmup_steps)

    def forward(
        self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None, step: int, total_steps: int
    ) -> Tensor:
        """Per-sample sCM loss ``[N]`` (Alg. 1) at training ``step``."""
        dtype = torch.promote_types(x0.dtype, torch.float32)
        x0 = x0.to(dtype)
        t = self.sample_t(x0.shape[0], x0.device)  # float64 [N]
        z = self.draws.randn_like(x0) * self.sigma_data
        cos_t, sin_t = column(torch.cos(t), x0), column(torch.sin(t), x0)
        x_t = cos_t * x0 + sin_t * z
        dxt_dt = self.velocity(x0, z, x_t, t, labels).to(dtype)
        devices = [x0.device] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            F_theta = self.flow(denoiser, x_t, t, labels).to(dtype)
        # fork_rng restored the state: the tangent pass draws the same dropout mask.
        dF = self.flow_tangent(denoiser, x_t, t, dxt_dt, labels).to(dtype)
        F_minus = F_theta.detach()
        r = self.warmup(step)
        g = self.normalize(self.tangent_target(F_minus, dF, x_t, t, dxt_dt, r))
        mse = (F_theta - F_minus - g).pow(2).flatten(1).mean(1)  # ||.||^2 / D
        weight = 1 / (self.sigma_data * torch.tan(t)).to(dtype) if self.prior_weighting else 1.0
        if self.weight_head is None:
            loss = weight * mse
        else:
            logvar = self.weight_head(t).to(dtype)
            loss = weight * torch.exp(-logvar) * mse + logvar
        self._last = {"tangent_warmup": r, "unweighted_loss": float(mse.detach().mean())}
        return loss

    def metrics(self) -> dict[str, float]:
        """The tangent warm-up ``r`` and the mean unweighted ``||F - F- - g||^2 / D``."""
        return dict(self._last)


class ContinuousConsistencyTraining(ContinuousConsistency):
    """Lu & Song 2024, sCT: ``dx_t/dt = cos t z - sin t x0``, the conditional velocity.

    Args:
        init_from: a denoiser whose network starts the model (e.g. a TrigFlow diffusion model as
            a ``cm.teacher.PretrainedDenoiser``); None trains from scratch. Used once, at the
            first ``bind``, and not saved in checkpoints.
        **kwargs: the loss's options (``p_mean``, ``p_std``, ``tangent_warmup_steps``, ...), see
            ``ContinuousConsistency``.
    """

    def __init__(
        self,
        init_from: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # A plain list: nn.Module would register it (checkpoints, DDP buckets, .to()).
        self._init_from = [init_from] if init_from is not None else []

    def bind(self, denoiser: nn.Module) -> None:
        """Start the model from ``init_from`` (once)."""
        if self._init_from:
            init_from_teacher(denoiser, self._init_from.pop())

    def velocity(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, labels: Tensor | None):
        """sCT: ``dx_t/dt = cos t z - sin t x0`` (Lu & Song 2024, Eq. 6 with ``x0`` known)."""
        return column(torch.cos(t), x0) * z - column(torch.sin(t), x0) * x0


class ContinuousConsistencyDistillation(ContinuousConsistency):
    """Lu & Song 2024, sCD: ``dx_t/dt = sigma_d F_teacher(x_t, t)``, the teacher's PF-ODE.

    The teacher is any denoiser (an EDM or TrigFlow diffusion model, an exact ``cm.oracle``
    mixture), read in TrigFlow's variables; with ``guidance_scale != 1`` its classifier-free
    guided velocity (guidance is affine in ``D``, so guiding ``F`` is guiding ``D``).

    Args:
        teacher: the frozen diffusion denoiser ``D(x, sigma, labels)``; kept in eval mode.
        guidance_scale: classifier-free guidance scale of the teacher (1: none).
        init_from_teacher: copy the teacher's network into the student (same architecture and
            noise conditioning required).
        **kwargs: the loss's options (``p_mean``, ``p_std``, ``tangent_warmup_steps``, ...), see
            ``ContinuousConsistency``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        guidance_scale: float = 1.0,
        init_from_teacher: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.teacher = teacher.requires_grad_(False).eval()
        self.guidance_scale, self.init_from_teacher = guidance_scale, init_from_teacher
        self._bound = False

    def bind(self, denoiser: nn.Module) -> None:
        """Initialise the student from the teacher (``init_from_teacher``), once."""
        if self.init_from_teacher and not self._bound:
            init_from_teacher(denoiser, self.teacher)
        self._bound = True

    @torch.no_grad()
    def velocity(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, labels: Tensor | None):
        """sCD: the teacher's ``sigma_d F_teacher(x_t, t)``, float32 or better, autocast off.

        Guided as Ho & Salimans 2022, Eq. 6 on ``F``: ``F_u + s (F_c - F_u)``, all-zero labels
        meaning "no class" as ``cm.guidance``.
        """
        teacher = unwrap_denoiser(self.teacher)  # a PretrainedDenoiser's precond: exact scalings
        with torch.autocast(x_t.device.type, enabled=False):
            F_c = trigflow_flow(teacher, x_t, t, labels, self.sigma_data)
            if self.guidance_scale != 1 and labels is not None:
                F_u = trigflow_flow(teacher, x_t, t, torch.zeros_like(labels), self.sigma_data)
                F_c = F_u + self.guidance_scale * (F_c - F_u)
        return self.sigma_data * F_c
