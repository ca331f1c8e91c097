"""``DenoiserModule``: one LightningModule for every single-optimizer regime (EDM, CT, iCT, ...)."""

import copy
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from cm.data.stream import step_seed
from cm.ema import EMA
from cm.errors import UserError
from cm.io import image_spec
from cm.objectives.base import Objective
from cm.solvers.sampling import Sampler, generate_text_or_latent


class DenoiserModule(L.LightningModule):
    """Train a denoiser ``D(x, sigma, labels)`` with an objective; sample with its EMA copy.

    The evaluation EMA covers the denoiser alone (never teachers or metric networks) and lives in
    the checkpoint as ``ema_denoiser``; the objective owns target/teacher networks.

    Args:
        denoiser: the trained denoiser, e.g. ``cm.precond.ConsistencyPrecond`` around a network.
        objective: the loss, e.g. ``cm.objectives.ConsistencyTraining``.
        optimizer: optimizer factory taking the denoiser's parameters.
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
        nonfinite: Literal["skip", "stop"] = "stop",
        max_consecutive_skips: int = 10,
    ) -> None:
        super().__init__()
        check_max_skips(max_consecutive_skips)
        # Under the CLI Lightning hands us the YAML config (class_path/init_args) as hparams and
        # `load_from_checkpoint`/`cm sample` rebuild from it; built in Python, the arguments are
        # objects, which must not be pickled into checkpoints (they are read weights_only).
        if _given_hyperparameters.get() is not None:
            self.save_hyperparameters()
        self.denoiser = denoiser
        self.objective = objective
        self.objective.bind(denoiser)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.ema = ema
        self.ema_denoiser = None
        if ema is not None:
            self.ema_denoiser = copy.deepcopy(denoiser).requires_grad_(False)
        self.sampler = sampler if sampler is not None else Sampler()
        self._batch_size = 0
        self.nonfinite, self.skipped_steps = nonfinite, 0
        self.max_consecutive_skips, self.skip_streaks = max_consecutive_skips, {}

    @property
    def eval_denoiser(self) -> nn.Module:
        """The denoiser used for sampling: the EMA copy when there is one."""
        return self.ema_denoiser if self.ema_denoiser is not None else self.denoiser

    @property
    def net(self) -> nn.Module:
        """The raw network behind the preconditioner (or the denoiser itself)."""
        return getattr(self.denoiser, "net", self.denoiser)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of generated images, from the data when attached, else the network."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "resolution"):
            return (dm.channels, dm.resolution, dm.resolution)
        return image_spec(self.denoiser)[0]

    @property
    def label_dim(self) -> int:
        """Number of classes the denoiser is conditioned on (0: unconditional)."""
        return int(getattr(self.net, "label_dim", 0))

    def setup(self, stage: str) -> None:
        """Check that data and network agree on resolution, channels and labels."""
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "resolution"):
            return
        checks = [
            ("resolution", dm.resolution, getattr(self.net, "img_resolution", dm.resolution)),
            ("channels", dm.channels, getattr(self.net, "in_channels", dm.channels)),
            ("label_dim", dm.label_dim, getattr(self.net, "label_dim", dm.label_dim)),
        ]
        for name, data_value, net_value in checks:
            if data_value != net_value:
                raise UserError(
                    f"The data has {name} {data_value} but the network has {name} {net_value}: "
                    f"set model.init_args.denoiser.init_args.net.init_args.{_NET_KEYS[name]} to "
                    f"{data_value}{_DATA_KEYS[name]}."
                )

    def configure_optimizers(self):  # noqa: D102 - Lightning hook
        optimizer = self.optimizer_factory(self.denoiser.parameters())
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
        finite = finite_or_skip(self, loss, optimizer)
        if self.nonfinite == "skip":
            self.log("train/skipped_steps", float(self.skipped_steps))
        if not finite:
            return
        # The closure already ran: the optimizer gets its result (clipping and the precision
        # plugin's hooks still run inside `optimizer.step`).
        optimizer.step(closure=lambda: loss)
        self.objective.after_optimizer_step(self.denoiser, step, self.total_steps())
        if self.ema is not None:
            batch = self._batch_size * self.trainer.accumulate_grad_batches
            self.ema.update(self.ema_denoiser, self.denoiser, step, batch)

    def on_train_end(self) -> None:
        """Say on the console how many steps ``nonfinite="skip"`` dropped in this run."""
        warn_skipped(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the skipped-step counter across resumes."""
        checkpoint["nonfinite_skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the skipped-step counter (0 for checkpoints written before it existed)."""
        self.skipped_steps = int(checkpoint.get("nonfinite_skipped_steps", 0))

    @torch.no_grad()
    def generate(
        self,
        seeds: Sequence[int],
        class_label: int | None = None,
        sampler: Sampler | None = None,
        batch_size: int = 256,
    ) -> tuple[Tensor, Tensor | None]:
        """EMA-denoiser images in ``[-1, 1]`` for ``seeds`` (per-seed deterministic), classes.

        A text model (``context_dim > 0``) takes seed ``s``'s prompt from the attached data module
        (``contexts``: ``ImageDataModule`` with captions, ``PairDataModule`` of text pairs); a
        latent model (one with ``decode``, e.g. ``StableDiffusionDenoiser``) is decoded into
        pixels by its VAE. Both return no class labels.
        """
        denoiser = self.eval_denoiser
        was_training = denoiser.training
        denoiser.eval()
        sampler = sampler or self.sampler
        if hasattr(denoiser, "decode") or getattr(self.net, "context_dim", 0):
            dm = self.trainer.datamodule if self._trainer is not None else None
            contexts = getattr(dm, "contexts", None)
            out = (
                generate_text_or_latent(
                    sampler, denoiser, seeds, self.image_shape, contexts, batch_size, self.device
                ),
                None,
            )
        else:
            out = sampler.generate(
                denoiser,
                seeds,
                self.image_shape,
                self.label_dim,
                class_label,
                batch_size,
                self.device,
            )
        denoiser.train(was_training)
        return out

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Generate uint8 NHWC images for a batch of integer seeds."""
        from cm.io import to_uint8

        return to_uint8(self.generate(batch.tolist())[0])

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


def all_finite(trainer: L.Trainer, loss: Tensor | None, optimizer) -> bool:
    """Whether ``loss`` and the gradients of ``optimizer``'s parameters are finite on every rank.

    One all-reduced flag, so all ranks take the same decision. Under a 16-bit ``GradScaler`` the
    scaler owns this decision (it skips the step and lowers the scale): True.
    """
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        return True
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    finite = loss is None or bool(torch.isfinite(loss).all())
    if finite and grads:
        finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
    return trainer.strategy.reduce_boolean_decision(finite, all=True)


def finite_or_skip(module: L.LightningModule, loss: Tensor | None, optimizer) -> bool:
    """Whether to step ``optimizer``: its loss and gradients are finite on every rank.

    Otherwise the module's ``nonfinite`` policy applies: ``"stop"`` raises one clear error,
    ``"skip"`` drops the gradients (an optimizer step then changes no parameter or moment) and
    counts the step in ``module.skipped_steps``.

    The skip is reported on the console (rank zero) with the step and the count, and
    ``module.max_consecutive_skips`` skips in a row of one optimizer end the run with an error.
    """
    streak = id(getattr(optimizer, "optimizer", optimizer))  # G and D keep separate streaks
    if all_finite(module.trainer, loss, optimizer):
        module.skip_streaks[streak] = 0
        return True
    optimizer.zero_grad(set_to_none=True)
    module.skipped_steps += 1
    step = module.global_step
    if module.nonfinite == "stop":
        raise UserError(
            f"Non-finite loss or gradients at step {step}: the run diverged; lower "
            "the learning rate, or set model.init_args.nonfinite=skip to skip such steps."
        )
    module.skip_streaks[streak] = run = module.skip_streaks.get(streak, 0) + 1
    limit = module.max_consecutive_skips
    if run >= limit:
        raise UserError(
            f"Non-finite loss or gradients in {run} steps in a row (up to step {step}; "
            f"model.init_args.max_consecutive_skips={limit}): the run diverged and skipping "
            "cannot recover it; lower the learning rate or resume from an earlier checkpoint."
        )
    rank_zero_warn(
        f"Step {step}: non-finite loss or gradients, step skipped (nonfinite=skip; "
        f"{module.skipped_steps} skipped in all, {run} in a row, the run stops at {limit}).",
        category=NonFiniteStepWarning,
    )
    return False


class NonFiniteStepWarning(UserWarning):
    """A training step was skipped for a NaN/Inf loss or gradient (``nonfinite="skip"``)."""


def check_max_skips(max_consecutive_skips: int) -> None:
    """Refuse a ``max_consecutive_skips`` below 1 (it would stop at the first skip, or never)."""
    if max_consecutive_skips < 1:
        raise UserError(
            f"model.init_args.max_consecutive_skips must be at least 1, got "
            f"{max_consecutive_skips}: use nonfinite=stop to stop at the first non-finite step."
        )


def warn_skipped(module: L.LightningModule) -> None:
    """After training: how many of the run's steps ``nonfinite="skip"`` dropped (rank zero)."""
    if module.skipped_steps:
        rank_zero_warn(
            f"{module.skipped_steps} optimizer step(s) in {module.global_step} training steps "
            "were skipped for non-finite loss or gradients (nonfinite=skip): check the run "
            "before using it.",
            category=NonFiniteStepWarning,
        )


_NET_KEYS = {"resolution": "img_resolution", "channels": "in_channels", "label_dim": "label_dim"}
# What changes the data's side of each check (ImageDataModule has no label_dim option: labels
# come from the dataset, and use_labels=false drops them).
_DATA_KEYS = {
    "resolution": " or data.init_args.resolution to match",
    "channels": " (and out_channels; a folder's channels are its images')",
    "label_dim": ", or data.init_args.use_labels to false for an unconditional model",
}
