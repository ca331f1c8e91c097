"""Datasets as config objects: ``data.init_args.dataset: {class_path: cm.data.CIFAR10, ...}``.

A ``DataSource`` says what the DataModule needs before any file is read (image size, channels,
classes) and ``load``s the torch ``Dataset`` (:mod:`cm.data.datasets`, :mod:`cm.data.real`,
:mod:`cm.data.captions`). The DataModule keeps the loader settings (batch, workers, flips,
labels on/off, the resolution the network expects, the validation split); a new dataset is one
subclass whose typed constructor is its YAML schema and ``--help`` text.
"""

from abc import ABC, abstractmethod
from typing import Literal

from torch import nn
from torch.utils.data import Dataset

from cm.data.captions import CaptionFolderDataset
from cm.data.datasets import DigitsDataset, FolderDataset, MixtureDataset
from cm.data.imagenet import ImageNetDataset
from cm.data.lsun import LSUNDataset
from cm.data.real import CIFAR10Dataset, ImageNet64Dataset, Split
from cm.errors import UserError


class DataSource(ABC):
    """A dataset named in ``data.init_args.dataset``: its shape before loading, then its images.

    Class attributes (``None``: only the files tell, after ``load``):
        channels: image channels C.
        num_classes: length of the one-hot label (0: unlabelled).
        text_encoder: encodes captions into the network's ``labels`` (text datasets only).
    """

    channels: int | None = None
    num_classes: int | None = None
    text_encoder: nn.Module | None = None

    def size(self, resolution: int | None) -> int | None:
        """The image size ``load(resolution)`` gives (None: the files'); UserError if it cannot."""
        return resolution

    def prepare(self) -> None:  # noqa: B027 - optional hook: most datasets need no preparation
        """One-time work before ``load`` on each node's rank 0 (e.g. a cache)."""

    @abstractmethod
    def load(self, resolution: int | None, flip: bool, use_labels: bool) -> Dataset:
        """The torch Dataset of ``(image [C, H, W] in [-1, 1], label [L])`` items.

        Args:
            resolution: the DataModule's image size (None: the dataset's own).
            flip: random horizontal flips of the images.
            use_labels: one-hot labels; if False every label is ``[0]``-shaped.
        """


class _Resizable(DataSource):
    """A dataset that makes images of any size: its own ``resolution``, else the DataModule's."""

    title: str
    default_resolution: int

    def __init__(self, resolution: int | None) -> None:
        self.resolution = resolution

    def size(self, resolution: int | None) -> int:
        """The dataset's ``resolution``, else the DataModule's, else the default; equal if both."""
        if None not in (self.resolution, resolution) and self.resolution != resolution:
            raise UserError(
                f"{self.title} images are set to {self.resolution}x{self.resolution} "
                f"(data.init_args.dataset.init_args.resolution) but data.init_args.resolution is "
                f"{resolution}: give the size once."
            )
        return self.resolution or resolution or self.default_resolution


class Digits(_Resizable):
    """scikit-learn's 8x8 handwritten digits, 1797 images in 10 classes (the quickstart).

    Args:
        resolution: resize once (antialiased bilinear) to this size; None: the DataModule's
            resolution, else 8.
    """

    title, default_resolution = "Digits", 8
    channels, num_classes = 1, 10

    def __init__(self, resolution: int | None = None) -> None:
        super().__init__(resolution)

    def load(self, resolution: int | None, flip: bool, use_labels: bool) -> Dataset:
        """The digits in memory (``cm.data.DigitsDataset``)."""
        return DigitsDataset(self.size(resolution), flip, use_labels)


