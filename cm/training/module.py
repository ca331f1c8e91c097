"""``DenoiserModule``: one LightningModule for every single-optimizer regime (EDM, CT, iCT, ...)."""

import os
from collections.abc import Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from cm.data.stream import step_seed
from cm.ema import EMA
from cm.errors import UserError
from cm.objectives.base import Objective
from cm.solvers.sampling import Sampler
from cm.training.base import GenerativeModule, Nonfinite, NonFiniteStepWarning, all_finite

# NonFiniteStepWarning and all_finite moved to cm.training.base; importable here as before.
__all__ = ["DenoiserModule", "NonFiniteStepWarning", "all_finite"]


class DenoiserModule(GenerativeModule):
    """Train a denoiser ``D(x, sigma, labels)`` with an objective; sample with its EMA copy.

    The evaluation EMA covers the denoiser alone (never teachers or metric networks) and lives in
    the checkpoint as ``ema_denoiser``; the objective owns target/teacher networks.

    Args:
        denoiser: the trained denoiser, e.g. ``cm.precond.ConsistencyPrecond`` around a network.
        objective: the loss, e.g. ``cm.objectives.ConsistencyTraining``.
        optimizer: optimizer factory taking the denoiser's parameters (and the objective's
            ``trainable_parameters``, e.g. sCM's adaptive weighting head).
        lr_scheduler: optional scheduler factory, stepped every optimizer step.
        ema: evaluation EMA; None samples with the online weights.
        sampler: how samples are drawn (solver, steps) by callbacks, ``predict`` and ``cm sample``.
        nonfinite: what a step with a NaN/Inf loss or gradient does: ``"stop"`` ends the run with
            an error (the default: it usually means a diverged run, better seen at once);
            ``"skip"`` drops the step (no optimizer, EMA or target update; the step still counts,
            so curricula and data stay aligned), warns on the console and logs
            ``train/skipped_steps``.
        max_consecutive_skips: under ``nonfinite="skip"``, end the run with an error once this
            many optimizer steps in a row were skipped: a run whose weights are already NaN or
            huge never recovers, and would otherwise finish "successfully" with garbage.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        objective: Objective,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        ema: EMA | None = None,
        sampler: Sampler | None = None,
        nonfinite: Nonfinite = "stop",
        max_consecutive_skips: int = 10,
    ) -> None:
        # Before the base copies the denoiser into the EMA: binding may initialise it (CD and PD
        # start the student from the teacher) and creates the target network from it.
        objective.bind(denoiser)
        super().__init__(denoiser, ema, sampler, nonfinite, max_consecutive_skips)
        self.objective = objective
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self._batch_size = 0

    def configure_optimizers(self):  # noqa: D102 - Lightning hook
        # The objective's own trainable parameters (sCM's adaptive weighting) train alongside.
        params = [*self.denoiser.parameters(), *self.objective.trainable_parameters()]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def total_steps(self, strict: bool = True) -> int:
        """K for curricula: the objective's own ``total_steps``, else ``trainer.max_steps``.

        With ``strict=False`` (evaluation) an unset ``max_steps`` counts as 1 instead of raising.
        """
        total = getattr(self.objective, "total_steps", None) or self.trainer.max_steps
        if total is None or total < 1:
            if not strict:
                return 1
            raise UserError("Curricula need trainer.max_steps (or objective total_steps) set.")
        return total

    @staticmethod
    def _unpack(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(x0, labels)``; an empty label tensor (unlabelled data) becomes None."""
        x0, labels = batch
        return x0, labels if labels.numel() > 0 else None

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """One objective evaluation on a batch ``(x0, labels)``."""
        x0, labels = self._unpack(batch)
        loss = self.objective(self.denoiser, x0, labels, self.global_step, self.total_steps())
        loss = loss.mean()
        self._batch_size = x0.shape[0] * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        for key, value in self.objective.metrics().items():
            self.log(f"train/{key}", value)
        return loss

    @torch.no_grad()
    def _eval_loss(self, batch: Sequence[Tensor], batch_idx: int, name: str) -> Tensor:
        """Objective (and its extra scalars, e.g. bits/dim) on held-out data, with fixed noise."""
        x0, labels = self._unpack(batch)
        total = self.total_steps(strict=False)
        self.objective.draws.set(None)  # evaluation noise: the global RNG seeded below
        with torch.random.fork_rng(devices=[x0.device] if x0.device.type == "cuda" else []):
            torch.manual_seed(batch_idx)
            step = self.global_step
            values = self.objective.evaluate(self.eval_denoiser, x0, labels, step, total)
        for key, value in values.items():
            self.log(f"{name}/{key}", value, prog_bar=key == "loss", sync_dist=True)
        return values["loss"]

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Held-out objective value (``data.val_fraction > 0``), with the EMA denoiser."""
        return self._eval_loss(batch, batch_idx, "val")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Same as ``validation_step`` on the test split."""
        return self._eval_loss(batch, batch_idx, "test")

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Step the optimizer, then the objective's target and the EMA, once per optimizer step.

        The closure (forward and backward of the last micro-batch) runs first, so a non-finite
        loss or gradient is caught before anything absorbs it (``nonfinite``). With gradient
        accumulation the EMA blends once per optimizer step with the whole step's batch.
        """
        step = self.global_step
        loss = optimizer_closure()
        finite = self.finite_or_skip(loss, optimizer)
        self.log_skipped()
        if not finite:
            return
        # The closure already ran: the optimizer gets its result (clipping and the precision
        # plugin's hooks still run inside `optimizer.step`).
        optimizer.step(closure=lambda: loss)
        self.objective.after_optimizer_step(self.denoiser, step, self.total_steps())
        if self.ema is not None:
            batch = self._batch_size * self.trainer.accumulate_grad_batches
            self.ema.update(self.ema_denoiser, self.denoiser, step, batch)

    def on_train_batch_start(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """Key the objective's draws to the global sample index; seed dropout per rank.

        The objective's noise, sigmas and label masks (``Objective.draws``) come from a seed of
        ``(run seed, optimizer step)`` shared by all ranks, each rank keeping the slice of its
        samples in the step's batch: ``world_size`` ranks (and ``accumulate_grad_batches``
        micro-batches) draw exactly what one process draws for the whole batch, so a DDP run
        matches a single-process run with the global batch. Network dropout masks come from the
        global RNG seeded by ``(run seed, micro-batch, rank)``: they differ per rank. A resumed
        run redraws what the original drew at the same step, with no RNG state in the checkpoint.
        The trailing 1 and 2 keep these streams apart from the data stream's seeds.
        """
        trainer, accumulate = self.trainer, self.trainer.accumulate_grad_batches
        micro_index = batch_idx % accumulate
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        micro = trainer.global_step * accumulate + micro_index
        torch.manual_seed(step_seed(seed, micro, trainer.global_rank, 1))
        n, world = len(batch[0]), trainer.world_size
        offset = (micro_index * world + trainer.global_rank) * n
        total = n * world * accumulate
        self.objective.draws.set(step_seed(seed, trainer.global_step, 2), offset, total)
