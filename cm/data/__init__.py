"""Datasets of images in [-1, 1] with one-hot labels (see :mod:`cm.data.datasets`)."""

from cm.data.datasets import DigitsDataset, FolderDataset, MixtureDataset

__all__ = ["DigitsDataset", "FolderDataset", "MixtureDataset"]
