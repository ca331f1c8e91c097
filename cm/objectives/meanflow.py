"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"), Alg. 1.

In flow matching's variables (``cm.flowmap``): ``z_t = (1 - t) x0 + t eps``, ``v = eps - x0``.
The network's average velocity ``u_theta(z_t, r, t)`` is trained towards the MeanFlow identity
``u_tgt = v - (t - r)(v d_z u_theta + d_t u_theta)`` (Eq. 8-10), the total derivative being one
JVP with tangents ``(v, 0, 1)`` on ``(z, r, t)``, under stop-gradient; the loss is
``||u_theta - sg(u_tgt)||^2`` with the adaptive weight ``1 / sg(||.||^2 + c)^p`` (Sec. 4.3).
Classifier-free guidance is folded into the target (Sec. 4.2, Eq. 13-21 with ``kappa``).
"""

from typing import Literal

import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.flowmap import fm_sigma
from cm.objectives.base import Objective, drop_labels, unwrap_denoiser
from cm.objectives.jvp import Tangent, TangentPrecision, tangent
from cm.solvers.rk import column

TimePairs = Literal["sorted", "clipped"]


class MeanFlow(Objective):
    """Geng et al. 2025, Alg. 1: ``||u_theta(z_t, r, t) - sg(v - (t - r) du/dt)||^2`` per sample.

    ``t`` and ``r`` are logit-normal (``sigmoid(N(p_mean, p_std^2))``); a fraction
    ``1 - ratio`` of the pairs has ``r = t`` (plain flow matching). ``time_pairs="sorted"`` is the
    paper's sampler (py-meanflow ``v0``: ``t = max``, ``r = min``, then ``r = t`` with
    probability ``1 - ratio``), ``"clipped"`` py-meanflow's ``v1`` (``r = t`` with probability
    ``1 - ratio``, then ``r = min(r, t)``), which allows separate laws for ``t`` and ``r``. The
    tangent is ``cm.objectives.jvp.tangent`` on the unwrapped flow map without gradients; the
    gradient pass is the ordinary call. The velocity is the conditional ``eps - x0`` (the paper)
    or, with a ``teacher``, its marginal PF-ODE velocity ``(z_t - D(x, sigma)) / t`` (MeanFlow
    distillation): then the target of the exact flow map is exactly its average velocity.

    Args:
        p_mean_t: mean of ``logit(t)`` (-0.4 ImageNet 256; CIFAR-10 -2.0 ``sorted``, -0.6
            ``clipped``).
        p_std_t: standard deviation of ``logit(t)`` (1.0 ImageNet 256; 2.0 / 1.6 CIFAR-10).
        p_mean_r: mean of ``logit(r)``; None: ``p_mean_t`` (-4.0 for CIFAR-10 ``clipped``).
        p_std_r: standard deviation of ``logit(r)``; None: ``p_std_t``.
        ratio: probability that ``r != t`` (0.25 ImageNet 256, 0.75 CIFAR-10).
        time_pairs: ``"sorted"`` (paper, py-meanflow v0) or ``"clipped"`` (py-meanflow v1).
        norm_p: power ``p`` of the adaptive weight (1.0 ImageNet 256, 0.75 CIFAR-10).
        norm_eps: ``c`` of the adaptive weight (1e-3).
        p_uncond: probability of dropping a label (0.1 with guidance, as the paper).
        guidance_scale: ``omega`` of the guided velocity
            ``omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | empty)``; None
            trains without guidance (1.0 with ``kappa = 0`` is the same).
        guidance_mixing: ``kappa`` (0.92 for DiT-XL/2 with ``omega = 0.2``).
        guidance_interval: ``[t_min, t_max]`` where guidance applies (``[0, 0.75]`` for XL/2);
            elsewhere, and for dropped labels, the velocity is ``v``.
        teacher: a frozen diffusion denoiser or ``cm.oracle`` mixture whose PF-ODE velocity
            replaces ``eps - x0`` (distillation); None trains from data as the paper.
        tangent: ``"jvp"`` or the ``"finite_difference"`` fallback (``cm.objectives.jvp``).
        epsilon: step of the finite difference.
        tangent_precision: ``"float32"`` turns autocast off for the tangent pass (FastGen's
            ``precision_amp_jvp`` on ImageNet 256).
    """

    def __init__(
        self,
        p_mean_t: float = -0.4,
        p_std_t: float = 1.0,
        p_mean_r: float | None = None,
        p_std_r: float | None = None,
        ratio: float = 0.25,
        time_pairs: TimePairs = "sorted",
        norm_p: float = 1.0,
        norm_eps: float = 1e-3,
        p_uncond: float = 0.0,
        guidance_scale: float | None = None,
        guidance_mixing: float = 0.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        teacher: nn.Module | None = None,
        tangent: Tangent = "jvp",
        epsilon: float = 1e-3,
        tangent_precision: TangentPrecision = "autocast",
    ) -> None:
        super().__init__()
        if not 0 <= ratio <= 1 or not 0 <= p_uncond < 1 or norm_eps <= 0 or epsilon <= 0:
            raise UserError(
                "MeanFlow needs ratio in [0, 1], p_uncond in [0, 1), and positive norm_eps and "
                "epsilon; fix the objective's init_args."
            )
        self.p_mean_t, self.p_std_t = p_mean_t, p_std_t
        self.p_mean_r = p_mean_t if p_mean_r is None else p_mean_r
        self.p_std_r = p_std_t if p_std_r is None else p_std_r
        self.ratio, self.time_pairs = ratio, time_pairs
        self.norm_p, self.norm_eps, self.p_uncond = norm_p, norm_eps, p_uncond
        self.guidance_scale, self.guidance_mixing = guidance_scale, guidance_mixing
        self.guidance_interval = tuple(guidance_interval)
        self.teacher = None if teacher is None else teacher.requires_grad_(False).eval()
        self.tangent, self.epsilon, self.tangent_precision = tangent, epsilon, tangent_precision
        self._last: dict[str, float] = {}

    def sample_tr(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Sec. 4.3: logit-normal ``(t, r)``, ``r <= t``, ``r = t`` w.p. ``1 - ratio``; float64."""
        t = torch.sigmoid(self.draws.randn(n, device).double() * self.p_std_t + self.p_mean_t)
        r = torch.sigmoid(self.draws.randn(n, device).double() * self.p_std_r + self.p_mean_r)
        same = self.draws.rand(n, device) >= self.ratio
        match self.time_pairs:
            case "sorted":
                t, r = torch.maximum(t, r), torch.minimum(t, r)
                r = torch.where(same, t, r)
            case "clipped":
                r = torch.minimum(torch.where(same, t, r), t)
        return t, r

    @torch.no_grad()
    def velocity(
        self, flow_map: nn.Module, x0: Tensor, eps: Tensor, z: Tensor, t: Tensor, labels
    ) -> tuple[Tensor, Tensor | None]:
        """The (guided) velocity ``v~`` ``[N, ...]`` of the target and the labels to train with."""
        if self.teacher is not None:
            teacher = unwrap_denoiser(self.teacher)
            with torch.autocast(z.device.type, enabled=False):
                sigma = fm_sigma(t)
                D = teacher(z / column(1 - t, z).to(z.dtype), sigma.to(z.dtype), labels)
            v = (z - D.to(z.dtype)) / column(t, z).to(z.dtype)
        else:
            v = eps - x0
        dropped = labels
        if self.training and labels is not None and self.p_uncond > 0:
            dropped = drop_labels(labels, self.p_uncond, self.draws)
        if self.guidance_scale is None or labels is None:
            return v, dropped
        omega, kappa = self.guidance_scale, self.guidance_mixing
        u_null = flow_map.average_velocity(z, t, t, torch.zeros_like(labels))
        v_guided = omega * v + (1 - omega - kappa) * u_null
        if kappa:
            v_guided = v_guided + kappa * flow_map.average_velocity(z, t, t, labels)
        lo, hi = self.guidance_interval
        keep = (t >= lo) & (t <= hi)
        if dropped is not None:  # a dropped label trains the unconditional u towards v
            keep = keep & (dropped.flatten(1).abs().sum(1) > 0)
        keep = keep.reshape(-1, *[1] * (v.ndim - 1))
        return torch.where(keep, v_guided.to(v.dtype), v), dropped

    def forward(
        self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None, step: int, total_steps: int
    ) -> Tensor:
        """Per-sample MeanFlow loss ``[N]`` (Alg. 1) at training ``step``."""
        flow_map = unwrap_denoiser(denoiser)
        if not hasattr(flow_map, "average_velocity"):
            raise UserError(
                "MeanFlow trains a flow map: set model.init_args.denoiser to "
                "cm.flowmap.MeanFlowPrecond (with a network built with second_time: true)."
            )
        dtype = torch.promote_types(x0.dtype, torch.float32)
        x0 = x0.to(dtype)
        t, r = self.sample_tr(x0.shape[0], x0.device)
        eps = self.draws.randn_like(x0)
        z = column(1 - t, x0).to(dtype) * x0 + column(t, x0).to(dtype) * eps
        v, labels = self.velocity(flow_map, x0, eps, z, t, labels)
        devices = [x0.device] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            u = flow_map.average_velocity(z, t, r, labels).to(dtype)
        # fork_rng restored the state: the tangent pass draws the same dropout mask.

        def u_fn(z_: Tensor, t_: Tensor, r_: Tensor) -> Tensor:
            return flow_map.average_velocity(z_, t_, r_, labels)

        primals, tangents = (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r))
        du_dt = tangent(u_fn, primals, tangents, self.tangent, self.epsilon, self.tangent_precision)
        u_tgt = v - column(t - r, v).to(dtype) * du_dt.to(dtype)  # Eq. 10, no gradient
        sq = (u - u_tgt).pow(2).flatten(1).sum(1)  # ||u - sg(u_tgt)||^2
        weight = (sq.detach() + self.norm_eps).pow(-self.norm_p)  # Sec. 4.3, adaptive
        self._last = {"mse": float(sq.detach().mean()) / x0[0].numel()}
        return weight * sq

    def metrics(self) -> dict[str, float]:
        """The batch's mean ``||u - u_tgt||^2 / D`` (unweighted)."""
        return dict(self._last)
