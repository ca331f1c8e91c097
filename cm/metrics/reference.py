"""Reference statistics of real images: computed once, cached in an ``.npz``, read back anywhere.

Layout of a reference file written by ``save_reference`` (``cm eval ref``):

- ``mu``: ``[D]`` float64 feature mean, ``sigma``: ``[D, D]`` float64 covariance (unbiased), the
  Gaussian of FID (Heusel et al. 2017, Eq. 6);
- ``features``: ``[N, D]`` float32 feature bank for KID and precision/recall;
- ``feature``: the extractor's name (``inception``, ``clip:MODEL:TAG`` or a module's import path);
- ``num_images``: N;
- ``channels``: 1 or 3, the channels of the real images (absent in older files): samples with
  other channels are refused, since 1-channel images are scored as gray RGB.

OpenAI's guided-diffusion reference batches (``VIRTUAL_imagenet64_labeled.npz``: ``arr_0`` uint8
NHWC images plus Inception ``mu``/``sigma``) are read too: their ``mu``/``sigma`` are used as they
are so FIDs match published tables, and the feature bank is computed from ``arr_0`` when needed.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.files import atomic_open
from cm.metrics.features import extract, to_nchw_uint8


@dataclass
class Reference:
    """Real-image statistics as read from an ``.npz`` (see the module docstring for the layout).

    Args:
        path: the file read.
        feature: name of the extractor the statistics come from.
        mu: feature mean ``[D]`` (float64) or None.
        sigma: feature covariance ``[D, D]`` (float64) or None.
        features: feature bank ``[N, D]`` or None.
        has_images: whether the file holds uint8 images ``arr_0`` (read by ``images()``).
        num_images: images the statistics were computed from.
        channels: channels of the real images (1 or 3), None when the file does not say.
    """

    path: Path
    feature: str
    mu: np.ndarray | None
    sigma: np.ndarray | None
    features: np.ndarray | None
    has_images: bool
    num_images: int
    channels: int | None = None

    def images(self) -> np.ndarray:
        """The uint8 NHWC images ``arr_0``, read only now (a guided-diffusion batch is large)."""
        with np.load(self.path, allow_pickle=False) as data:
            images = data["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise UserError(
                f"Reference '{self.path}': arr_0 must be uint8 images [N, H, W, C], got "
                f"{images.dtype} of shape {images.shape}."
            )
        return images


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``features`` ``[N, D]``.

    Computed from the sums ``sum f`` and ``sum f f^T`` exactly as torchmetrics' FID does for its
    real images, so that a cached reference gives the same FID as feeding the images.
    """
    n = features.shape[0]
    if n < 2:
        raise UserError(f"Reference statistics need at least 2 images, got {n}.")
    f = features.double()
    mu = f.sum(0) / n
    sigma = (f.T @ f - n * torch.outer(mu, mu)) / (n - 1)
    return mu, sigma


def load_reference(path: str | Path) -> Reference:
    """Read a reference ``.npz``: one written by ``save_reference`` or a guided-diffusion batch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Reference file '{path}' not found: build one with `cm eval ref --data CONFIG.yaml "
            "--out ref.npz` or give a guided-diffusion reference batch (VIRTUAL_*.npz)."
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            arrays = {k: data[k] for k in ("mu", "sigma", "features", "feature", "num_images",
                                           "channels") if k in keys}  # fmt: skip
            num_arr0 = len(data["arr_0"]) if "arr_0" in keys else 0  # arr_0 is read later
    except (OSError, ValueError) as error:
        raise UserError(f"Cannot read reference '{path}' as an .npz ({error}).") from None
    mu, sigma, features = arrays.get("mu"), arrays.get("sigma"), arrays.get("features")
    has_images = "arr_0" in keys
    if (mu is None or sigma is None) and features is None and not has_images:
        raise UserError(
            f"Reference '{path}' has none of mu/sigma, features or arr_0: build it with "
            "`cm eval ref`."
        )
    # guided-diffusion batches carry no name: their statistics are Inception pool3 features
    feature = str(arrays["feature"]) if "feature" in arrays else "inception"
    if "num_images" in arrays:
        num = int(arrays["num_images"])
    else:
        num = len(features) if features is not None else num_arr0
    channels = int(arrays["channels"]) if "channels" in arrays else None
    return Reference(path, feature, mu, sigma, features, has_images, num, channels)


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` to exactly ``path``, atomically (``cm.files.atomic_open``)."""
    with atomic_open(path) as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)
    return path


