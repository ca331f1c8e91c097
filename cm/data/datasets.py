"""Image datasets: scikit-learn digits, a synthetic Gaussian mixture, and EDM-style folders/zips.

Every dataset returns ``(image, label)``: ``image`` is float32 ``[C, H, W]`` in [-1, 1] (EDM's data
scaling) and ``label`` is a float one-hot ``[L]``, or ``torch.zeros(0)`` when unlabelled, so the
default collate gives ``[N, C, H, W]`` and ``[N, L]`` (or ``[N, 0]``). Each dataset exposes
``resolution``, ``channels`` and ``label_dim`` without loading its images.
"""

import io
import json
import os
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cm.errors import UserError
from cm.oracle import GaussianMixture

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Integer class indices ``[N]`` -> float32 one-hot ``[N, num_classes]``."""
    return F.one_hot(torch.as_tensor(labels, dtype=torch.long), num_classes).to(torch.float32)


def to_unit(x: np.ndarray) -> Tensor:
    """uint8 ``[C, H, W]`` (copied out of any memory map) -> float32 in [-1, 1]."""
    return torch.from_numpy(np.array(x, dtype=np.float32)) / 127.5 - 1


def _random_hflip(x: Tensor) -> Tensor:
    """Mirror ``x`` (``[C, H, W]``) left-right with probability 1/2."""
    return x.flip(-1) if torch.rand(()) < 0.5 else x


class _TensorImageDataset(Dataset):
    """Images ``[N, C, H, W]`` and labels ``[N, L]`` (or None) held in memory."""

    def __init__(self, images: Tensor, labels: Tensor | None, flip: bool) -> None:
        self.images = images.to(torch.float32).contiguous()
        self.labels = labels
        self.flip = flip

    @property
    def resolution(self) -> int:
        """Image height (= width)."""
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        """Number of image channels C."""
        return self.images.shape[1]

    @property
    def label_dim(self) -> int:
        """Length L of the label vector; 0 when unlabelled."""
        return 0 if self.labels is None else self.labels.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        x = self.images[idx]
        if self.flip:
            x = _random_hflip(x)
        return x, torch.zeros(0) if self.labels is None else self.labels[idx]


class DigitsDataset(_TensorImageDataset):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), shipped with sklearn.

    Args:
        resolution: output size; resized once with antialiased bilinear interpolation if not 8.
        flip: random horizontal flips (off by default: digits are not mirror-symmetric).
        use_labels: return one-hot class labels; if False labels are empty.
    """

    def __init__(self, resolution: int = 8, flip: bool = False, use_labels: bool = True) -> None:
        from sklearn.datasets import load_digits  # local: sklearn is slow to import

        digits = load_digits()
        x = (
            torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1) / 8 - 1
        )  # 0..16 -> [-1, 1]
        if resolution != x.shape[-1]:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True)
            x = x.clamp(-1, 1)
        labels = one_hot(torch.from_numpy(digits.target), 10) if use_labels else None
        super().__init__(x, labels, flip)


class MixtureDataset(_TensorImageDataset):
    """Samples of a random isotropic Gaussian mixture, whose exact denoiser is ``self.mixture``.

    Images are not clipped (means lie in [-0.8, 0.8]) so that ``self.mixture`` stays exact.

    Args:
        num_samples: number of images, drawn once at construction.
        num_components: mixture components K; the label is the component (one-hot ``[K]``).
        resolution: image height and width.
        channels: image channels.
        std: standard deviation of every component.
        seed: fixes the means (``GaussianMixture.random``) and the samples (generator ``seed + 1``).
        use_labels: return one-hot component labels; if False labels are empty.
    """

    def __init__(
        self,
        num_samples: int = 10000,
        num_components: int = 10,
        resolution: int = 8,
        channels: int = 1,
        std: float = 0.1,
        seed: int = 0,
        use_labels: bool = True,
    ) -> None:
        self.mixture = GaussianMixture.random(
            num_components, (channels, resolution, resolution), std, seed
        )
        # A separate stream so the samples are not correlated with the uniforms that set the means.
        generator = torch.Generator().manual_seed(seed + 1)
        y, k = self.mixture.sample(num_samples, generator)
        self.components = k
        super().__init__(y, one_hot(k, num_components) if use_labels else None, flip=False)


