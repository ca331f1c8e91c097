"""Easy consistency tuning: ECT (Geng et al. 2024, "Consistency Models Made Easy").

A diffusion model is the consistency model of the limit ``r -> 0`` (its target is ``x0``): ECT
starts from one and tunes it with continuous-time consistency training whose gap ``t - r`` shrinks
by ``q`` every ``double`` steps, so the loss moves from denoising towards the consistency condition.
Reference: locuslab/ect, ``training/loss.py`` (``ECMLoss``) and ``training/ct_training_loop.py``.
"""

from typing import Literal

import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.objectives.base import init_from_teacher
from cm.objectives.consistency import ConsistencyObjective
from cm.objectives.distances import PseudoHuber
from cm.solvers.rk import column


class ConsistencyTuning(ConsistencyObjective):
    """Geng et al. 2024, Sec. 3: ``d(f_theta(x0 + t n, t), sg f_theta(x0 + r n, r)) / (t - r)``.

    ``ln t ~ N(p_mean, p_std^2)``; ``r = r(t, stage)`` (``r``), ``stage = step // double``, a pure
    function of the training step, so a resumed run continues the schedule exactly. One noise
    ``n`` gives both ``x_t`` and ``x_r``; the target is the trained network itself under no grad
    with the online call's dropout mask (no EMA target), and ``x0`` where ``r = 0``. The weighting
    is ``1 / (t - r)`` and the default distance ECT's ``||x - y||_2`` (``PseudoHuber(c=0)``; a
    ``c > 0`` is the reference's ``-c`` option, over the whole image as there). Every per-sample
    draw comes from ``self.draws``, so DDP ranks draw what one process draws for the whole batch.

    Args:
        init_from: the diffusion model whose network starts the consistency model (ECT's tuning),
            e.g. a ``cm.teacher.PretrainedDenoiser`` of a cm export or of EDM's published file;
            both preconditioners must feed the network the same ``c_noise``. Copied once, at
            ``bind``, and then dropped: it is never in ``state_dict`` or a checkpoint. None
            trains from the student's own initialisation.
        distance: ``d(x, y) -> [N]``; None is ``PseudoHuber(c=0.0)``, the l2 norm.
        p_mean: mean of ``ln t`` (reference ``--mean``).
        p_std: standard deviation of ``ln t`` (reference ``--std``).
        q: ``t - r`` shrinks by ``q`` every stage (reference ``-q``); must exceed 1.
        k: ``n(t) = 1 + k sigmoid(-b t)`` widens the gap at small ``t`` (reference ``-k``).
        b: the sigmoid's slope in ``t`` (reference ``-b``).
        double: optimizer steps per stage. The reference counts ticks: ``--double`` ticks of
            ``--tick`` kimg, e.g. 250 ticks of 12.8 kimg at batch 128 are 25000 steps.
        mapping: ``"sigmoid"`` (``n(t)`` above) or ``"const"`` (``n(t) = 1``), reference
            ``--mapping``.
    """

    def __init__(
        self,
        init_from: nn.Module | None = None,
        distance: nn.Module | None = None,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        double: int = 25000,
        mapping: Literal["sigmoid", "const"] = "sigmoid",
    ) -> None:
        if q <= 1:
            raise UserError(f"ECT's q must be greater than 1 (t - r shrinks by q), got {q}.")
        if double < 1:
            raise UserError(f"ECT's double must be a positive number of steps, got {double}.")
        distance = distance if distance is not None else PseudoHuber(c=0.0)
        super().__init__(distance, weighting="icm", p_mean=p_mean, p_std=p_std)
        # A plain list: nn.Module would register it (checkpoints, DDP buckets, .to()).
        self._init_from = [init_from] if init_from is not None else []
        self.q, self.k, self.b, self.double, self.mapping = q, k, b, double, mapping

    def bind(self, denoiser: nn.Module) -> None:
        """Geng et al. 2024, Sec. 3: start from ``init_from``'s network (once, then drop it)."""
        if self._init_from:
            init_from_teacher(denoiser, self._init_from.pop())
        super().bind(denoiser)

    def ema_decay(self, step: int, total_steps: int) -> float:
        """0: the target is the stop-gradient online network (Geng et al. 2024, Sec. 3)."""
        return 0.0

    def stage(self, step: int) -> int:
        """Geng et al. 2024, Sec. 3: the stage ``step // double`` of the shrinking ``t - r``."""
        return step // self.double

    def r(self, t: Tensor, stage: int) -> Tensor:
        """Geng et al. 2024, Sec. 3: ``r = max(t (1 - n(t) / q^(stage+1)), 0)``, ``t`` ``[N]``."""
        match self.mapping:
            case "sigmoid":
                n_t = 1 + self.k * torch.sigmoid(-self.b * t)
            case "const":
                n_t = torch.ones_like(t)
        decay = self.q ** -(stage + 1)  # 1 / q^(stage+1); underflows to 0, never overflows
        return (t * (1 - n_t * decay)).clamp(min=0)

    def forward(
        self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None, step: int, total_steps: int
    ) -> Tensor:
        """Per-sample ECT loss ``[N]`` at training ``step`` (``total_steps`` is unused)."""
        stage, size = self.stage(step), x0.shape[0]
        # The whole step's batch, so that every rank takes the branch below alike: under
        # cm.training.FSDP each network call gathers weights, a collective of all ranks.
        ln_t = self.draws.randn(size, x0.device, whole=True).double() * self.p_std + self.p_mean
        t_all = ln_t.exp()  # float64 [total]
        r_all = self.r(t_all, stage)
        t, r = self.draws.local(t_all, size), self.draws.local(r_all, size)  # [N]
        n = self.draws.randn_like(x0)  # one noise for x_t and x_r
        x_t, x_r = x0 + column(t, x0) * n, x0 + column(r, x0) * n
        if bool((r_all > 0).any()):
            f_t, f_r = self.online_and_target(denoiser, x_t, t, x_r, r, labels)
            # where, not a masked sum: the r = 0 rows' network output never enters the target.
            keep = (r > 0).view(-1, *[1] * (x0.ndim - 1))
            f_r = torch.where(keep, f_r.to(x0.dtype), x0)
        else:  # every r = 0 (on every rank): the target is x0, no second call
            f_t, f_r = denoiser(x_t, t.to(x0.dtype), labels), x0
        self._last = {"stage": float(stage), "dt": (t - r).mean().item()}
        return self.weight(r, t).to(x0.dtype) * self.distance(f_t, f_r)

    def metrics(self) -> dict[str, float]:
        """The current stage and the batch's mean ``t - r`` (``dt``)."""
        return dict(self._last)
