"""A resumable, rank-aware stream of training samples whose batch ``k`` depends only on ``k``."""

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from cm.errors import UserError


def step_seed(*keys: int) -> int:
    """A 32-bit seed from integer keys, e.g. ``(seed, step, rank)``: the same keys, the same seed.

    Python hashes tuples of ints deterministically (no per-process salt), so every process and
    every resumed run derives the same value.
    """
    return hash(tuple(int(k) for k in keys)) & 0xFFFFFFFF


class StepStream(IterableDataset):
    """Yield the samples of micro-batch ``k = start_step, start_step + 1, ...`` for one rank.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``; micro-batch ``k`` is the ``k``-th slice
    of ``batch_size * world_size`` indices, of which this rank takes its ``batch_size``: the
    global batch is the concatenation of the ranks' slices in rank order. Random augmentations
    of a sample run under the global RNG seeded by ``(seed, its position in the stream)``, so a
    run resumed at step ``k`` sees exactly the data it would have seen, with any number of
    DataLoader workers (each worker takes every ``num_workers``-th step; PyTorch interleaves them
    in order), and any split of the global batch over ranks or accumulated micro-batches sees the
    same augmented samples.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per micro-batch on this rank.
        seed: fixes the permutations and augmentations.
        start_step: first micro-batch to yield (the resumed step).
        rank: this process's rank.
        world_size: number of processes sharing each global batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or world_size < 1:
            raise UserError(
                f"A batch of {batch_size} images on each of {world_size} device(s) is empty: set "
                "data.init_args.batch_size to a positive multiple of the number of devices."
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.global_batch = batch_size * world_size
        if len(dataset) < self.global_batch:
            raise UserError(
                f"A global batch of {self.global_batch} images is larger than the training set "
                f"({len(dataset)} images): lower data.batch_size."
            )
        self.steps_per_epoch = len(dataset) // self.global_batch

    def indices(self, step: int) -> list[int]:
        """Dataset indices of micro-batch ``step`` on this rank."""
        epoch, b = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g)
        first = b * self.global_batch + self.rank * self.batch_size
        return perm[first : first + self.batch_size].tolist()

    def __iter__(self) -> Iterator:
        """Samples of this rank's micro-batches, in step order, for this worker's share."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in itertools.count(self.start_step + worker, num_workers):
            # Augmentations draw from the global RNG seeded by the sample's position in the
            # stream (not by rank, which would tie them to the world size); the batch is
            # materialised inside the fork so the caller's RNG stream is untouched.
            first = step * self.global_batch + self.rank * self.batch_size
            samples = []
            with torch.random.fork_rng(devices=[]):
                for position, index in enumerate(self.indices(step), first):
                    # The CPU generator alone: datasets augment on the CPU, and torch.manual_seed
                    # would also queue lazy CUDA/XPU/MTIA seeding (a stack capture per call, a
                    # third of a CPU quickstart step at one call per sample).
                    torch.default_generator.manual_seed(step_seed(self.seed, position))
                    samples.append(self.dataset[index])
            yield from samples
