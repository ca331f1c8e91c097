"""Datasets of images in [-1, 1]: config objects (:mod:`.sources`) building torch Datasets."""

from cm.data.captions import (
    DIGIT_WORDS,
    CaptionFolderDataset,
    read_prompts,
    write_digit_captions,
)
from cm.data.datasets import DigitsDataset, FolderDataset, MixtureDataset
from cm.data.imagenet import ImageNetDataset
from cm.data.latent_cache import encode_cache
from cm.data.latents import LatentDataset, Latents
from cm.data.lsun import LSUNDataset, center_crop_arr
from cm.data.real import (
    CIFAR10Dataset,
    ImageNet64Dataset,
    load_cifar_batch,
    open_dataset,
)
from cm.data.sources import (
    CIFAR10,
    LSUN,
    Captions,
    DataSource,
    Digits,
    ImageFolder,
    ImageNet,
    ImageNet64,
    Mixture,
)

__all__ = [
    "CIFAR10",
    "LSUN",
    "Captions",
    "DataSource",
    "Digits",
    "ImageFolder",
    "ImageNet",
    "ImageNet64",
    "Latents",
    "Mixture",
    "DIGIT_WORDS",
    "CaptionFolderDataset",
    "CIFAR10Dataset",
    "DigitsDataset",
    "FolderDataset",
    "ImageNet64Dataset",
    "ImageNetDataset",
    "LatentDataset",
    "LSUNDataset",
    "MixtureDataset",
    "center_crop_arr",
    "encode_cache",
    "load_cifar_batch",
    "open_dataset",
    "read_prompts",
    "write_digit_captions",
]
