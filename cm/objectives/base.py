"""The objective interface: ``objective(denoiser, x0, labels, step, total_steps) -> loss[N]``."""

from torch import Tensor, nn


class Objective(nn.Module):
    """A training loss of one denoiser; curricula are pure functions of ``step``.

    Objectives own what the loss needs besides the trained denoiser (a teacher, a target network)
    so it is saved in the checkpoint with them.
    """

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