def save_reference(
    path: str | Path,
    features: Tensor,
    feature: str,
    gaussian: tuple[np.ndarray, np.ndarray] | None = None,
    channels: int | None = None,
) -> Path:
    """Write ``mu``, ``sigma``, the bank ``features`` ``[N, D]``, ``feature``, ``num_images``.

    Args:
        path: the ``.npz`` to write (atomically: a crash leaves no partial file).
        features: real-image features ``[N, D]``.
        feature: name of the extractor that produced them.
        gaussian: ``(mu, sigma)`` to store instead of those of ``features`` (a published
            batch's, so that FIDs stay comparable with the tables that used them).
        channels: channels of the real images (1 or 3), stored so that samples are checked.

    Returns:
        The path written.
    """
    if gaussian is None:
        mu, sigma = (t.cpu().numpy() for t in gaussian_stats(features))
    else:
        mu, sigma = (np.asarray(a, dtype=np.float64) for a in gaussian)
        if mu.shape != (features.shape[1],) or sigma.shape != (features.shape[1],) * 2:
            raise UserError(
                f"mu/sigma of shapes {mu.shape}/{sigma.shape} do not fit {features.shape[1]}-d "
                "features: they must come from the same feature extractor."
            )
    arrays = {
        "mu": mu,
        "sigma": sigma,
        "features": features.float().cpu().numpy(),
        "feature": np.array(feature),
        "num_images": np.array(features.shape[0], dtype=np.int64),
    }
    if channels is not None:
        arrays["channels"] = np.array(channels, dtype=np.int64)
    return _atomic_savez(Path(path), arrays)


@torch.no_grad()
def compute_reference(
    batches: Iterable[Tensor | np.ndarray],
    extractor: nn.Module,
    out: str | Path,
    num: int | None = None,
    gaussian: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Extract features of real images and cache their statistics in ``out``.

    Args:
        batches: uint8 image batches (``[B, H, W, C]`` or ``[B, C, H, W]``).
        extractor: a module from ``cm.metrics.features.build_extractor``.
        out: the ``.npz`` to write.
        num: stop after this many images (None: all).
        gaussian: published ``(mu, sigma)`` to keep instead of recomputing them.

    Returns:
        The path written.
    """
    device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    feats, seen, channels = [], 0, None
    for batch in batches:
        if num is not None and seen >= num:
            break
        x = to_nchw_uint8(batch, None)
        channels = x.shape[1]  # before gray images are repeated to RGB for the extractor
        x = to_nchw_uint8(x, extractor.channels)
        if num is not None:
            x = x[: num - seen]
        feats.append(extractor(x.to(device))[0].cpu())
        seen += x.shape[0]
    if seen < 2:
        raise UserError(f"Reference statistics need at least 2 images, got {seen}.")
    return save_reference(out, torch.cat(feats), extractor.name, gaussian, channels)


def reference_features(ref: Reference, extractor: nn.Module, batch_size: int = 100) -> Tensor:
    """The feature bank of ``ref`` for ``extractor``: stored, or extracted from ``arr_0``."""
    if ref.feature == extractor.name and ref.features is not None:
        return torch.from_numpy(ref.features).float()
    if ref.has_images:
        return extract(extractor, ref.images(), batch_size)
    raise UserError(
        f"Reference '{ref.path}' holds no {extractor.name} feature bank (it has "
        f"{ref.feature} statistics): rebuild it with `cm eval ref --feature ...` for this feature."
    )


def reference_gaussian(
    ref: Reference, extractor: nn.Module, bank: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(mu, sigma)`` of ``ref`` for ``extractor``: stored ones when the feature matches."""
    if ref.feature == extractor.name and ref.mu is not None and ref.sigma is not None:
        mu, sigma = torch.from_numpy(ref.mu).double(), torch.from_numpy(ref.sigma).double()
        if mu.shape != (extractor.num_features,):
            raise UserError(
                f"Reference '{ref.path}' has {mu.shape[-1]}-d statistics but {extractor.name} "
                f"features are {extractor.num_features}-d: rebuild it with `cm eval ref`."
            )
        return mu, sigma
    return gaussian_stats(bank if bank is not None else reference_features(ref, extractor))
