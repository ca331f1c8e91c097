"""The objective interface: ``objective(denoiser, x0, labels, step, total_steps) -> loss[N]``."""

import torch
from torch import Tensor, nn


class Objective(nn.Module):
    """A training loss of one denoiser; curricula are pure functions of ``step``.

    Objectives own what the loss needs besides the trained denoiser (a teacher, a target network)
    so it is saved in the checkpoint with them.
    """

    def train(self, mode: bool = True) -> "Objective":
        """Switch the objective's modules, keeping a frozen ``teacher`` (CD, PD) in eval mode."""
        super().train(mode)
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            teacher.eval()
        return self

    def bind(self, denoiser: nn.Module) -> None:
        """Create state that copies the trained denoiser (e.g. a target network) before training."""

    def forward(
        self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None, step: int, total_steps: int
    ) -> Tensor:
        """Per-sample loss ``[N]`` of ``denoiser`` on clean data ``x0`` at training ``step``."""
        raise NotImplementedError

    def evaluate(
        self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None, step: int, total_steps: int
    ) -> dict[str, Tensor]:
        """Held-out scalars (``cm validate``/``cm test``); by default the mean loss."""
        return {"loss": self(denoiser, x0, labels, step, total_steps).mean()}

    def after_optimizer_step(self, denoiser: nn.Module, step: int, total_steps: int) -> None:
        """Update internal state (e.g. the target EMA) after the optimizer stepped at ``step``."""

    def metrics(self) -> dict[str, float]:
        """Scalars worth logging from the last call (e.g. the current N(k))."""
        return {}


@torch.no_grad()
def copy_net_weights(student: nn.Module, teacher: nn.Module) -> None:
    """Initialise ``student``'s raw network from ``teacher``'s (CD: Song et al. 2023, Sec. 6; PD).

    Preconditioners may differ (EDM teacher, consistency student); the networks behind them must
    have the same architecture, or this raises one error saying so.
    """
    s_net, t_net = getattr(student, "net", student), getattr(teacher, "net", teacher)
    s_state, t_state = s_net.state_dict(), t_net.state_dict()
    mismatch = [k for k in s_state if k not in t_state or t_state[k].shape != s_state[k].shape]
    if mismatch or len(s_state) != len(t_state):
        raise ValueError(
            f"Cannot initialise the student from the teacher: their networks differ (e.g. at "
            f"'{(mismatch or sorted(set(t_state) - set(s_state)))[0]}'); give the student the "
            "teacher's network config or set init_from_teacher to false."
        )
    s_net.load_state_dict(t_state)


def drop_labels(labels: Tensor | None, p_uncond: float) -> Tensor | None:
    """Ho & Salimans 2022, Alg. 1: zero each label row with probability ``p_uncond``.

    All-zero rows are the networks' "no class", so one model learns the conditional and the
    unconditional denoiser that ``cm.guidance.cfg`` combines.
    """
    if labels is None or p_uncond == 0:
        return labels
    keep = torch.rand(labels.shape[0], device=labels.device) >= p_uncond
    return labels * keep.view(-1, 1).to(labels.dtype)
