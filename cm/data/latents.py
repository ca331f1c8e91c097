"""VAE latents of any cm dataset for latent diffusion (Rombach et al. 2022; DiT, SiT/REPA).

``Latents`` (the ``data.init_args.dataset`` object) wraps an image dataset and a ``cm.vae.VAE``,
encodes the images once into a memory-mapped cache (``cm.data.latent_cache``: posterior mean and
std, with the flipped images' when flips are on) and serves ``LatentDataset`` items
``(z [c, h, w], label)``: scaled latents, drawn from the posterior per training sample (DiT,
SiT/REPA, EDM2) or its mean.
"""

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cm.data.latent_cache import CacheDtype, dataset_identity, encode_cache, read_json
from cm.data.sources import DataSource, data_source
from cm.errors import UserError
from cm.files import same_file
from cm.vae import VAE


class LatentDataset(Dataset):
    """Items ``(z [c, h, w], label)`` of a latent cache: scaled VAE latents (Rombach et al. 2022).

    ``z = (mean + std * n - shift_factor) * scaling_factor`` with ``n`` drawn per item (or the
    mean); with ``flip``, the flipped image's latents half of the time. Both draws use the global
    RNG, which ``cm.data.stream.StepStream`` seeds by the sample's stream position: a resumed or
    multi-rank run sees the same latents.

    Args:
        cache: a finished cache folder (``encode_cache``).
        scaling_factor: the VAE's latent scale.
        shift_factor: the VAE's latent shift.
        flip: pick the flipped variant with probability 1/2 (the cache must hold it).
        sample: ``posterior`` draws from the VAE posterior; ``mean`` takes its mean.
        use_labels: return the labels; if False labels are ``[0]``-shaped.
    """

    def __init__(
        self,
        cache: str | Path,
        scaling_factor: float,
        shift_factor: float = 0.0,
        flip: bool = False,
        sample: Literal["posterior", "mean"] = "posterior",
        use_labels: bool = True,
    ) -> None:
        self.cache = Path(cache)
        self.manifest = read_json(self.cache / "manifest.json")
        self.shape = self.manifest["shape"]
        if flip and self.shape[0] < 2:
            raise UserError(f"The latent cache '{cache}' holds no latents of flipped images.")
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.flip, self.sample, self.use_labels = flip, sample, use_labels
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def resolution(self) -> int:
        """Latent height (= width)."""
        return self.shape[-1]

    @property
    def channels(self) -> int:
        """Latent channels c."""
        return self.shape[3]

    @property
    def label_dim(self) -> int:
        """Length L of the label vector; 0 when unlabelled or labels are off."""
        label_shape = self.manifest["label_shape"]
        return int(label_shape[0]) if self.use_labels and label_shape else 0

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        # Mapped lazily in each process: a memmap pickled into a spawned worker would be copied.
        if self._arrays is None:
            self._arrays = tuple(
                np.load(self.cache / f"{n}.npy", mmap_mode="r") for n in ("moments", "labels")
            )
        return self._arrays

    def __getstate__(self) -> dict:
        """Pickle without the memory maps (workers map the files themselves)."""
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self.shape[1]

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        moments, labels = self._open()
        variant = 1 if self.flip and torch.rand(()) < 0.5 else 0
        mean, std = torch.from_numpy(np.array(moments[variant, idx], dtype=np.float32))
        z = mean + std * torch.randn_like(mean) if self.sample == "posterior" else mean
        label = torch.from_numpy(np.array(labels[idx])) if self.use_labels else torch.zeros(0)
        return (z - self.shift_factor) * self.scaling_factor, label


class Latents(DataSource):
    """VAE latents of a cm dataset, encoded once into a cache (Rombach et al. 2022; DiT, SiT).

    The DataModule's ``resolution`` and the network's ``img_resolution`` are the latents' side
    (the images' divided by the VAE's downsampling), its channels the VAE's latent channels.
    The cache is built on first use (``load``), shared by the ranks under DDP; with
    ``data.init_args.flip`` it also holds the flipped images' latents. Samples decode through the
    denoiser's own VAE (``vae`` of ``cm.precond.EDMPrecond`` etc.), which must scale alike.

    Args:
        dataset: the image dataset, e.g. ``{class_path: cm.data.ImageNet, init_args: {path: DIR,
            resolution: 256}}``; it is read once, without augmentation.
        vae: the frozen VAE (``cm.vae.VAE``, e.g. SD's ``sd-vae-ft-ema``).
        cache: folder of the latent cache (outside the dataset; see ``cm.data.latents``).
        sample: ``posterior`` draws ``z`` from the VAE posterior per training sample (DiT,
            SiT/REPA, EDM2); ``mean`` uses the posterior mean.
        dtype: storage dtype of the cache (``float16`` halves it: ImageNet 256 with flips is
            42 GB in float16).
        batch_size: images per encoded chunk.
        num_workers: DataLoader workers reading the images while encoding.
    """

    def __init__(
        self,
        dataset: DataSource,
        vae: VAE,
        cache: str,
        sample: Literal["posterior", "mean"] = "posterior",
        dtype: CacheDtype = "float32",
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        self.dataset, self.vae, self.cache = data_source(dataset), vae, cache
        if self.dataset.text_encoder is not None:
            raise UserError(
                "cm.data.Latents encodes class-labelled or unlabelled images, not a captioned "
                "dataset: give an image dataset."
            )
        for name in ("path", "cache_dir"):
            where = getattr(self.dataset, name, None)
            for source in (where, vae.path):
                if source is None:
                    continue
                source = str(Path(source).expanduser())
                if same_file(str(Path(cache).expanduser()), source):
                    raise UserError(
                        f"The latent cache '{cache}' is inside an input ('{source}'): give a "
                        "cache folder outside the dataset and the VAE."
                    )
        self.sample, self.dtype = sample, dtype
        self.batch_size, self.num_workers = batch_size, num_workers
        self.channels, self.num_classes = vae.latent_channels, self.dataset.num_classes

    def pixels(self) -> Dataset:
        """The source images, unflipped (also the real images of ``cm eval ref``)."""
        return self.dataset.load(None, False, True)

    def size(self, resolution: int | None) -> int:
        """The latents' side; a DataModule ``resolution`` must equal it."""
        side = self.dataset.size(None) or self.pixels().resolution
        latent = side // self.vae.downsample
        if resolution is not None and resolution != latent:
            raise UserError(
                f"The VAE turns the {side}x{side} images into {latent}x{latent} latents but "
                f"data.init_args.resolution is {resolution}: set it to {latent} (or leave it "
                "out), and the network's img_resolution to match."
            )
        return latent

    def prepare(self) -> None:
        """The source dataset's own one-time work (the latents are encoded by ``load``)."""
        self.dataset.prepare()

    def load(self, resolution: int | None, flip: bool, use_labels: bool) -> Dataset:
        """Encode the cache unless it exists (all ranks share the work), then read it."""
        self.size(resolution)
        images = self.pixels()
        source = type(self.dataset)
        options = {
            k: v
            for k, v in vars(self.dataset).items()
            if isinstance(v, str | int | float | bool | None) and k not in ("path", "cache_dir")
        }
        identity = dataset_identity(images, f"{source.__module__}.{source.__qualname__}", options)
        encode_cache(
            images, self.vae, self.cache, identity, flip, self.batch_size, self.dtype,
            self.num_workers,
        )  # fmt: skip
        vae = self.vae
        return LatentDataset(
            self.cache, vae.scaling_factor, vae.shift_factor, flip, self.sample, use_labels
        )
