"""What a dataset on disk holds, and a preview grid of its images (``cm data inspect``)."""

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from cm.data.lsun import list_images
from cm.data.real import (
    CIFAR10Dataset,
    DatasetName,
    ImageNet64Dataset,
    Split,
    open_dataset,
)
from cm.errors import UserError
from cm.files import check_output
from cm.sample_files import save_grid, to_uint8


@dataclass(frozen=True)
class DatasetSummary:
    """What ``inspect_dataset`` found: dataset kind, image count and shape, labels, preview."""

    dataset: DatasetName
    path: str
    count: int
    resolution: int
    channels: int
    label_dim: int
    preview: Path

    def __str__(self) -> str:
        labels = f"{self.label_dim} classes" if self.label_dim else "unlabelled"
        return (
            f"dataset:    {self.dataset} at {self.path}\n"
            f"images:     {self.count}\n"
            f"resolution: {self.resolution}x{self.resolution}\n"
            f"channels:   {self.channels}\n"
            f"labels:     {labels}\n"
            f"preview:    {self.preview}"
        )


def detect_dataset(path: str | Path) -> DatasetName:
    """Guess which on-disk dataset ``path`` holds from the files found there."""
    root = Path(path).expanduser()
    if root.is_file() and zipfile.is_zipfile(root):
        return "folder"
    if not root.is_dir():
        raise FileNotFoundError(
            f"'{root}' is not a folder or .zip: pass the dataset's location to cm data inspect."
        )
    subfolders = [root, *(p for p in root.iterdir() if p.is_dir())]
    cifar = (*CIFAR10Dataset.FILES["train"], *CIFAR10Dataset.FILES["test"])
    if (root / "cifar-10-batches-py").is_dir() or any((root / f).is_file() for f in cifar):
        return "cifar10"
    imagenet = (*ImageNet64Dataset.FILES["train"], *ImageNet64Dataset.FILES["test"])
    if any((d / f).is_file() for d in subfolders for f in imagenet) or any(
        root.glob("imagenet64_*_images.npy")
    ):
        return "imagenet64"
    if (root / "dataset.json").is_file():
        return "folder"
    if (root / "data.mdb").is_file():
        return "lsun"  # LSUNDataset explains how to export the LMDB to images
    sizes = set()
    for file in list_images(root)[:16]:
        with Image.open(root / file) as img:
            sizes.add(img.size)
    if len(sizes) == 1 and len({*next(iter(sizes))}) == 1:
        return "folder"  # square images of one size: use them as they are
    if sizes:
        return "lsun"  # mixed sizes: center-crop and resize like LSUN
    raise UserError(
        f"Cannot tell which dataset is in '{root}': pass --dataset cifar10, imagenet64, lsun or "
        "folder."
    )


def inspect_dataset(
    path: str,
    dataset: Literal["auto"] | DatasetName = "auto",
    resolution: int | None = None,
    out: str = "preview.png",
    num: int = 64,
    split: Split = "train",
    cache_dir: str | None = None,
    overwrite: bool = False,
) -> DatasetSummary:
    """Open the dataset at ``path`` and write a grid of ``num`` evenly spaced images to ``out``.

    For ``imagenet64`` this builds the memory-mapped ``.npy`` cache if it does not exist yet.
    ``out`` must not lie in the dataset (it would become one of its images) nor in the cache,
    and replaces an existing file only if ``overwrite``.
    """
    check_output(out, [path, cache_dir], overwrite)
    name = detect_dataset(path) if dataset == "auto" else dataset
    ds = open_dataset(name, path, resolution, split, cache_dir)
    indices = np.linspace(0, len(ds) - 1, min(num, len(ds))).round().astype(int)
    images = torch.stack([ds[int(i)][0] for i in np.unique(indices)])
    preview = save_grid(to_uint8(images), out)
    return DatasetSummary(
        name, str(path), len(ds), ds.resolution, ds.channels, ds.label_dim, preview
    )