class Mixture(_Resizable):
    """Samples of a random isotropic Gaussian mixture, whose exact denoiser is ``cm.oracle``'s.

    The loaded dataset's ``.mixture`` is the ``cm.oracle.GaussianMixture`` it was drawn from.

    Args:
        num_samples: number of images, drawn once.
        num_components: mixture components K (= classes; the label is the component).
        channels: image channels.
        mixture_std: standard deviation of every component.
        seed: fixes the means and the samples (``cm.data.MixtureDataset``).
        resolution: image size; None: the DataModule's resolution, else 8.
    """

    title, default_resolution = "Mixture", 8

    def __init__(
        self,
        num_samples: int = 10000,
        num_components: int = 10,
        channels: int = 1,
        mixture_std: float = 0.1,
        seed: int = 0,
        resolution: int | None = None,
    ) -> None:
        super().__init__(resolution)
        self.num_samples, self.num_components = num_samples, num_components
        self.channels, self.num_classes = channels, num_components
        self.mixture_std, self.seed = mixture_std, seed

    def load(self, resolution: int | None, flip: bool, use_labels: bool) -> Dataset:
        """The samples in memory; never flipped (a flip would leave the exact mixture)."""
        return MixtureDataset(
            self.num_samples,
            self.num_components,
            self.size(resolution),
            self.channels,
            self.mixture_std,
            self.seed,
            use_labels,
        )


class LSUN(_Resizable):
    """LSUN scenes/objects (Yu et al. 2015) as a folder of exported images, unlabelled.

    Images are center-cropped and resized as ADM's ``center_crop_arr`` (``cm.data.LSUNDataset``).

    Args:
        path: folder of images (searched recursively), e.g. written by the LSUN tools'
            ``python data.py export <lmdb> --out_dir <path>``.
        resolution: output image size; None: the DataModule's resolution, else 256.
    """

    title, default_resolution = "LSUN", 256
    channels, num_classes = 3, 0

    def __init__(self, path: str, resolution: int | None = None) -> None:
        super().__init__(resolution)
        self.path = path

    def load(self, resolution: int | None, flip: bool, use_labels: bool) -> Dataset:
        """The image folder, decoded and cropped per item."""
        return LSUNDataset(self.path, self.size(resolution), flip)


class ImageNet(_Resizable):
    """ImageNet (ILSVRC2012) from its class folders ``train/<wnid>/*.JPEG``, 1000 classes.

    Center-cropped as ADM/DiT (``cm.data.ImageNetDataset``); the 256x256 images of latent
    diffusion (DiT, LDM) through ``cm.data.Latents``.

    Args:
        path: the folder holding ``train/`` (and ``val/`` sorted into class folders), or a
            split folder of ``<wnid>/`` folders itself.
        split: ``train`` or ``val``.
        resolution: output image size; None: the DataModule's resolution, else 256.
    """

    title, default_resolution = "ImageNet", 256
    channels, num_classes = 3, 1000

    def __init__(
        self, path: str, split: Literal["train", "val"] = "train", resolution: int | None = None
    ) -> None:
        super().__init__(resolution)
        self.path, self.split = path, split

    def load(self, resolution: int | None, flip: bool, use_labels: bool) -> Dataset:
        """The class folders, decoded and cropped per item."""
        return ImageNetDataset(self.path, self.split, self.size(resolution), flip, use_labels)


class _Published(DataSource):
    """A published dataset of one fixed image size and class count (``dataset_class``'s)."""

    dataset_class: type[CIFAR10Dataset] | type[ImageNet64Dataset]

    def __init__(self, path: str, split: Split) -> None:
        self.path, self.split = path, split
        self.channels = self.dataset_class.channels
        self.num_classes = self.dataset_class.num_classes

    def size(self, resolution: int | None) -> int:
        """The dataset's own size; any other ``resolution`` is a clear error."""
        self.dataset_class.check_resolution(resolution)
        return self.dataset_class.resolution


class CIFAR10(_Published):
    """CIFAR-10 (Krizhevsky 2009): 50000 train / 10000 test 32x32 RGB images in 10 classes.

    Args:
        path: the extracted ``cifar-10-batches-py`` folder (of ``cifar-10-python.tar.gz``, the
            python-pickle batches) or its parent.
        split: ``train`` (``data_batch_1`` .. ``data_batch_5``) or ``test`` (``test_batch``).
    """

    dataset_class = CIFAR10Dataset

    def __init__(self, path: str, split: Split = "train") -> None:
        super().__init__(path, split)

    def load(self, resolution: int | None, flip: bool, use_labels: bool) -> Dataset:
        """The batches, held in memory as uint8."""
        return CIFAR10Dataset(self.path, self.split, flip, use_labels, resolution)


