"""Published datasets on disk: CIFAR-10 and downsampled ImageNet 64x64 (LSUN: ``cm.data.lsun``).

Like :mod:`cm.data.datasets`, every dataset returns ``(image, label)`` with ``image`` float32
``[C, H, W]`` in [-1, 1] and ``label`` a float one-hot ``[L]`` (or ``torch.zeros(0)``), and exposes
``resolution``, ``channels`` and ``label_dim``. Pixels are kept as uint8 (in memory for CIFAR-10,
memory-mapped for ImageNet 64x64) and scaled per item.
"""

import builtins
import codecs
import pickle
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cm.data.datasets import FolderDataset, _random_hflip, one_hot, to_unit
from cm.data.lsun import LSUNDataset
from cm.errors import UserError
from cm.files import atomic_path

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGENET64_URL = "https://image-net.org/download-images (Downsampled ImageNet 64x64)"

Split = Literal["train", "test"]
DatasetName = Literal["folder", "cifar10", "imagenet64", "lsun"]


class _ArrayImageDataset(Dataset):
    """uint8 images ``[N, C, H, W]`` from ``self._array()`` and class indices ``[N]`` in memory."""

    title: str
    resolution: int
    channels: int = 3
    num_classes: int

    def __init__(self, classes: np.ndarray, flip: bool, use_labels: bool) -> None:
        self.classes = torch.from_numpy(classes.astype(np.int64))
        self.flip = flip
        self.use_labels = use_labels

    def _array(self) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def check_resolution(cls, resolution: int | None) -> None:
        """Raise a clear error if ``resolution`` is not the dataset's own size (None passes)."""
        if resolution is not None and resolution != cls.resolution:
            raise UserError(
                f"{cls.title} images are {cls.resolution}x{cls.resolution}, not "
                f"{resolution}x{resolution}: set data.init_args.resolution to {cls.resolution}."
            )

    @property
    def label_dim(self) -> int:
        """Length L of the label vector (the number of classes); 0 when labels are off."""
        return self.num_classes if self.use_labels else 0

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        x = to_unit(self._array()[idx])
        if self.flip:
            x = _random_hflip(x)
        if not self.use_labels:
            return x, torch.zeros(0)
        return x, one_hot(self.classes[idx], self.num_classes)


class _BatchUnpickler(pickle.Unpickler):
    """Resolve only the globals that pickled numpy arrays need, so a pickle cannot run code."""

    _reconstruct = np.ndarray(0).__reduce__()[0]  # the rebuild function, whatever numpy calls it
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1.x (the official files)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes in protocol-2 pickles
        **{
            (m, n): getattr(builtins, n)
            for m in ("builtins", "__builtin__")
            for n in ("dict", "list")
        },
    }

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle hook
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return self.ALLOWED[(module, name)]


