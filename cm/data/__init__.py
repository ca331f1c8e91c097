"""Datasets of images in [-1, 1] with one-hot labels (see :mod:`cm.data.datasets`, :mod:`.real`)."""

from cm.data.captions import (
    DIGIT_WORDS,
    CaptionFolderDataset,
    read_prompts,
    write_digit_captions,
)
from cm.data.datasets import DigitsDataset, FolderDataset, MixtureDataset
from cm.data.real import (
    CIFAR10Dataset,
    ImageNet64Dataset,
    LSUNDataset,
    center_crop_arr,
    load_cifar_batch,
    open_dataset,
)

__all__ = [
    "DIGIT_WORDS",
    "CaptionFolderDataset",
    "CIFAR10Dataset",
    "DigitsDataset",
    "FolderDataset",
    "ImageNet64Dataset",
    "LSUNDataset",
    "MixtureDataset",
    "center_crop_arr",
    "load_cifar_batch",
    "open_dataset",
    "read_prompts",
    "write_digit_captions",
]
