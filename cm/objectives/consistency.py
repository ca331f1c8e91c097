"""Consistency training: CT (Song et al. 2023, Alg. 3) and improved CT (Song & Dhariwal 2023).

``ConsistencyObjective`` holds what CT and CD (``cm.objectives.distillation``) share: the
boundaries ``t_1 < ... < t_N``, the index sampling, the weighting ``lambda``, the online/target pair
of calls with one dropout mask, and the target network theta- with its EMA update.
"""

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from cm.ema import lerp_
from cm.objectives.base import Objective, init_from_teacher
from cm.objectives.distances import PseudoHuber
from cm.schedules import (
    ct_boundaries,
    ct_ema_decay,
    ct_num_scales,
    ict_num_scales,
    lognormal_index_probs,
)
from cm.solvers.rk import column


class ConsistencyObjective(Objective):
    """Song et al. 2023, Eq. 7/10: ``lambda(t_n) d(f_theta(x_{t_{n+1}}), f_theta-(x_{t_n}))``.

    Subclasses give N(k) (``num_scales``), mu(k) (``ema_decay``) and the target input ``x_{t_n}``
    (``target_input``: CT's closed-form Euler step with ``D = x0``, CD's teacher ODE step).
    A target copy theta- exists when mu > 0 at step 0; with mu = 0 the target is the
    stop-gradient online network. Both network calls share one dropout mask, as in
    openai/consistency_models.

    Args:
        distance: ``d(x, y) -> [N]``, e.g. ``PseudoHuber``, ``SquaredL2``, ``L1``, ``LPIPS``.
        weighting: ``"uniform"`` (lambda = 1) or ``"icm"`` (lambda = 1 / (t_{n+1} - t_n)).
        index_sampling: ``"uniform"`` n ~ U{1..N-1} or iCT's ``"lognormal"``.
        p_mean: lognormal index sampling mean of ``ln(sigma)``.
        p_std: lognormal index sampling std of ``ln(sigma)``.
        sigma_min: the boundary ``epsilon``.
        sigma_max: the largest time ``T``.
        rho: Karras discretisation exponent.
        total_steps: K of a curriculum; None ties it to ``trainer.max_steps``.
    """

    def __init__(
        self,
        distance: nn.Module | None = None,
        weighting: Literal["uniform", "icm"] = "uniform",
        index_sampling: Literal["uniform", "lognormal"] = "uniform",
        p_mean: float = -1.1,
        p_std: float = 2.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        total_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.distance = distance if distance is not None else PseudoHuber()
        self.weighting, self.index_sampling = weighting, index_sampling
        self.p_mean, self.p_std = p_mean, p_std
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.total_steps = total_steps
        self.target: nn.Module | None = None
        self._last: dict[str, float] = {}

    def num_scales(self, step: int, total_steps: int) -> int:
        """N(k), the number of boundaries at training step ``step``."""
        raise NotImplementedError

    def ema_decay(self, step: int, total_steps: int) -> float:
        """mu(k) of the target network; 0 means theta- = stop-grad(theta)."""
        raise NotImplementedError

    def target_input(
        self,
        x0: Tensor,
        z: Tensor,
        x_next: Tensor,
        t_cur: Tensor,
        t_next: Tensor,
        labels: Tensor | None,
    ) -> Tensor:
        """``x_{t_n}`` from ``x_{t_{n+1}} = x0 + t_{n+1} z`` (``t`` are float64 ``[N]``)."""
        raise NotImplementedError

    def bind(self, denoiser: nn.Module) -> None:
        """Create the target network theta- as a frozen copy when mu > 0."""
        if self.ema_decay(0, 1) > 0 and self.target is None:
            self.target = copy.deepcopy(denoiser).requires_grad_(False)

    def boundaries(self, num_scales: int, device: torch.device | str | None = None) -> Tensor:
        """Song et al. 2023, Sec. 5: increasing float64 ``t_1 = epsilon < ... < t_N = T``."""
        return ct_boundaries(num_scales, self.sigma_min, self.sigma_max, self.rho).to(device)

    def sample_indices(self, t: Tensor, n: int) -> Tensor:
        """Interval indices ``i`` in ``[0, N-2]`` (pairs ``t_i < t_{i+1}``), ``[n]``."""
        match self.index_sampling:
            case "uniform":
                return self.draws.randint(0, len(t) - 1, n, t.device)
            case "lognormal":
                probs = lognormal_index_probs(t, self.p_mean, self.p_std).to(t.device)
                return self.draws.multinomial(probs, n)

    def weight(self, t_cur: Tensor, t_next: Tensor) -> Tensor:
        """lambda(t_n): 1 (Song et al. 2023) or 1 / (t_{n+1} - t_n) (Song & Dhariwal 2023)."""
        match self.weighting:
            case "uniform":
                return torch.ones_like(t_cur)
            case "icm":
                return 1 / (t_next - t_cur)

    def online_and_target(
        self,
        denoiser: nn.Module,
        x_next: Tensor,
        t_next: Tensor,
        x_cur: Tensor,
        t_cur: Tensor,
        labels: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """``f_theta(x_{t_{n+1}}, t_{n+1})`` and no-grad ``f_theta-(x_{t_n}, t_n)``, one mask."""
        devices = [x_next.device] if x_next.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            f_next = denoiser(x_next, t_next.to(x_next.dtype), labels)
        # fork_rng restored the state: the target call below draws the same dropout mask.
        target_net = self.target if self.target is not None else denoiser
        with torch.no_grad():
            f_cur = target_net(x_cur, t_cur.to(x_next.dtype), labels)
        return f_next, f_cur.detach()

    def forward(
        self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None, step: int, total_steps: int
    ) -> Tensor:
        """Per-sample consistency loss ``[N]`` at curriculum step ``step`` of ``total_steps``."""
        total = self.total_steps or total_steps
        t = self.boundaries(self.num_scales(step, total), x0.device)
        i = self.sample_indices(t, x0.shape[0])
        t_cur, t_next = t[i], t[i + 1]  # float64 [N]
        weight = self.weight(t_cur, t_next)
        z = self.draws.randn_like(x0)
        x_next = x0 + column(t_next, x0) * z
        x_cur = self.target_input(x0, z, x_next, t_cur, t_next, labels)
        f_next, f_cur = self.online_and_target(denoiser, x_next, t_next, x_cur, t_cur, labels)
        self._last = {"num_scales": float(len(t)), "target_ema": self.ema_decay(step, total)}
        return weight.to(x0.dtype) * self.distance(f_next, f_cur)

    @torch.no_grad()
    def after_optimizer_step(self, denoiser: nn.Module, step: int, total_steps: int) -> None:
        """theta- <- stopgrad(mu theta- + (1 - mu) theta) (Song et al. 2023, Alg. 2-3)."""
        if self.target is None:
            return
        mu = self.ema_decay(step, self.total_steps or total_steps)
        lerp_(self.target, denoiser, 1 - mu)

    def metrics(self) -> dict[str, float]:
        """The current N(k) and mu(k)."""
        return dict(self._last)


class ConsistencyTraining(ConsistencyObjective):
    """Song et al. 2023, Alg. 3 (CT) and Song & Dhariwal 2023 (iCT) in one objective.

    ``loss = lambda(t_n) d(f_theta(x0 + t_{n+1} z, t_{n+1}), f_theta-(x0 + t_n z, t_n))``. The
    target input ``x0 + t_n z`` is the Euler step of the PF-ODE from ``t_{n+1}`` with the
    one-sample estimate ``D = x0`` (Song et al. 2023, Eq. 9), written in closed form. Both network
    calls share one dropout mask, as in openai/consistency_models.

    CT: ``curriculum="ct"`` (N(k) grows as a square root), target EMA ``mu(k)`` from ``mu0``,
    ``weighting="uniform"``, ``index_sampling="uniform"``, any distance (l2, l1, LPIPS).
    iCT: ``curriculum="ict"`` (N(k) doubles, Eq. 8), ``mu0=0`` (target = stop-grad online network),
    pseudo-Huber distance, ``weighting="icm"`` (lambda = 1 / (t_{n+1} - t_n)) and lognormal index
    sampling (Eq. 9).

    Args:
        distance: ``d(x, y) -> [N]``, e.g. ``PseudoHuber``, ``SquaredL2``, ``L1``, ``LPIPS``.
        curriculum: ``"ct"`` or ``"ict"`` discretisation schedule N(k).
        s0: initial number of discretisation steps.
        s1: final number of discretisation steps.
        total_steps: K of the curriculum; None ties it to ``trainer.max_steps``.
        mu0: target EMA at the start (CT); 0 uses the stop-gradient online network (iCT).
        weighting: ``"uniform"`` (lambda = 1) or ``"icm"`` (lambda = 1 / (t_{n+1} - t_n)).
        index_sampling: ``"uniform"`` n ~ U{1..N-1} or iCT's ``"lognormal"``.
        p_mean: lognormal index sampling mean of ``ln(sigma)``.
        p_std: lognormal index sampling std of ``ln(sigma)``.
        sigma_min: the boundary ``epsilon``.
        sigma_max: the largest time ``T``.
        rho: Karras discretisation exponent.
        openai_compat: with ``curriculum="ct"``, compute mu(k) as openai/consistency_models does.
        init_from: a denoiser whose network starts the student (and theta-), e.g. the EDM
            teacher as a ``cm.io.PretrainedDenoiser``: openai/consistency_models' ``launch.sh``
            passes ``--teacher_model_path`` to its CT runs and ``cm_train.py`` copies the teacher
            into the model. None (default): from scratch, as the paper's CT (Song et al. 2023,
            Sec. 5: CT needs no pre-trained diffusion model). Used once, at the first ``bind``;
            held outside ``state_dict`` so checkpoints do not carry it.
    """

    def __init__(
        self,
        distance: nn.Module | None = None,
        curriculum: Literal["ct", "ict"] = "ict",
        s0: int = 10,
        s1: int = 1280,
        total_steps: int | None = None,
        mu0: float = 0.0,
        weighting: Literal["uniform", "icm"] = "icm",
        index_sampling: Literal["uniform", "lognormal"] = "lognormal",
        p_mean: float = -1.1,
        p_std: float = 2.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        openai_compat: bool = False,
        init_from: nn.Module | None = None,
    ) -> None:
        super().__init__(distance, weighting, index_sampling, p_mean, p_std)
        # A plain list: nn.Module would register it (checkpoints, DDP buckets, .to()).
        self._init_from = [init_from] if init_from is not None else []
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.total_steps = total_steps
        self.curriculum, self.s0, self.s1, self.mu0 = curriculum, s0, s1, mu0
        self.openai_compat = openai_compat

    def bind(self, denoiser: nn.Module) -> None:
        """Start the student from ``init_from`` (once, before theta- is copied from it)."""
        if self._init_from and self.target is None:
            init_from_teacher(denoiser, self._init_from[0])
        super().bind(denoiser)

    def num_scales(self, step: int, total_steps: int) -> int:
        """N(k): CT's square-root or iCT's exponential curriculum."""
        match self.curriculum:
            case "ct":
                return ct_num_scales(step, total_steps, self.s0, self.s1)
            case "ict":
                return ict_num_scales(step, total_steps, self.s0, self.s1)

    def ema_decay(self, step: int, total_steps: int) -> float:
        """mu(k) of the target network; 0 means theta- = stop-grad(theta)."""
        if self.mu0 == 0 or self.curriculum == "ict":
            return self.mu0
        return ct_ema_decay(step, total_steps, self.s0, self.s1, self.mu0, self.openai_compat)

    def target_input(
        self,
        x0: Tensor,
        z: Tensor,
        x_next: Tensor,
        t_cur: Tensor,
        t_next: Tensor,
        labels: Tensor | None,
    ) -> Tensor:
        """Song et al. 2023, Eq. 9: the Euler step with ``D = x0`` is ``x0 + t_n z``, exactly."""
        return x0 + column(t_cur, x0) * z
