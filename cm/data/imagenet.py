"""ImageNet (ILSVRC2012, Russakovsky et al. 2015) from its class folders, cropped as ADM and DiT.

The layout of the extracted training archive, ``train/<wnid>/*.JPEG`` (and a validation set
sorted into the same class folders, ``val/<wnid>/*.JPEG``). Images are resized and
center-cropped by ADM's ``center_crop_arr`` (Dhariwal & Nichol 2021; DiT's data pipeline), and
labelled by the index of their WordNet id among the 1000 sorted ids (torchvision's
``ImageFolder``, guided-diffusion, DiT), whatever subset of classes is on disk.
"""

from pathlib import Path
from typing import Literal

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from cm.data.datasets import IMAGE_EXTENSIONS, _random_hflip, one_hot, to_unit
from cm.data.lsun import center_crop_arr
from cm.errors import UserError

IMAGENET_URL = "https://image-net.org/download-images.php"
GET = (
    f"download ILSVRC2012_img_train.tar from {IMAGENET_URL} and extract each class's tar into "
    "train/<wnid>/"
)


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC2012 WordNet ids, sorted: class ``k`` is ``imagenet_wnids()[k]``."""
    text = Path(__file__).with_name("imagenet64_wnids.txt").read_text()
    return sorted(line for line in text.splitlines() if line and not line.startswith("#"))


class ImageNetDataset(Dataset):
    """ILSVRC2012 class folders, center-cropped to ``resolution`` as ADM (Dhariwal & Nichol 2021).

    Args:
        path: the folder holding ``train/`` (and ``val/``), or the split folder of ``<wnid>/``
            folders itself.
        split: ``train`` or ``val`` (the validation images sorted into class folders).
        resolution: output image size (256 for DiT/LDM ImageNet 256).
        flip: random horizontal flips.
        use_labels: one-hot labels over the 1000 classes; if False labels are empty.
    """

    channels = 3
    num_classes = 1000

    def __init__(
        self,
        path: str,
        split: Literal["train", "val"] = "train",
        resolution: int = 256,
        flip: bool = False,
        use_labels: bool = True,
    ) -> None:
        root = Path(path).expanduser()
        self.root = root / split if (root / split).is_dir() else root
        self.resolution, self.flip, self.use_labels = resolution, flip, use_labels
        wnids = imagenet_wnids()
        index = {w: k for k, w in enumerate(wnids)}
        folders = sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
        classes = [f for f in folders if f in index]
        unknown = [f for f in folders if f not in index and f.startswith("n") and f[1:].isdigit()]
        if unknown:
            raise UserError(
                f"'{self.root / unknown[0]}' is not one of the 1000 ILSVRC2012 classes: keep only "
                "the class folders of ILSVRC2012 there."
            )
        self.files: list[str] = []
        labels: list[int] = []
        for wnid in classes:
            names = sorted(
                f.name
                for f in (self.root / wnid).iterdir()
                if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
            )
            self.files += [f"{wnid}/{n}" for n in names]
            labels += [index[wnid]] * len(names)
        if not self.files:
            raise FileNotFoundError(
                f"No ImageNet class folders of images (<wnid>/*.JPEG) in '{self.root}': {GET}."
            )
        self.labels = torch.tensor(labels)

    @property
    def label_dim(self) -> int:
        """1000 with labels, else 0."""
        return self.num_classes if self.use_labels else 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        file = self.root / self.files[idx]
        try:
            with Image.open(file) as img:
                array = center_crop_arr(img.convert("RGB"), self.resolution)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"Cannot read ImageNet image '{file}' ({e}): replace it.") from None
        x = to_unit(array.transpose(2, 0, 1))
        label = one_hot(self.labels[idx], self.num_classes) if self.use_labels else torch.zeros(0)
        return _random_hflip(x) if self.flip else x, label
