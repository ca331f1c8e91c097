"""LSUN scenes/objects (Yu et al. 2015) as a folder of exported images, cropped as ADM does."""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from cm.data.datasets import IMAGE_EXTENSIONS, _random_hflip, to_unit
from cm.errors import UserError

LSUN_URL = "https://github.com/fyu/lsun"


def list_images(root: str | Path) -> list[str]:
    """Relative paths of all images under ``root`` (recursively, hidden ones skipped), sorted."""
    names = []  # strings, not Paths: LSUN bedroom has 3M files and every worker shares the list
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith((".", "__MACOSX"))]
        rel = os.path.relpath(folder, root)
        names += [
            f if rel == "." else os.path.join(rel, f)
            for f in files
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
    return sorted(names)


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """Resize the short side to ``resolution`` and center-crop, as ADM (Dhariwal & Nichol 2021).

    BOX-halve while the short side is at least ``2 * resolution`` (cheap antialiasing), BICUBIC
    to short side ``resolution``, then crop the centre; returns uint8 ``[resolution, resolution,
    C]``.
    """
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - resolution) // 2, (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


class LSUNDataset(Dataset):
    """LSUN scenes/objects (Yu et al. 2015), e.g. bedroom or cat, as a folder of exported images.

    Images of any size are center-cropped and resized to ``resolution`` like ADM's
    ``center_crop_arr``; unlabelled.

    Args:
        path: folder of images (searched recursively), e.g. written by the LSUN tools'
            ``python data.py export <lmdb> --out_dir <path>``.
        resolution: output image size.
        flip: random horizontal flips.
    """

    channels = 3
    num_classes = 0
    label_dim = 0

    def __init__(self, path: str, resolution: int = 256, flip: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.resolution = resolution
        self.flip = flip
        if (self.path / "data.mdb").is_file():
            raise UserError(
                f"'{self.path}' is an LSUN LMDB database: export it to image files with "
                f"`python data.py export {self.path} --out_dir DIR` from {LSUN_URL} first."
            )
        self.files = list_images(self.path) if self.path.is_dir() else []
        if not self.files:
            raise FileNotFoundError(
                f"No LSUN images (PNG/JPEG/WebP) found in '{self.path}': download a category "
                f"and export it to images with the tools at {LSUN_URL}."
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        file = self.path / self.files[idx]
        try:
            with Image.open(file) as img:
                array = center_crop_arr(img.convert("RGB"), self.resolution)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"Cannot read LSUN image '{file}' ({e}).") from None
        x = to_unit(array.transpose(2, 0, 1))
        return _random_hflip(x) if self.flip else x, torch.zeros(0)
