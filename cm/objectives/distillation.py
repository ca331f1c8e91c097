"""Consistency distillation: CD (Song et al. 2023, Alg. 2) from a frozen diffusion teacher."""

from typing import Literal

import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.objectives.base import init_from_teacher
from cm.objectives.consistency import ConsistencyObjective
from cm.objectives.distances import SquaredL2
from cm.solvers.rk import euler_step, heun_step


class ConsistencyDistillation(ConsistencyObjective):
    """Song et al. 2023, Alg. 2: ``lambda(t_n) d(f_theta(x_{t_{n+1}}), f_theta-(x^_{t_n}))``.

    ``x_{t_{n+1}} = x0 + t_{n+1} z`` and ``x^_{t_n}`` is one Euler or Heun step of the teacher's
    PF-ODE from ``t_{n+1}`` to ``t_n`` (Eq. 6, ``cm.solvers.rk``), in float32 without gradients;
    the teacher gets the student's labels. ``n ~ U{1..N-1}`` over the fixed boundaries
    ``ct_boundaries(N)``; the target theta- is an EMA of the student with a constant ``mu`` (0.95
    ImageNet-64/LSUN; 0 on CIFAR-10, i.e. theta- = stop-grad(theta)). The online and target calls
    share one dropout mask (``ConsistencyObjective``).

    Args:
        teacher: the frozen denoiser ``D(x, sigma, labels)``, e.g. ``cm.io.PretrainedDenoiser``
            or an exact ``cm.oracle`` mixture; kept in eval mode.
        distance: ``d(x, y) -> [N]``: ``SquaredL2`` (default), ``L1``, ``PseudoHuber``, ``LPIPS``.
        num_scales: N, the number of boundaries (18 CIFAR-10, 40 ImageNet-64/LSUN).
        mu: the target EMA decay; 0 uses the stop-gradient online network.
        solver: the teacher's ODE step, ``"heun"`` (paper) or ``"euler"``.
        weighting: ``"uniform"`` (lambda = 1, paper) or ``"icm"`` (lambda = 1 / (t_{n+1} - t_n)).
        index_sampling: ``"uniform"`` n ~ U{1..N-1} (paper) or iCT's ``"lognormal"``.
        init_from_teacher: copy the teacher's network into the student before training (as
            openai/consistency_models' ``cm_train.py``); both must have the same architecture.
        sigma_min: the boundary ``epsilon``.
        sigma_max: the largest time ``T``.
        rho: Karras discretisation exponent.
    """

    def __init__(
        self,
        teacher: nn.Module,
        distance: nn.Module | None = None,
        num_scales: int = 18,
        mu: float = 0.0,
        solver: Literal["euler", "heun"] = "heun",
        weighting: Literal["uniform", "icm"] = "uniform",
        index_sampling: Literal["uniform", "lognormal"] = "uniform",
        init_from_teacher: bool = True,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
    ) -> None:
        if num_scales < 2:
            raise UserError(f"num_scales must be at least 2 (one interval), got {num_scales}.")
        if not 0 <= mu < 1:
            raise UserError(f"mu must be in [0, 1), got {mu}.")
        distance = distance if distance is not None else SquaredL2()
        super().__init__(
            distance, weighting, index_sampling, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho
        )
        self.teacher = teacher.requires_grad_(False).eval()
        self.N, self.mu, self.solver = num_scales, mu, solver
        self.init_from_teacher = init_from_teacher

    def bind(self, denoiser: nn.Module) -> None:
        """Initialise the student from the teacher (``init_from_teacher``), then copy theta-."""
        if self.init_from_teacher and self.target is None:
            init_from_teacher(denoiser, self.teacher)
        super().bind(denoiser)

    def num_scales(self, step: int, total_steps: int) -> int:
        """N: fixed for CD (Song et al. 2023, Table 3)."""
        return self.N

    def ema_decay(self, step: int, total_steps: int) -> float:
        """mu: constant for CD (Song et al. 2023, Alg. 2)."""
        return self.mu

    @torch.no_grad()
    def teacher_step(
        self, x: Tensor, sigma: Tensor, sigma_next: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """Song et al. 2023, Eq. 6: one teacher ODE step ``sigma -> sigma_next`` (``[N]`` each).

        Runs in (at least) float32 with autocast off, whatever the training precision.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            x, sigma, sigma_next = x.to(dtype), sigma.to(dtype), sigma_next.to(dtype)
            match self.solver:
                case "euler":
                    return euler_step(self.teacher, x, sigma, sigma_next, labels)
                case "heun":
                    return heun_step(self.teacher, x, sigma, sigma_next, labels)

    def target_input(
        self,
        x0: Tensor,
        z: Tensor,
        x_next: Tensor,
        t_cur: Tensor,
        t_next: Tensor,
        labels: Tensor | None,
    ) -> Tensor:
        """``x^_{t_n}``: the teacher's step from ``x_{t_{n+1}}``, in ``x0``'s dtype."""
        return self.teacher_step(x_next, t_next, t_cur, labels).to(x0.dtype)
