"""A small CNN on scikit-learn's 8x8 digits whose penultimate features stand in for Inception.

Inception v3 weights cannot be downloaded offline, so FID/KID/precision-recall on the embedded
``digits`` dataset use the 64-d hidden features of this classifier instead. Its weights,
``digits_features.safetensors`` next to this module, are written by
``scripts/train_digits_features.py`` (deterministic: fixed seeds and a fixed split, see
:func:`digits_split`).

Inputs are uint8 images as written by ``cm.io.to_uint8`` (channels first here); they are mapped
back to [-1, 1] exactly as ``cm.data.DigitsDataset`` scales the digits (0..16 -> [-1, 1]).
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cm.errors import UserError

DEFAULT_PATH = Path(__file__).with_name("digits_features.safetensors")
RESOLUTION = 8
NUM_CLASSES = 10
HOLDOUT = 360  # ~20% of the 1797 digits, never seen by the classifier
SPLIT_SEED = 0


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train, held-out) index arrays into ``sklearn.datasets.load_digits()``.

    cm's ``digits`` dataset trains generators on all 1797 images (it has no split), so the
    classifier cannot avoid them; this split only exists to measure its held-out accuracy.
    """
    idx = np.random.default_rng(SPLIT_SEED).permutation(1797)
    return np.sort(idx[HOLDOUT:]), np.sort(idx[:HOLDOUT])


def load_digits_uint8() -> tuple[Tensor, Tensor]:
    """All sklearn digits as uint8 ``[1797, 1, 8, 8]`` (as cm scales, then to_uint8) and labels."""
    from sklearn.datasets import load_digits  # local: sklearn is slow to import

    digits = load_digits()
    x = torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1) / 8 - 1  # as DigitsDataset
    images = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # as cm.io.to_uint8
    return images, torch.from_numpy(digits.target).long()


class DigitsNet(nn.Module):
    """Three 3x3 convolutions (8x8 -> 4x4 -> 2x2), a 64-d ReLU feature layer and a linear head."""

    def __init__(self, num_features: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(32 * 2 * 2, num_features)
        self.head = nn.Linear(num_features, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Float images in [-1, 1] ``[N, 1, 8, 8]`` -> post-ReLU penultimate features ``[N, F]``."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Float images in [-1, 1] ``[N, 1, 8, 8]`` -> class logits ``[N, 10]``."""
        return self.head(self.features(x))


def preprocess(images: Tensor) -> Tensor:
    """uint8 ``[N, C, H, W]`` (C in {1, 3}) -> float32 ``[N, 1, 8, 8]`` in [-1, 1].

    Three channels are averaged to grey. Other sizes than 8x8 are resized with antialiased
    bilinear interpolation, the same resize ``DigitsDataset`` applies when upsampling, so a
    generator trained at another resolution is scored on its downsampled samples.

    Args:
        images: uint8 images, channels first.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"DigitsFeatures expects uint8 images, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(
            f"DigitsFeatures expects [N, C, H, W] with C in {{1, 3}}, got {tuple(images.shape)}"
        )
    x = images.to(torch.float32).mean(1, keepdim=True) / 127.5 - 1
    if x.shape[-2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True)
        x = x.clamp(-1, 1)
    return x


class DigitsFeatures(nn.Module):
    """Frozen digits classifier mapping uint8 images to its 64-d penultimate features.

    Args:
        path: safetensors weights; defaults to ``digits_features.safetensors`` next to this
            module, written by ``scripts/train_digits_features.py``.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        from safetensors.torch import load_file  # local: only needed when loading weights

        super().__init__()
        path = Path(DEFAULT_PATH if path is None else path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Digits feature weights not found at '{path}': "
                "create them with `python scripts/train_digits_features.py --out <path>`."
            )
        state = load_file(str(path))
        # The feature width is read from the file so retrained widths load without code changes.
        self.num_features = int(state["fc.weight"].shape[0])
        self.net = DigitsNet(self.num_features)
        self.net.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()

    def _device(self) -> torch.device:
        """Device of the weights, where inputs are moved before the forward pass."""
        return self.net.head.weight.device

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """uint8 ``[N, C, H, W]`` -> float32 features ``[N, num_features]``.

        Args:
            images: uint8 images, C in {1, 3}; see :func:`preprocess` for channels and sizes.
        """
        return self.net.features(preprocess(images).to(self._device())).float()

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """uint8 ``[N, C, H, W]`` -> class logits ``[N, 10]`` (to check the classifier itself).

        Args:
            images: uint8 images, as for :meth:`forward`.
        """
        return self.net(preprocess(images).to(self._device())).float()
