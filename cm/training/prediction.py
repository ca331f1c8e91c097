"""``cm predict``: seeds in, sample files out (``SeedDataModule`` + ``NpzWriter``)."""

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset


class SeedDataModule(L.LightningDataModule):
    """Integer seeds ``seed .. seed+num-1`` for ``predict`` (and AMED's ``fit``), split over ranks.

    Rank ``r`` of ``W`` takes a contiguous block, so no seed is generated twice (Lightning's
    sampler would pad with duplicates).

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

        Lightning's distributed sampler splits them over ranks (padding is harmless here).
        """
        seeds = torch.arange(self.seed, self.seed + self.num)
        return DataLoader(seeds, batch_size=self.batch_size, shuffle=False)


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
        from cm.io import save_npz

        out = Path(self.out)
        if trainer.world_size > 1:
            out = out.with_suffix(f".rank{trainer.global_rank}.npz")
        images = torch.cat(predictions)
        save_npz(images, out)
        rank_zero_info(f"Wrote {len(images)} samples to {out}")
