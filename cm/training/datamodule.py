"""``ImageDataModule``: one LightningDataModule for toy data, image folders, published datasets."""

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from cm.data import (
    CaptionFolderDataset,
    CIFAR10Dataset,
    DigitsDataset,
    ImageNet64Dataset,
    LSUNDataset,
    MixtureDataset,
    open_dataset,
)
from cm.data.stream import StepStream
from cm.errors import UserError


class ImageDataModule(L.LightningDataModule):
    """Images in [-1, 1] with one-hot labels or text contexts; the ``data:`` YAML schema.

    ``resolution``, ``channels`` and ``label_dim`` can be read before ``setup`` (the model and the
    CLI size the network from them). ``batch_size`` is the global batch of one optimizer step, as
    the papers state it: it is split over devices and gradient-accumulation micro-batches. Training
    data is a ``StepStream``: micro-batch ``k`` depends only on ``k`` and ``seed``, so a resumed
    run sees the same images, and each rank takes its own slice (no sampler is injected).

    Args:
        dataset: ``digits`` (scikit-learn 8x8 digits, 10 classes), ``mixture`` (synthetic Gaussian
            mixture with an exact denoiser), ``folder`` (a folder or .zip in EDM's
            ``dataset_tool.py`` layout, labels from its ``dataset.json``), ``cifar10`` (the python
            batches, 32x32, 10 classes), ``imagenet64`` (the official downsampled ImageNet 64x64
            ``.npz`` batches, 1000 classes), ``lsun`` (a folder of LSUN images, unlabelled) or
            ``captions`` (a folder or .zip in EDM's layout with ``captions.jsonl`` or
            ``dataset.json`` captions, ``cm.data.captions``: batches are ``(image, text
            context)`` through ``text_encoder``, for ``ADMUNet(context_dim=...)`` teachers).
        path: for ``folder``/``captions``: the folder or .zip; ``cifar10``: the
            ``cifar-10-batches-py`` folder or its parent; ``imagenet64``: the folder of ``.npz``
            batches; ``lsun``: the image folder. Unused for digits and mixture.
        resolution: image size; digits are resized to it, mixture samples drawn at it, LSUN
            images center-cropped to it; folder, CIFAR-10 (32) and ImageNet64 (64) images must
            already have it.
        batch_size: images per optimizer step over all devices (the papers' batch size).
        num_workers: DataLoader worker processes (0 loads in the main process).
        flip: random horizontal flips of training images.
        use_labels: return one-hot labels; if False labels are ``[N, 0]`` and ``label_dim`` is 0.
        num_samples: ``mixture`` only: number of samples drawn.
        num_components: ``mixture`` only: number of components (= classes).
        channels: ``mixture`` only: image channels (digits have 1, folders their own).
        mixture_std: ``mixture`` only: standard deviation of every component.
        seed: fixes the mixture and the train/validation split.
        val_fraction: fraction of images held out for validation; 0 disables validation data.
        split: ``cifar10``/``imagenet64`` only: ``train`` or ``test`` (ImageNet's validation set).
        cache_dir: ``imagenet64`` only: folder for the one-time uint8 ``.npy`` cache that is
            memory-mapped in training (15.7 GB for train); defaults to ``path``.
        text_encoder: ``captions`` only: the frozen encoder of the captions into the labels
            ``[max_length, D]`` (``cm.networks.text.TextEncoder``; D = the net's context_dim).
    """

    def __init__(
        self,
        dataset: Literal[
            "digits", "mixture", "folder", "cifar10", "imagenet64", "lsun", "captions"
        ] = "digits",
        path: str | None = None,
        resolution: int = 8,
        batch_size: int = 64,
        num_workers: int = 0,
        flip: bool = False,
        use_labels: bool = True,
        num_samples: int = 10000,
        num_components: int = 10,
        channels: int = 1,
        mixture_std: float = 0.1,
        seed: int = 0,
        val_fraction: float = 0.0,
        split: Literal["train", "test"] = "train",
        cache_dir: str | None = None,
        text_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["text_encoder"])  # a network, not a setting
        if dataset in ("folder", "captions") and not path:
            raise UserError(
                f"dataset '{dataset}' needs data.path: a folder or .zip of images "
                "(EDM dataset_tool.py layout)."
            )
        if (dataset == "captions") != (text_encoder is not None):
            raise UserError(
                "dataset 'captions' and data.text_encoder go together: give the captioned "
                "folder a text_encoder (cm.networks.text.TextEncoder), or drop the encoder."
            )
        published = _published_class(dataset)
        if published is not None and not path:
            raise UserError(
                f"dataset '{dataset}' needs data.path: the folder holding the {dataset} files."
            )
        if published is not None and published is not LSUNDataset:  # LSUN is resized to any size
            published.check_resolution(resolution)
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
        self.dataset_name = dataset
        self.path = path
        self._resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.flip = flip
        self.use_labels = use_labels
        self.num_samples = num_samples
        self.num_components = num_components
        self._channels = channels
        self.mixture_std = mixture_std
        self.seed = seed
        self.val_fraction = val_fraction
        self.split = split
        self.cache_dir = cache_dir
        self.text_encoder = text_encoder
        self._full: Dataset | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _build(self) -> Dataset:
        """Construct the full dataset named by ``dataset``."""
        match self.dataset_name:
            case "digits":
                return DigitsDataset(self._resolution, self.flip, self.use_labels)
            case "mixture":
                return MixtureDataset(
                    self.num_samples,
                    self.num_components,
                    self._resolution,
                    self._channels,
                    self.mixture_std,
                    self.seed,
                    self.use_labels,
                )
            case "captions":
                return CaptionFolderDataset(
                    self.path, self._resolution, self.flip, text_encoder=self.text_encoder
                )
            case "folder" | "cifar10" | "imagenet64" | "lsun":
                return open_dataset(
                    self.dataset_name,
                    self.path,
                    self._resolution,
                    self.split,
                    self.cache_dir,
                    self.flip,
                    self.use_labels,
                )
            case other:
                raise UserError(
                    f"Unknown dataset {other!r}: choose digits, mixture, folder, cifar10, "
                    "imagenet64, lsun or captions."
                )

    def prepare_data(self) -> None:
        """Build the ImageNet64 ``.npy`` cache once per node (Lightning runs it on local rank 0)."""
        if self.dataset_name == "imagenet64":
            ImageNet64Dataset.prepare(self.path, self.split, self.cache_dir)

    @property
    def full_dataset(self) -> Dataset:
        """The whole dataset (train and validation), built on first use."""
        if self._full is None:
            self._full = self._build()
        return self._full

    @property
    def resolution(self) -> int:
        """Image height and width."""
        return self._resolution

    @property
    def channels(self) -> int:
        """Image channels C (folder: from the first image)."""
        published = _published_class(self.dataset_name)  # known without reading the files
        return self.full_dataset.channels if published is None else published.channels

    @property
    def label_dim(self) -> int:
        """Label vector length L (0 when unlabelled); also used to draw labels for sampling."""
        published = _published_class(self.dataset_name)
        if published is None:
            return self.full_dataset.label_dim
        return published.num_classes if self.use_labels else 0

    @property
    def context_dim(self) -> int:
        """Width D of the text contexts (0 without captions)."""
        return int(getattr(self.text_encoder, "context_dim", 0))

    def contexts(self, seeds: Sequence[int]) -> Tensor:
        """Text contexts ``[N, L, D]`` for sampling: seed ``s`` gets image ``s % len``'s caption."""
        if self.text_encoder is None:
            raise UserError("Text contexts need dataset 'captions' with a data.text_encoder.")
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
        world, rank, accumulate, start = 1, 0, 1, 0
        if self.trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            accumulate = self.trainer.accumulate_grad_batches
            start = self.trainer.global_step * accumulate
        if self.batch_size % (world * accumulate):
            raise UserError(
                f"data.batch_size={self.batch_size} must be divisible by devices x "
                f"accumulate_grad_batches = {world * accumulate}."
            )
        micro = self.batch_size // (world * accumulate)
        stream = StepStream(self.train_set, micro, self.seed, start, rank, world)
        return DataLoader(
            stream,
            batch_size=micro,
            num_workers=self.num_workers,
            # Iterators draw worker base seeds from this generator, not from the global RNG,
            # which a resumed run restores from its checkpoint before creating the iterator.
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

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


def _published_class(dataset: str) -> type | None:
    """The class of a published dataset (fixed channels and classes), None for the others."""
    match dataset:
        case "cifar10":
            return CIFAR10Dataset
        case "imagenet64":
            return ImageNet64Dataset
        case "lsun":
            return LSUNDataset
        case _:
            return None


def config_batches(config: Path, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 NHWC batches of the full dataset of the ``data:`` section of a training YAML."""
    import yaml
    from jsonargparse import ArgumentParser

    import cm.training  # noqa: F401 - registers cm's datamodules for jsonargparse
    from cm.io import to_uint8

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
    dm.setup("fit")
    for x, *_ in DataLoader(dm.full_dataset, batch_size=batch_size, shuffle=False):
        yield to_uint8(x)  # [-1, 1] -> uint8 NHWC, exactly as cm sample writes samples