MAX_CLASSES = 100_000  # one-hot labels of more classes would take gigabytes per batch


def _label_tensor(labels: list, fnames: list[str], where: str, fix: str) -> Tensor:
    """``dataset.json`` labels -> one-hot ``[N, K]`` (integer classes) or float vectors ``[N, L]``.

    Every label is checked first: a string, a ragged vector, a negative or huge class index
    would otherwise surface as a bare numpy/torch error (or an allocation of terabytes).
    """

    def number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    def is_class(y) -> bool:
        return isinstance(y, int) and not isinstance(y, bool)

    classes = is_class(labels[0])
    width = len(labels[0]) if isinstance(labels[0], list) else -1

    def valid(y) -> bool:
        if classes:
            return is_class(y) and 0 <= y < MAX_CLASSES
        return isinstance(y, list) and len(y) == width and all(number(v) for v in y)

    bad = next((i for i, y in enumerate(labels) if not valid(y)), None)
    if bad is not None:
        raise UserError(
            f"{where} gives '{fnames[bad]}' the label {labels[bad]!r}: labels must all be integer "
            f"classes in 0..{MAX_CLASSES - 1}, or all lists of numbers of one length; {fix}."
        )
    if classes:
        return one_hot(torch.tensor(labels), max(labels) + 1)
    return torch.tensor(labels, dtype=torch.float32)


