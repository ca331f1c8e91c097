"""``DenoiserModule``: one LightningModule for every single-optimizer regime (EDM, CT, iCT, ...)."""

import copy
import os
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn

from cm.data.stream import step_seed
from cm.ema import EMA
from cm.io import image_spec
from cm.objectives.base import Objective
from cm.solvers.sampling import Sampler


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
    """

    def __init__(
        self,
        denoiser: nn.Module,
        objective: Objective,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        ema: EMA | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        super().__init__()
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
                raise ValueError(
                    f"The data has {name} {data_value} but the network has {name} {net_value}: "
                    f"set the net's {_NET_KEYS[name]} or data.init_args.{name} to match."
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
            raise ValueError("Curricula need trainer.max_steps (or objective total_steps) set.")
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

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):  # noqa: D102
        step = self.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.objective.after_optimizer_step(self.denoiser, step, self.total_steps())
        if self.ema is not None:
            batch = self._batch_size * self.trainer.accumulate_grad_batches
            self.ema.update(self.ema_denoiser, self.denoiser, step, batch)

    @torch.no_grad()
    def generate(
        self,
        seeds: Sequence[int],
        class_label: int | None = None,
        sampler: Sampler | None = None,
        batch_size: int = 256,
    ) -> tuple[Tensor, Tensor | None]:
        """EMA-denoiser images in ``[-1, 1]`` for ``seeds`` (per-seed deterministic), classes."""
        denoiser = self.eval_denoiser
        was_training = denoiser.training
        denoiser.eval()
        out = (sampler or self.sampler).generate(
            denoiser, seeds, self.image_shape, self.label_dim, class_label, batch_size, self.device
        )
        denoiser.train(was_training)
        return out

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Generate uint8 NHWC images for a batch of integer seeds."""
        from cm.io import to_uint8

        return to_uint8(self.generate(batch.tolist())[0])

    def on_train_batch_start(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """Seed the global RNG from ``(run seed, micro-batch, rank)`` before the objective draws.

        Every rank draws its own noise, sigmas and dropout masks (a shared ``seed_everything``
        would give all ranks the same ones, shrinking the effective batch of noise draws), and
        micro-batch ``k`` of a resumed run draws exactly what it drew in the original run, with no
        RNG state in the checkpoint. The trailing 1 keeps this stream apart from the data
        stream's augmentation seeds (``StepStream``), which use the same keys.
        """
        accumulate = self.trainer.accumulate_grad_batches
        micro = self.global_step * accumulate + batch_idx % accumulate
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(step_seed(seed, micro, self.global_rank, 1))


_NET_KEYS = {"resolution": "img_resolution", "channels": "in_channels", "label_dim": "label_dim"}
