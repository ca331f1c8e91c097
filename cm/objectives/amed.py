"""AMED training (Zhou et al. 2024, Sec. 4.2, Alg. 2): match a finer teacher, interval by interval.

The denoiser is frozen; the teacher solves the ODE from the same noise on the same schedule family
with ``M`` extra points in each interval, and the loss of interval ``n`` is the squared L2 distance
between the student's ``x_{n+1}`` (``cm.solvers.amed.amed_interval``) and the teacher's point.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.protocols import Denoiser
from cm.schedules import schedule_sigmas
from cm.solvers.amed import Point, StepPredictor, amed_interval, positive_grid
from cm.solvers.rk import heun


class AMEDDistillation(nn.Module):
    """Zhou et al. 2024, Eq. 12: ``||x_{n+1}^student - x_{n+1}^teacher||^2`` per interval.

    Args:
        teacher_solver: any ``cm.solvers`` ODE solver; it runs on the ``M + 1`` substeps of each
            student interval (a multistep teacher restarts its history at each student point).
        teacher_substeps: ``M``, points inserted between two student points (the paper's 1 for
            Heun, 2 for iPNDM on CIFAR-10; larger is closer to the exact ODE solution).
        teacher_forcing: start each interval from the teacher's point (diff-sampler does for
            one-step students: AMED-Solver, Euler); None: on for those, off for multistep ones,
            which continue from their own output with their history.
    """

    def __init__(
        self,
        teacher_solver: Callable[..., Tensor] = heun,
        teacher_substeps: int = 1,
        teacher_forcing: bool | None = None,
    ) -> None:
        super().__init__()
        if teacher_substeps < 0:
            raise UserError(f"teacher_substeps (M) must be >= 0, got {teacher_substeps}.")
        self.teacher_solver, self.M = teacher_solver, teacher_substeps
        self.teacher_forcing = teacher_forcing

    def forcing(self, predictor: StepPredictor) -> bool:
        """Whether interval ``n + 1`` starts from the teacher's ``x_{n+1}``."""
        if self.teacher_forcing is not None:
            return self.teacher_forcing
        return predictor.solver in ("amed", "euler")

    def teacher_grid(self, predictor: nn.Module) -> list[float]:
        """The ``(M + 1)(N - 1) + 1`` teacher points; every ``(M + 1)``-th is a student point."""
        fine = (self.M + 1) * (predictor.num_steps - 1) + 1
        p = predictor
        return positive_grid(schedule_sigmas(p.schedule, fine, p.sigma_min, p.sigma_max, p.rho))

    @torch.no_grad()
    def targets(
        self, denoiser: Denoiser, predictor: nn.Module, x: Tensor, labels: Tensor | None
    ) -> list[Tensor]:
        """The teacher's ``x`` at each student point after the first (``N - 1`` tensors)."""
        fine, out = self.teacher_grid(predictor), []
        for n in range(predictor.num_steps - 1):
            sub = torch.tensor(fine[n * (self.M + 1) : (n + 1) * (self.M + 1) + 1])
            x = self.teacher_solver(denoiser, x, sub, labels)
            out.append(x)
        return out

    def forward(
        self,
        denoiser: Denoiser,
        predictor: StepPredictor,
        tap: object,
        x: Tensor,
        n: int,
        target: Tensor,
        labels: Tensor | None = None,
        hist: list[Point] | None = None,
    ) -> tuple[Tensor, Tensor, list[Point], tuple[Tensor, ...]]:
        """Loss ``[N]`` (sum over pixels) of interval ``n``; ``x_{n+1}``, history, ``(r, c, a)``."""
        grid = predictor.grid().tolist()
        x_next, hist, rca = amed_interval(
            denoiser, predictor, tap, x, grid[n], grid[n + 1], labels, hist, first=n == 0
        )
        loss = (x_next - target).pow(2).flatten(1).sum(1)
        return loss, x_next, hist, rca
