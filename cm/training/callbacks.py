"""Callbacks: sample grids, a samples file at the end, throughput."""

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from cm.io import save_grid, save_npz, to_uint8


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` write a PNG grid from fixed seeds and log it; at the end, an npz.

    Images come from the module's EMA denoiser and sampler (``DenoiserModule.generate``), so the
    same seeds give the same images at every step. Files go to ``<log_dir>/samples/``.

    Args:
        every_n_steps: optimizer steps between grids; 0 writes a grid only at the end.
        num: images in each grid (seeds ``0 .. num-1``; labels cycle through the classes).
        final_num: images written to ``samples.npz`` (``arr_0`` uint8 NHWC) when fitting ends.
        batch_size: images generated per forward pass.
    """

    def __init__(
        self, every_n_steps: int = 1000, num: int = 100, final_num: int = 0, batch_size: int = 500
    ) -> None:
        self.every_n_steps, self.num = every_n_steps, num
        self.final_num, self.batch_size = final_num, batch_size

    @staticmethod
    def directory(trainer: L.Trainer) -> Path:
        """``<log_dir>/samples`` (falls back to ``default_root_dir``); call it on every rank."""
        # trainer.log_dir broadcasts from rank 0 under DDP: a rank-0-only call would hang.
        return Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the samples directory while every rank is here (see ``directory``)."""
        self._dir = self.directory(trainer)

    def _generate(self, module: L.LightningModule, num: int):
        """uint8 NHWC images and class indices for seeds ``0 .. num-1``."""
        x, labels = module.generate(list(range(num)), batch_size=self.batch_size)
        return to_uint8(x), labels

    def write_grid(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> Path:
        """Generate, save and log one grid; returns its path."""
        images, _ = self._generate(module, self.num)
        path = save_grid(images, self._dir / f"{name}.png", nrow=10)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                grid = images.permute(0, 3, 1, 2)
                from torchvision.utils import make_grid

                logger.experiment.add_image(
                    "samples", make_grid(grid, nrow=10), trainer.global_step
                )
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.write_grid(trainer, pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if not trainer.is_global_zero:
            return
        grid = self.write_grid(trainer, pl_module, "final")
        rank_zero_info(f"Sample grid: {grid}")
        if self.final_num:
            images, labels = self._generate(pl_module, self.final_num)
            npz = save_npz(images, self._dir / "samples.npz", labels)
            rank_zero_info(f"Samples ({len(images)} images, arr_0 uint8 NHWC): {npz}")


class Throughput(L.Callback):
    """Log training speed: ``perf/images_per_sec`` (all ranks) and ``perf/sec_per_step``.

    Averaged over the optimizer steps since the last log, every ``trainer.log_every_n_steps``
    steps, straight to the loggers (rank 0). Images are the first tensor of each batch (or the
    batch itself) times the world size: every rank takes an equal micro-batch.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._images, self._steps, self._last_step = 0, 0, -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        first = batch[0] if isinstance(batch, list | tuple) else batch
        self._images += len(first) * trainer.world_size
        step = trainer.global_step
        if step == self._last_step:  # a micro-batch of gradient accumulation, no step yet
            return
        self._last_step, self._steps = step, self._steps + 1
        if step % max(trainer.log_every_n_steps, 1) or self._start is None:
            return
        seconds = time.perf_counter() - self._start
        values = {
            "perf/images_per_sec": self._images / seconds,
            "perf/sec_per_step": seconds / self._steps,
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
        self._start, self._images, self._steps = time.perf_counter(), 0, 0