class FolderDataset(Dataset):
    """A folder (searched recursively) or ``.zip`` of images in EDM's ``dataset_tool.py`` layout.

    Labels come from an optional root ``dataset.json``: ``{"labels": [["00000/img00000000.png", 6],
    ...]}`` (integer classes become one-hot with ``L = max + 1``; lists are used as float vectors)
    or ``{"labels": null}``. Grayscale images give one channel, anything else is converted to RGB.
    Only the first image is opened at construction; every image is checked for the common size
    when it is loaded.

    Args:
        path: folder or ``.zip`` file.
        resolution: expected image size; a mismatch is an error. None accepts the first image's.
        flip: random horizontal flips.
        use_labels: read ``dataset.json`` labels; if False labels are empty.
    """

    def __init__(
        self,
        path: str,
        resolution: int | None = None,
        flip: bool = False,
        use_labels: bool = True,
    ) -> None:
        self.path = os.path.expanduser(str(path))
        self.flip = flip
        self._is_zip = os.path.isfile(self.path) and zipfile.is_zipfile(self.path)
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        if os.path.isfile(self.path) and not self._is_zip:
            raise UserError(
                f"'{self.path}' is not a readable .zip (truncated or another format): give a "
                "folder of images or re-create the zip (EDM dataset_tool.py --dest=*.zip)."
            )
        self.fnames = self._list_images() if os.path.exists(self.path) else []
        if not self.fnames:
            raise FileNotFoundError(
                f"No images found at '{self.path}': give a folder or .zip of PNG/JPEG images "
                "(EDM dataset_tool.py layout)."
            )
        with self._open(self.fnames[0]) as img:
            gray = img.mode in _GRAYSCALE_MODES
            width, height = img.size
        self.mode = "L" if gray else "RGB"
        self.shape = (1 if gray else 3, height, width)
        if width != height or (resolution is not None and resolution != height):
            wanted = "square images" if resolution is None else f"{resolution}x{resolution}"
            raise UserError(
                f"Images in '{self.path}' are {width}x{height} ({self.fnames[0]}) but {wanted} "
                f"were asked for: resize them with EDM's dataset_tool.py --resolution="
                f"{resolution or max(width, height)}x{resolution or max(width, height)} "
                "--transform=center-crop, or set the data resolution to match."
            )
        self.labels = self._load_labels() if use_labels else None
        self._close()  # never carry an open ZipFile into forked workers

    # -- file access -------------------------------------------------------------------------

    def _list_images(self) -> list[str]:
        """Relative POSIX paths of all images, sorted (the order used by ``dataset.json``)."""
        if self._is_zip:
            names = self._zipfile().namelist()
        elif os.path.isdir(self.path):
            names = [
                os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, "/")
                for root, _, files in os.walk(self.path)
                for f in files
            ]
        else:
            return []
        hidden = (
            n for n in names if not any(p.startswith((".", "__MACOSX")) for p in n.split("/"))
        )
        return sorted(n for n in hidden if n.lower().endswith(IMAGE_EXTENSIONS))

    def _zipfile(self) -> zipfile.ZipFile:
        """Return this process's zip handle, reopening it after a fork or unpickling."""
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def _close(self) -> None:
        """Close the zip handle, if any."""
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip, self._zip_pid = None, None

    def _read(self, fname: str) -> bytes | None:
        """Bytes of ``fname`` (relative to the root), or None if it does not exist."""
        if self._is_zip:
            try:
                return self._zipfile().read(fname)
            except KeyError:
                return None
        full = os.path.join(self.path, fname)
        if not os.path.isfile(full):
            return None
        with open(full, "rb") as f:
            return f.read()

    def _open(self, fname: str) -> Image.Image:
        """Open and decode image ``fname`` with PIL; a corrupt file is a clear error."""
        try:
            img = Image.open(io.BytesIO(self._read(fname)))
            img.load()  # decode now: a truncated file fails here, not deep in a DataLoader
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for corrupt images
            raise UserError(
                f"Cannot read image '{fname}' in '{self.path}' ({' '.join(str(e).split())}): "
                "replace or delete the file."
            ) from None
        return img

    def _load_labels(self) -> Tensor | None:
        """Labels ``[N, L]`` from ``dataset.json``, or None if it is absent or has null labels."""
        raw = self._read("dataset.json")
        if raw is None:
            return None
        where = f"dataset.json in '{self.path}'"
        fix = "fix it (EDM dataset_tool.py layout) or set data.init_args.use_labels=false"
        try:
            meta = json.loads(raw)
            if not isinstance(meta, dict):
                raise TypeError(f"its top level is a {type(meta).__name__}, not an object")
            entries = meta.get("labels")
            if entries is None:
                return None
            table = {str(name).replace("\\", "/"): label for name, label in entries}
        except (ValueError, TypeError, AttributeError) as e:  # not JSON, or not [[name, label]]
            detail = " ".join(str(e).split())
            raise UserError(
                f'{where} is not {{"labels": [[file, label], ...]}} ({detail}): {fix}.'
            ) from None
        missing = [f for f in self.fnames if f not in table]
        if missing:
            raise UserError(
                f"{where} has no label for {len(missing)} image(s), e.g. '{missing[0]}': list "
                "every image or set data.init_args.use_labels=false."
            )
        return _label_tensor([table[f] for f in self.fnames], self.fnames, where, fix)

    def __getstate__(self) -> dict:
        """Pickle without the zip handle (spawned workers reopen it)."""
        state = self.__dict__.copy()
        state["_zip"], state["_zip_pid"] = None, None
        return state

    # -- Dataset -----------------------------------------------------------------------------

    @property
    def resolution(self) -> int:
        """Image height (= width)."""
        return self.shape[1]

    @property
    def channels(self) -> int:
        """Number of image channels C (1 for grayscale, else 3)."""
        return self.shape[0]

    @property
    def label_dim(self) -> int:
        """Length L of the label vector; 0 when unlabelled."""
        return 0 if self.labels is None else self.labels.shape[1]

    def __len__(self) -> int:
        return len(self.fnames)

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        fname = self.fnames[idx]
        with self._open(fname) as img:
            if img.size != (self.shape[2], self.shape[1]):
                raise UserError(
                    f"All images in '{self.path}' must have one size: '{fname}' is "
                    f"{img.size[0]}x{img.size[1]}, '{self.fnames[0]}' is "
                    f"{self.shape[2]}x{self.shape[1]}. Resize them with EDM's dataset_tool.py."
                )
            array = np.array(img.convert(self.mode), dtype=np.uint8)  # [H, W] or [H, W, 3]
        x = torch.from_numpy(array).reshape(self.shape[1], self.shape[2], -1).permute(2, 0, 1)
        x = x.to(torch.float32) / 127.5 - 1
        if self.flip:
            x = _random_hflip(x)
        return x, torch.zeros(0) if self.labels is None else self.labels[idx]
