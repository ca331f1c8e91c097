"""``cm predict``: seeds in, sample files out (``SeedDataModule`` + ``NpzWriter``)."""

import itertools
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from cm.data.stream import StepStream
from cm.errors import UserError
from cm.sample_files import save_npz


class SeedDataModule(L.LightningDataModule):
    """Integer seeds ``seed .. seed+num-1`` for ``predict`` (and AMED's ``fit``), split over ranks.

    ``predict``: rank ``r`` of ``W`` takes a contiguous block, so no seed is generated twice
    (Lightning's sampler would pad with duplicates). ``fit``: a resumable ``StepStream`` of the
    seeds, each epoch in a new order (see ``train_dataloader``).

    Args:
        num: number of samples.
        seed: first seed.
        batch_size: seeds per forward pass on each rank.
    """

    def __init__(self, num: int = 256, seed: int = 0, batch_size: int = 256) -> None:
        super().__init__()
        self.num, self.seed, self.batch_size = num, seed, batch_size

    def predict_dataloader(self) -> DataLoader:
        """Seeds of this rank, in batches."""
        world, rank = (
            (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        )
        per_rank = -(-self.num // world)
        seeds = torch.arange(self.seed, self.seed + self.num)[
            rank * per_rank : (rank + 1) * per_rank
        ]
        # An iterable dataset: Lightning would wrap a map-style one in its own distributed
        # sampler and split this rank's block again (each rank then produced 1/W of it).
        return DataLoader(_Seeds(seeds), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        """All seeds for training on noise alone (AMED: one trajectory per seed and epoch).

        A ``StepStream`` of the seeds, as ``ImageDataModule``'s images: batch ``k`` of the run
        depends only on ``k`` and ``seed`` (each epoch a new permutation, ``num // (batch_size
        x devices)`` batches), each rank takes its own slice, and a run resumed after batch
        ``k`` continues with batch ``k + 1`` (Lightning restarts a plain DataLoader at the
        epoch's first batch). Batches count Lightning's, not ``global_step``: AMED steps its
        optimizer ``N - 1`` times per batch.
        """
        world, rank, start = 1, 0, 0
        if self.trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            # Restored from the checkpoint before the loader is built: the micro-batches whose
            # training step ran (a step-boundary checkpoint is written in on_train_batch_end,
            # before Lightning counts the batch as completed).
            start = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed
        if self.num < self.batch_size * world:
            raise UserError(
                f"data.init_args.num={self.num} seeds are fewer than one batch of "
                f"{self.batch_size} on each of {world} device(s): raise num or lower batch_size."
            )
        seeds = torch.arange(self.seed, self.seed + self.num)
        stream = StepStream(seeds, self.batch_size, self.seed, start, rank, world)
        return DataLoader(_Epochs(stream), batch_size=self.batch_size)


class _Epochs(IterableDataset):
    """A ``StepStream`` one epoch per iterator, each iterator starting where the last ended.

    Lightning iterates the train loader once per epoch and ends the epoch after ``len`` batches;
    the stream itself is endless. Main process only (``num_workers=0``): the position is kept
    in this object.
    """

    def __init__(self, stream: StepStream) -> None:
        self.stream, self.next_step = stream, stream.start_step

    def __len__(self) -> int:
        """Samples of one epoch on this rank."""
        return self.stream.steps_per_epoch * self.stream.batch_size

    def __iter__(self) -> Iterator:
        """The rest of the epoch of batch ``next_step``."""
        start, per_epoch = self.next_step, self.stream.steps_per_epoch
        self.next_step = (start // per_epoch + 1) * per_epoch
        self.stream.start_step = start
        yield from itertools.islice(self.stream, (self.next_step - start) * self.stream.batch_size)


class _Seeds(IterableDataset):
    """The seeds of one rank, in order (iterable, so no sampler is injected)."""

    def __init__(self, seeds: torch.Tensor) -> None:
        self.seeds = seeds

    def __iter__(self):
        return iter(self.seeds)


class NpzWriter(BasePredictionWriter):
    """Write the predicted uint8 NHWC images of each rank to ``out`` (``.rankN`` when W > 1).

    Args:
        out: path of the ``.npz`` file (``arr_0`` uint8 NHWC).
    """

    def __init__(self, out: str = "samples.npz") -> None:
        super().__init__(write_interval="epoch")
        self.out = out

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:  # noqa: D102
        out = Path(self.out)
        if trainer.world_size > 1:
            out = out.with_suffix(f".rank{trainer.global_rank}.npz")
        images = torch.cat(predictions)
        save_npz(images, out)
        rank_zero_info(f"Wrote {len(images)} samples to {out}")
