"""Progressive distillation (Salimans & Ho 2022, Alg. 2) in EDM coordinates ``x = x0 + sigma n``.

A student with ``N`` DDIM steps learns to match a teacher with ``2N`` steps on the cosine grid
(``cm.schedules.cosine_sigmas``; the ``2N``-step grid contains the ``N``-step grid). DDIM with
``eta = 0`` in EDM form is ``x' = x0_hat + (sigma'/sigma) (x - x0_hat)``, Euler on the PF-ODE
(``cm.solvers.rk.euler_step``). The student's target ``x0~`` is the x0-prediction whose single
step from ``sigma_i`` lands where the teacher's two steps ``sigma_i -> sigma_{i+1/2} ->
sigma_{i+1}`` land. One round is one ``cm fit``; ``scripts/progressive_distillation.py`` chains
rounds, halving ``N`` and making each round's exported student the next round's teacher.
"""

from typing import Literal

import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.objectives.base import Objective, copy_net_weights
from cm.schedules import cosine_sigmas
from cm.solvers.rk import column, euler_step


def pd_target(x: Tensor, x_teacher: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Salimans & Ho 2022, Alg. 2: ``x0~ = (x'' - (sigma'/sigma) x) / (1 - sigma'/sigma)``.

    Solves ``x'' = x0~ + (sigma'/sigma)(x - x0~)`` (one DDIM step) for ``x0~``; ``sigma' = 0``
    gives ``x0~ = x''``. The paper's ``(z'' - (s''/s) z) / (a'' - (s''/s) a)`` divided by ``a''``.

    Args:
        x: the noisy input ``[N, C, H, W]`` at ``sigma``.
        x_teacher: the teacher's two-step result ``x''`` at ``sigma_next``.
        sigma: ``[N]`` current noise levels ``sigma_i > 0``.
        sigma_next: ``[N]`` student-grid next noise levels ``sigma_{i+1} < sigma_i``.
    """
    r = sigma_next.to(torch.float64) / sigma.to(torch.float64)  # [N], in [0, 1)
    return (x_teacher - column(r, x) * x) / column(1 - r, x)


class ProgressiveDistillation(Objective):
    """Salimans & Ho 2022, Alg. 2: distil a ``2N``-step DDIM teacher into an ``N``-step student.

    Per sample ``i ~ U{0..N-1}``, ``x = x0 + sigma_i z``; the frozen teacher takes two DDIM
    steps (no grad, float32) to ``x''`` at ``sigma_{i+1}``; the loss is ``lambda(sigma_i)
    ||D_student(x, sigma_i) - x0~||^2`` averaged over dimensions, with ``x0~`` from ``pd_target``
    and ``SNR = 1 / sigma^2`` in EDM coordinates (Sec. 4: "truncated SNR" ``max(SNR, 1)`` or
    "SNR+1", i.e. v-prediction's MSE).

    Args:
        teacher: the frozen ``2N``-step denoiser, e.g. ``cm.io.PretrainedDenoiser`` of the previous
            round's export; its parameters are never trained.
        student_steps: ``N``, the student's number of DDIM steps (the teacher takes ``2N``).
        sigma_max: top of the cosine grid; the paper's schedule is unbounded at ``t = 1``, so it
            is truncated here (EDM's 80).
        weighting: ``"truncated_snr"`` (``max(1/sigma^2, 1)``, the paper's choice) or ``"snr+1"``
            (``1/sigma^2 + 1``).
        init_from_teacher: start the student from the teacher's network weights (each round
            starts from the previous round's student, as in the paper).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student_steps: int = 1,
        sigma_max: float = 80.0,
        weighting: Literal["truncated_snr", "snr+1"] = "truncated_snr",
        init_from_teacher: bool = True,
    ) -> None:
        super().__init__()
        if student_steps < 1:
            raise UserError(f"student_steps must be at least 1, got {student_steps}.")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student_steps, self.sigma_max = student_steps, sigma_max
        self.weighting, self.init_from_teacher = weighting, init_from_teacher
        self._last: dict[str, float] = {}

    def bind(self, denoiser: nn.Module) -> None:
        """Copy the teacher's network into the student when ``init_from_teacher``."""
        if self.init_from_teacher:
            copy_net_weights(denoiser, self.teacher)

    def weight(self, sigma: Tensor) -> Tensor:
        """Salimans & Ho 2022, Sec. 4: ``lambda(sigma)`` with ``SNR = 1 / sigma^2``, ``[N]``."""
        snr = sigma.to(torch.float64).pow(-2)
        match self.weighting:
            case "truncated_snr":
                return snr.clamp(min=1)
            case "snr+1":
                return snr + 1

    def grids(self, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """The teacher's ``2N``-step and the student's ``N``-step cosine grids (float64)."""
        teacher_grid = cosine_sigmas(2 * self.student_steps, self.sigma_max).to(device)
        return teacher_grid, teacher_grid[::2]  # the 2N-step grid contains the N-step grid

    @torch.no_grad()
    def teacher_steps(
        self,
        x: Tensor,
        sigma: Tensor,
        sigma_mid: Tensor,
        sigma_next: Tensor,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Two teacher DDIM steps ``sigma -> sigma_mid -> sigma_next`` (``[N]`` each), float32."""
        # float32 even under bf16 autocast: the target divides by 1 - sigma'/sigma (small at fine
        # grids), which amplifies the teacher's rounding errors.
        with torch.autocast(x.device.type, enabled=False):
            x_mid = euler_step(self.teacher, x.to(torch.float32), sigma, sigma_mid, labels)
            return euler_step(self.teacher, x_mid, sigma_mid, sigma_next, labels)

    def target(
        self,
        x: Tensor,
        sigma: Tensor,
        sigma_mid: Tensor,
        sigma_next: Tensor,
        labels: Tensor | None = None,
    ) -> Tensor:
        """The student's x0-target ``x0~`` (Alg. 2) from two teacher steps, no grad."""
        x_teacher = self.teacher_steps(x, sigma, sigma_mid, sigma_next, labels)
        return pd_target(x.to(torch.float32), x_teacher, sigma, sigma_next)

    def forward(
        self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None, step: int, total_steps: int
    ) -> Tensor:
        """Per-sample distillation loss ``[N]`` (Salimans & Ho 2022, Alg. 2)."""
        teacher_grid, _ = self.grids(x0.device)
        n = x0.shape[0]
        i = self.draws.randint(0, self.student_steps, n, x0.device)  # student interval
        # student step sigma_i -> sigma_{i+1} is teacher steps 2i -> 2i+1 -> 2i+2; float64 [N]
        sigma, sigma_mid, sigma_next = (teacher_grid[2 * i + k] for k in range(3))
        x = x0 + column(sigma, x0) * self.draws.randn_like(x0)
        x0_tilde = self.target(x, sigma, sigma_mid, sigma_next, labels)
        D_x = denoiser(x, sigma.to(x0.dtype), labels)
        mse = (D_x - x0_tilde.to(D_x.dtype)).pow(2).flatten(1).mean(1)
        self._last = {"student_steps": float(self.student_steps)}
        return self.weight(sigma).to(mse.dtype) * mse

    def metrics(self) -> dict[str, float]:
        """The student's number of steps ``N``."""
        return dict(self._last)