def load_cifar_batch(file: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[N, 3, 32, 32]`` and labels ``[N]`` of one CIFAR-10 python batch file.

    Krizhevsky (2009); the dict holds ``b"data"`` uint8 ``[N, 3072]`` (CHW, row-major) and
    ``b"labels"``. Unpickled with an allow-list of numpy globals only.
    """
    try:
        with open(file, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, KeyError, TypeError,
            ValueError) as e:  # fmt: skip
        raise UserError(
            f"'{file}' is not a CIFAR-10 python batch ({e}): re-download "
            f"cifar-10-python.tar.gz from {CIFAR10_URL}."
        ) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(
            f"'{file}' holds data of shape {data.shape} ({data.dtype}), not uint8 [N, 3072]: "
            f"re-download cifar-10-python.tar.gz from {CIFAR10_URL}."
        )
    if labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise UserError(
            f"'{file}' has {labels.size} labels for {len(data)} images or labels outside 0..9: "
            f"re-download cifar-10-python.tar.gz from {CIFAR10_URL}."
        )
    return data.reshape(-1, 3, 32, 32), labels


class CIFAR10Dataset(_ArrayImageDataset):
    """CIFAR-10 (Krizhevsky 2009): 50000 train / 10000 test 32x32 RGB images in 10 classes.

    Reads the python batches of ``cifar-10-python.tar.gz`` (extracted) into memory as uint8.

    Args:
        path: the extracted ``cifar-10-batches-py`` folder or its parent.
        split: ``train`` (``data_batch_1`` .. ``data_batch_5``) or ``test`` (``test_batch``).
        flip: random horizontal flips.
        use_labels: return one-hot class labels; if False labels are empty.
        resolution: expected image size; anything but 32 (or None) is an error.
    """

    title = "CIFAR-10"
    resolution = 32
    num_classes = 10
    FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

    def __init__(
        self,
        path: str,
        split: Split = "train",
        flip: bool = False,
        use_labels: bool = True,
        resolution: int | None = None,
    ) -> None:
        self.check_resolution(resolution)
        root = Path(path).expanduser()
        if (root / "cifar-10-batches-py").is_dir():
            root = root / "cifar-10-batches-py"
        missing = [f for f in self.FILES[split] if not (root / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 {split} files {', '.join(missing)} not found in '{root}': download "
                f"cifar-10-python.tar.gz from {CIFAR10_URL} and extract it there."
            )
        batches = [load_cifar_batch(root / f) for f in self.FILES[split]]
        self.path = str(root)
        self.images = np.concatenate([b[0] for b in batches])  # uint8 [N, 3, 32, 32]
        super().__init__(np.concatenate([b[1] for b in batches]), flip, use_labels)

    def _array(self) -> np.ndarray:
        return self.images


class ImageNet64Dataset(_ArrayImageDataset):
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017): 1281167 train / 50000 val images.

    The official ``.npz`` batches (``data`` uint8 ``[N, 12288]`` in CHW order, ``labels``
    1-based) are converted once into ``imagenet64_{split}_images.npy`` (uint8 ``[N, 3, 64, 64]``)
    and ``imagenet64_{split}_labels.npy`` (0-based, relabelled by sorted WordNet id as OpenAI's and
    EDM's models expect, ``imagenet64_class_index``) in ``cache_dir``, then memory-mapped so that
    DataLoader workers and DDP ranks share the pages instead of each holding 15.7 GB.

    Args:
        path: folder holding ``train_data_batch_1..10.npz`` and ``val_data.npz``, directly or in
            subfolders (``Imagenet64_train_npz``, ``Imagenet64_val_npz``).
        split: ``train`` (the 10 train batches) or ``test`` (the official validation set).
        cache_dir: where the ``.npy`` cache is written; defaults to ``path``.
        flip: random horizontal flips.
        use_labels: return one-hot class labels (1000); if False labels are empty.
        resolution: expected image size; anything but 64 (or None) is an error.
    """

    title = "Downsampled ImageNet 64x64"
    resolution = 64
    num_classes = 1000
    FILES = {"train": [f"train_data_batch_{i}.npz" for i in range(1, 11)], "test": ["val_data.npz"]}

    def __init__(
        self,
        path: str,
        split: Split = "train",
        cache_dir: str | None = None,
        flip: bool = False,
        use_labels: bool = True,
        resolution: int | None = None,
    ) -> None:
        self.check_resolution(resolution)
        self.images_file, labels_file = self.prepare(path, split, cache_dir)
        self._images: np.ndarray | None = None
        super().__init__(np.load(labels_file), flip, use_labels)
        if len(self._array()) != len(self.classes):
            raise UserError(
                f"The cache '{self.images_file}' has {len(self._array())} images but "
                f"{len(self.classes)} labels: delete both imagenet64_{split}_*.npy files."
            )

    @classmethod
    def cache_files(cls, path: str, split: Split, cache_dir: str | None) -> tuple[Path, Path]:
        """Paths of the images and labels ``.npy`` cache of ``split``."""
        root = Path(cache_dir or path).expanduser()
        return root / f"imagenet64_{split}_images.npy", root / f"imagenet64_{split}_labels.npy"

    @classmethod
    def prepare(
        cls, path: str, split: Split = "train", cache_dir: str | None = None
    ) -> tuple[Path, Path]:
        """Convert the ``.npz`` batches of ``split`` into the ``.npy`` cache unless it exists."""
        images_file, labels_file = cls.cache_files(path, split, cache_dir)
        if images_file.is_file() and labels_file.is_file():
            return images_file, labels_file
        files = cls.find_batches(path, split)
        print(f"Converting {len(files)} ImageNet64 {split} batch(es) once into {images_file} ...")
        try:
            images_file.parent.mkdir(parents=True, exist_ok=True)
            _convert_imagenet64(files, images_file, labels_file)
        except PermissionError:
            raise PermissionError(
                f"Cannot write the ImageNet64 cache to '{images_file.parent}': set "
                "data.init_args.dataset.init_args.cache_dir to a writable folder."
            ) from None
        return images_file, labels_file

    @classmethod
    def find_batches(cls, path: str, split: Split) -> list[Path]:
        """The official batch files of ``split`` in ``path`` or its direct subfolders."""
        root = Path(path).expanduser()
        folders = [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []
        found = {
            n: next((d / n for d in folders if (d / n).is_file()), None) for n in cls.FILES[split]
        }
        missing = [n for n, f in found.items() if f is None]
        if missing:
            raise FileNotFoundError(
                f"Downsampled ImageNet {split} files {', '.join(missing)} not found in '{root}' "
                f"or its subfolders: download the npz batches from {IMAGENET64_URL}."
            )
        return list(found.values())

    def _array(self) -> np.ndarray:
        # Opened lazily in each process: a memmap pickled into a spawned worker would be copied.
        if self._images is None:
            self._images = np.load(self.images_file, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict:
        """Pickle without the memory map (workers map the file themselves)."""
        return {**self.__dict__, "_images": None}


def _npz_array(file: Path, key: str) -> np.ndarray:
    """Array ``key`` of the official ``.npz`` batch ``file`` (never unpickling objects)."""
    try:
        with np.load(file) as z:
            return np.asarray(z[key])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(
            f"'{file}' is not a Downsampled ImageNet batch with 'data' and 'labels' ({e}): "
            f"re-download it from {IMAGENET64_URL}."
        ) from None


def imagenet64_class_index() -> np.ndarray:
    """``index[k - 1]``: the class of downsampled-ImageNet label ``k`` in sorted-WordNet-id order.

    The npz batches number classes 1..1000 in the ILSVRC devkit's ``map_clsloc.txt`` order;
    OpenAI's and EDM's ImageNet-64 models (and torchvision's ImageFolder) use sorted WordNet ids,
    so published class-conditional teachers need this relabelling.
    """
    text = Path(__file__).with_name("imagenet64_wnids.txt").read_text()
    wnids = [line for line in text.splitlines() if line and not line.startswith("#")]
    rank = {wnid: i for i, wnid in enumerate(sorted(wnids))}
    return np.array([rank[w] for w in wnids], dtype=np.int64)


def _imagenet64_labels(file: Path) -> np.ndarray:
    """Class indices ``[N]`` of one batch in sorted-WordNet-id order (files number 1..1000)."""
    labels = _npz_array(file, "labels").astype(np.int64) - 1
    if labels.ndim != 1 or labels.min(initial=0) < 0 or labels.max(initial=0) > 999:
        raise UserError(f"'{file}' has labels outside 1..1000: re-download it.")
    return imagenet64_class_index()[labels]


def _imagenet64_pixels(file: Path) -> np.ndarray:
    """uint8 rows ``[N, 12288]`` of one batch, each the R, G and B planes of a 64x64 image."""
    data = _npz_array(file, "data")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 64 * 64:
        raise UserError(
            f"'{file}' holds data of shape {data.shape} ({data.dtype}), not uint8 [N, 12288]: "
            f"use the 64x64 batches from {IMAGENET64_URL}."
        )
    return data


def _convert_imagenet64(files: list[Path], images_file: Path, labels_file: Path) -> None:
    """Write the batches' pixels ``[N, 3, 64, 64]`` and labels to temporary files, then rename."""
    labels = [_imagenet64_labels(f) for f in files]
    n = sum(len(x) for x in labels)
    # Labels are renamed first (the inner block): a cache counts as complete only once the
    # images file exists.
    with atomic_path(images_file) as tmp_images, atomic_path(labels_file) as tmp_labels:
        out = np.lib.format.open_memmap(tmp_images, "w+", np.uint8, (n, 3, 64, 64))
        start = 0
        for file, y in zip(files, labels, strict=True):
            data = _imagenet64_pixels(file)
            if len(data) != len(y):
                raise UserError(f"'{file}' has {len(data)} images but {len(y)} labels.")
            out[start : start + len(y)] = data.reshape(-1, 3, 64, 64)  # rows are R, G, B planes
            start += len(y)
        out.flush()
        del out
        with open(tmp_labels, "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, np.concatenate(labels).astype(np.int16))


def open_dataset(
    name: DatasetName,
    path: str,
    resolution: int | None = None,
    split: Split = "train",
    cache_dir: str | None = None,
    flip: bool = False,
    use_labels: bool = True,
) -> Dataset:
    """The on-disk dataset ``name`` at ``path`` (``resolution`` None: the data's own size)."""
    match name:
        case "folder":
            return FolderDataset(path, resolution, flip, use_labels)
        case "cifar10":
            return CIFAR10Dataset(path, split, flip, use_labels, resolution)
        case "imagenet64":
            return ImageNet64Dataset(path, split, cache_dir, flip, use_labels, resolution)
        case "lsun":
            return LSUNDataset(path, resolution or 256, flip)
        case other:
            raise UserError(f"Unknown dataset {other!r}: choose folder, cifar10, imagenet64, lsun.")
