"""``ImageDataModule``: one LightningDataModule for toy data, image folders, published datasets."""

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from cm.data.latents import LatentDataset, Latents
from cm.data.sources import DataSource, data_source
from cm.data.stream import StepStream
from cm.errors import UserError
from cm.io import to_uint8


class ImageDataModule(L.LightningDataModule):
    """Images in [-1, 1] with one-hot labels or text contexts; the ``data:`` YAML schema.

    The dataset is an object (``cm.data.DataSource``: ``Digits``, ``Mixture``, ``ImageFolder``,
    ``CIFAR10``, ``ImageNet64``, ``ImageNet``, ``LSUN``, ``Captions``, or ``Latents``: the VAE
    latents of any of these, whose resolution and channels are the latents'); this module keeps
    the loader settings.
    ``resolution``, ``channels`` and ``label_dim`` can be read before ``setup`` (the model and the
    CLI size the network from them). ``batch_size`` is the global batch of one optimizer step, as
    the papers state it: it is split over devices and gradient-accumulation micro-batches. Training
    data is a ``StepStream``: micro-batch ``k`` depends only on ``k`` and ``seed``, so a resumed
    run sees the same images, and each rank takes its own slice (no sampler is injected).

    Args:
        dataset: a ``cm.data`` dataset, e.g. ``{class_path: cm.data.CIFAR10, init_args: {path:
            /data/cifar-10-batches-py}}`` (``--data.init_args.dataset cm.data.CIFAR10
            --data.init_args.dataset.init_args.path DIR``), or the short name of one that needs
            no options: ``digits`` (scikit-learn 8x8 digits) or ``mixture`` (a Gaussian mixture).
        resolution: image size the network expects: Digits, Mixture and LSUN are made at it (if
            they set none themselves), other datasets' images must already have it; None: the
            dataset's own.
        batch_size: images per optimizer step over all devices (the papers' batch size).
        num_workers: DataLoader worker processes (0 loads in the main process).
        flip: random horizontal flips of training images.
        use_labels: return one-hot labels; if False labels are ``[N, 0]`` and ``label_dim`` is 0.
        seed: fixes the data order, the augmentations and the train/validation split.
        val_fraction: fraction of images held out for validation; 0 disables validation data.
    """

    def __init__(
        self,
        dataset: DataSource | str = "digits",
        resolution: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        flip: bool = False,
        use_labels: bool = True,
        seed: int = 0,
        val_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if _given_hyperparameters.get() is not None:
            self.save_hyperparameters()  # the config as given: the dataset as class_path/init_args
        else:
            self.save_hyperparameters(ignore=["dataset"])  # an object: checkpoints hold plain data
        self.source = data_source(dataset)
        self.source.size(resolution)  # a size the dataset cannot give fails here, not in setup
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(
                f"data.init_args.val_fraction must be in [0, 1), got {val_fraction}: e.g. 0.05."
            )
        if batch_size < 1:
            raise UserError(
                f"data.init_args.batch_size must be a positive number of images, got {batch_size}."
            )
        if num_workers < 0:
            raise UserError(
                f"data.init_args.num_workers must be 0 (load in the main process) or more, got "
                f"{num_workers}."
            )
        self._resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.flip = flip
        self.use_labels = use_labels
        self.seed = seed
        self.val_fraction = val_fraction
        self._full: Dataset | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def text_encoder(self) -> nn.Module | None:
        """The dataset's caption encoder (``cm.data.Captions``), None for class-labelled data."""
        return self.source.text_encoder

    def prepare_data(self) -> None:
        """The dataset's one-time work, e.g. ImageNet64's ``.npy`` cache (local rank 0 only)."""
        self.source.prepare()

    @property
    def full_dataset(self) -> Dataset:
        """The whole dataset (train and validation), built on first use."""
        if self._full is None:
            self._full = self.source.load(self._resolution, self.flip, self.use_labels)
        return self._full

    @property
    def resolution(self) -> int:
        """Image height and width (a folder's: from its first image)."""
        size = self.source.size(self._resolution)
        return self.full_dataset.resolution if size is None else size

    @property
    def channels(self) -> int:
        """Image channels C (a folder's: from its first image)."""
        channels = self.source.channels  # known without reading the files, except for folders
        return self.full_dataset.channels if channels is None else channels

    @property
    def label_dim(self) -> int:
        """Label vector length L (0 when unlabelled); also used to draw labels for sampling."""
        if not self.use_labels:
            return 0
        classes = self.source.num_classes
        return self.full_dataset.label_dim if classes is None else classes

    @property
    def vae(self) -> nn.Module | None:
        """The VAE of latent data (``cm.data.Latents``), None for pixels."""
        return getattr(self.source, "vae", None)

    @property
    def context_dim(self) -> int:
        """Width D of the text contexts (0 without captions)."""
        return int(getattr(self.text_encoder, "context_dim", 0))

    def contexts(self, seeds: Sequence[int]) -> Tensor:
        """Text contexts ``[N, L, D]`` for sampling: seed ``s`` gets image ``s % len``'s caption."""
        if self.text_encoder is None:
            raise UserError("Text contexts need a captioned dataset (cm.data.Captions).")
        captions = self.full_dataset.captions
        return self.text_encoder([captions[int(s) % len(captions)] for s in seeds])

    def setup(self, stage: str | None = None) -> None:
        """Split off the validation images (a fixed permutation from ``seed``)."""
        if self.train_set is not None:
            return
        full = self.full_dataset
        if self.val_fraction == 0:
            self.train_set = full
            return
        n_val = max(1, round(len(full) * self.val_fraction))
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed))
        val_full = copy.copy(full)  # shallow: shares the images, but no augmentation
        val_full.flip = False
        if isinstance(val_full, LatentDataset):  # the posterior mean: no random draw
            val_full.sample = "mean"
        self.train_set = Subset(full, perm[n_val:].tolist())
        self.val_set = Subset(val_full, perm[:n_val].tolist())

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        """Build a DataLoader with the module's batch size and workers."""
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """An endless, resumable stream of this rank's micro-batches (``StepStream``)."""
        self.setup("fit")
        return step_loader(self, self.train_set)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out batches in a fixed order; ``[]`` (no validation data) when val_fraction is 0."""
        self.setup("validate")
        if self.val_set is None and self.trainer is not None:
            if self.trainer.state.fn == TrainerFn.VALIDATING:  # cm validate would do nothing
                raise UserError(
                    "cm validate needs held-out data, but data.init_args.val_fraction is 0: set "
                    "--data.init_args.val_fraction (e.g. 0.05)."
                )
        return [] if self.val_set is None else self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """The held-out split (as ``val_dataloader``): ``cm test`` reports the objective on it.

        Without one (``val_fraction`` 0) ``cm test`` would run nothing and exit 0: an error.
        """
        self.setup("test")
        if self.val_set is None:
            raise UserError(
                "cm test needs held-out data, but this data has none (data.init_args.val_fraction "
                "is 0): set --data.init_args.val_fraction (e.g. 0.05), the share of images held "
                "out for validation and test."
            )
        return self._loader(self.val_set, train=False)


def step_loader(data: L.LightningDataModule, dataset: Dataset) -> DataLoader:
    """The micro-batches of ``dataset`` for this rank as a resumable ``StepStream``.

    Reads ``batch_size`` (the global batch of one optimizer step), ``seed`` and ``num_workers``
    of ``data`` and, when attached, its trainer's world size, rank, accumulation and step, so
    images and ODE pairs are batched alike.
    """
    world, rank, accumulate, start = 1, 0, 1, 0
    if data.trainer is not None:
        world, rank = data.trainer.world_size, data.trainer.global_rank
        accumulate = data.trainer.accumulate_grad_batches
        start = data.trainer.global_step * accumulate
    if data.batch_size % (world * accumulate):
        raise UserError(
            f"data.batch_size={data.batch_size} must be divisible by devices x "
            f"accumulate_grad_batches = {world * accumulate}."
        )
    micro = data.batch_size // (world * accumulate)
    stream = StepStream(dataset, micro, data.seed, start, rank, world)
    return DataLoader(
        stream,
        batch_size=micro,
        num_workers=data.num_workers,
        # Iterators draw worker base seeds from this generator, not from the global RNG,
        # which a resumed run restores from its checkpoint before creating the iterator.
        generator=torch.Generator().manual_seed(data.seed),
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def config_batches(config: Path, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 NHWC batches of the full dataset of the ``data:`` section of a training YAML."""
    if not config.is_file():
        raise FileNotFoundError(f"Data config '{config}' not found: give a training YAML.")
    data = (yaml.safe_load(config.read_text()) or {}).get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise UserError(
            f"'{config}' has no data: section with class_path/init_args (see configs/*.yaml)."
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", fail_untyped=False)
    dm = parser.instantiate_classes(parser.parse_object({"data": data})).data
    dm.prepare_data()
    if isinstance(dm.source, Latents):  # the real images, not their latents
        dataset = dm.source.pixels()
    else:
        dm.setup("fit")
        dataset = dm.full_dataset
    for x, *_ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield to_uint8(x)  # [-1, 1] -> uint8 NHWC, exactly as cm sample writes samples