class ImageNet64(_Published):
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017), the official ``.npz`` batches.

    Converted once into a memory-mapped uint8 ``.npy`` cache (``cm.data.ImageNet64Dataset``).

    Args:
        path: folder holding ``train_data_batch_1..10.npz`` and ``val_data.npz``, directly or in
            subfolders.
        split: ``train`` or ``test`` (the official validation set).
        cache_dir: folder of the one-time ``.npy`` cache (15.7 GB for train); None: ``path``.
    """

    dataset_class = ImageNet64Dataset

    def __init__(self, path: str, split: Split = "train", cache_dir: str | None = None) -> None:
        super().__init__(path, split)
        self.cache_dir = cache_dir

    def prepare(self) -> None:
        """Build the ``.npy`` cache unless it exists."""
        ImageNet64Dataset.prepare(self.path, self.split, self.cache_dir)

    def load(self, resolution: int | None, flip: bool, use_labels: bool) -> Dataset:
        """The memory-mapped cache."""
        return ImageNet64Dataset(
            self.path, self.split, self.cache_dir, flip, use_labels, resolution
        )


class ImageFolder(DataSource):
    """A folder (searched recursively) or ``.zip`` of images in EDM's ``dataset_tool.py`` layout.

    Labels come from its ``dataset.json`` (``cm.data.FolderDataset``); channels and classes are
    read from the files. Images must already have the DataModule's resolution, if one is set.

    Args:
        path: the folder or ``.zip``.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self, resolution: int | None, flip: bool, use_labels: bool) -> Dataset:
        """The folder, decoded per item."""
        return FolderDataset(self.path, resolution, flip, use_labels)


class Captions(DataSource):
    """A captioned EDM-layout folder or ``.zip`` for text-to-image models (Rombach et al. 2022).

    Items are ``(image, tokens [max_length, D])``: each caption (``captions.jsonl`` or
    ``dataset.json``, ``cm.data.captions``) encoded by ``text_encoder``, the cross-attention
    context ``ADMUNet(context_dim=D)`` takes as ``labels``.

    Args:
        path: the folder or ``.zip`` of images and captions.
        text_encoder: the frozen caption encoder (``cm.networks.text.TextEncoder``; D = the
            network's ``context_dim``).
    """

    num_classes = 0

    def __init__(self, path: str, text_encoder: nn.Module) -> None:
        self.path, self.text_encoder = path, text_encoder

    def load(self, resolution: int | None, flip: bool, use_labels: bool) -> Dataset:
        """The folder, each item's caption encoded (memoised)."""
        return CaptionFolderDataset(self.path, resolution, flip, text_encoder=self.text_encoder)


# ``data.init_args.dataset: digits``: the datasets that need no options, by a short name.
SHORT_NAMES: dict[str, type[DataSource]] = {"digits": Digits, "mixture": Mixture}


def data_source(dataset: DataSource | str) -> DataSource:
    """``dataset`` itself, or the default ``DataSource`` of a short name (``digits``)."""
    if isinstance(dataset, DataSource):
        return dataset
    if dataset in SHORT_NAMES:
        return SHORT_NAMES[dataset]()
    raise UserError(
        f"data.init_args.dataset: {dataset!r} is not a dataset: give digits, mixture or a "
        "dataset object, e.g. --data.init_args.dataset cm.data.CIFAR10 "
        "--data.init_args.dataset.init_args.path DIR (in YAML: dataset: {class_path: "
        "cm.data.CIFAR10, init_args: {path: DIR}}; see cm.data for ImageNet64, ImageNet, "
        "ImageFolder, LSUN, Captions, Latents)."
    )
