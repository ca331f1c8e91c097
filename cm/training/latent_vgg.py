"""Training E-LatentLPIPS (Kang et al. 2024, Sec. 3.2): latent ImageNet VGG, then 2AFC heads.

Both stages read latents encoded beforehand by the VAE (SD1.5: ``vae.encode(x).sample() *
0.18215``) and stored as one ``.npy`` per field in a directory (memory-mapped, so ImageNet's
1.28M latents need not fit in memory): ``latents.npy`` ``[N, C, H, W]`` + ``labels.npy`` ``[N]``
for ImageNet; ``ref.npy``, ``p0.npy``, ``p1.npy`` ``[N, C, H, W]`` + ``judge.npy`` ``[N]`` (the
fraction of people who found ``p1`` closer to ``ref``) for BAPPS' 2AFC splits.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cm.errors import UserError
from cm.networks.latent_vgg import LatentVGG16BN
from cm.objectives.elatentlpips import ELatentLPIPS, load_trunk
from cm.training.base import ConfiguredModule


class NpyFields(Dataset):
    """Rows of several memory-mapped ``<field>.npy`` arrays in ``root``, as float/int tensors."""

    def __init__(self, root: str | Path, fields: Sequence[str]) -> None:
        root = Path(root)
        missing = [f"{f}.npy" for f in fields if not (root / f"{f}.npy").is_file()]
        if missing:
            raise FileNotFoundError(
                f"'{root}' lacks {', '.join(missing)}: encode the images with the VAE and save "
                f"each field with numpy.save as cm/training/latent_vgg.py describes."
            )
        self.arrays = [np.load(root / f"{f}.npy", mmap_mode="r") for f in fields]
        if len({len(a) for a in self.arrays}) != 1:
            raise UserError(f"The arrays in '{root}' ({', '.join(fields)}) differ in length.")

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        rows = (np.array(a[i]) for a in self.arrays)
        return tuple(
            torch.from_numpy(r).long() if r.dtype.kind in "iu" else torch.from_numpy(r).float()
            for r in rows
        )


class LatentFieldsDataModule(L.LightningDataModule):
    """Latent datasets as ``.npy`` fields: ImageNet classification or BAPPS 2AFC (module doc).

    Args:
        train: directory of the training split.
        val: directory of the validation split (optional).
        task: ``"imagenet"`` (latents, labels) or ``"2afc"`` (ref, p0, p1, judge).
        batch_size: per-device batch size.
        num_workers: data loader workers.
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        task: Literal["imagenet", "2afc"] = "imagenet",
        batch_size: int = 64,
        num_workers: int = 4,
    ) -> None:
        super().__init__()
        match task:
            case "imagenet":
                self.fields = ("latents", "labels")
            case "2afc":
                self.fields = ("ref", "p0", "p1", "judge")
        self.train, self.val, self.batch_size, self.num_workers = (
            train,
            val,
            batch_size,
            num_workers,
        )

    def _loader(self, root: str, shuffle: bool) -> DataLoader:
        ds = NpyFields(root, self.fields)
        return DataLoader(
            ds, self.batch_size, shuffle=shuffle, num_workers=self.num_workers, drop_last=shuffle
        )

    def train_dataloader(self) -> DataLoader:  # noqa: D102 - Lightning hook
        return self._loader(self.train, True)

    def val_dataloader(self) -> DataLoader | list:  # noqa: D102 - Lightning hook
        return self._loader(self.val, False) if self.val else []


class LatentVGGClassifier(ConfiguredModule):
    """Kang et al. 2024, Sec. 3.2: pre-train ``LatentVGG16BN`` to classify ImageNet latents.

    Cross-entropy on the VAE latents of ImageNet images, with a random x-flip of the latent (the
    latent of a flipped image is close to the flipped latent). Validation logs top-1/top-5.

    Args:
        net: the latent VGG with ``num_classes=1000``.
        optimizer: optimizer factory over the network's parameters.
        lr_scheduler: optional scheduler factory, stepped every epoch.
        flip: random horizontal flips of the training latents.
    """

    def __init__(
        self,
        net: LatentVGG16BN,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        flip: bool = True,
    ) -> None:
        super().__init__()
        if not net.num_classes:
            raise UserError("LatentVGGClassifier needs a classifier: set net num_classes: 1000.")
        self.net, self.flip = net, flip
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler

    def configure_optimizers(self):  # noqa: D102 - Lightning hook
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy of one batch of (latent, label)."""
        z, labels = batch
        if self.flip:
            flip = torch.rand(len(z), 1, 1, 1, device=z.device) < 0.5
            z = torch.where(flip, z.flip(-1), z)
        loss = F.cross_entropy(self.net(z), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(z))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Top-1 and top-5 accuracy."""
        z, labels = batch
        top5 = self.net(z).topk(min(5, self.net.num_classes), 1).indices
        self.log("val/top1", (top5[:, 0] == labels).float().mean(), batch_size=len(z))
        self.log("val/top5", (top5 == labels[:, None]).any(1).float().mean(), batch_size=len(z))


class RankNet(nn.Module):
    """Zhang et al. 2018, Sec. 3 (``Dist2LogitLayer``): ``G(d0, d1)`` -> P(p1 judged closer)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(5, hidden, 1),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(hidden, hidden, 1),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, d0: Tensor, d1: Tensor, eps: float = 0.1) -> Tensor:
        """Logit ``[N]`` from the two distances ``[N]`` (and their difference and ratios)."""
        h = torch.stack([d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)], 1)
        return self.net(h[..., None, None]).flatten()


class ELatentLPIPSCalibration(ConfiguredModule):
    """Kang et al. 2024, Sec. 3.2 (as Zhang et al. 2018, Sec. 3): fit the 1x1 heads on 2AFC.

    The trunk stays frozen; the heads and a small ranking network ``G`` learn
    ``BCE(G(d(ref, p0), d(ref, p1)), judge)``, and the heads are clamped to ``w >= 0`` after every
    step (as the ``lpips`` trainer). The checkpoint loads into ``ELatentLPIPS(path=...)``.
    Validation logs the 2AFC score, ``judge`` when ``d1 < d0``, ``1 - judge`` when ``d0 < d1``.

    Args:
        metric: the distance whose heads are trained (its trunk is replaced by ``trunk``).
        trunk: the stage-1 checkpoint (``LatentVGGClassifier``'s ``.ckpt`` or safetensors), or
            the release's ``<encoder>_latent_vgg16.pth.tar`` with ``trunk_format="elatentlpips"``.
        trunk_format: key layout of ``trunk``.
        optimizer: optimizer factory over heads and ranking network (``lpips``: Adam, lr 1e-4,
            betas (0.5, 0.999)).
        rank_hidden: width of the ranking network.
    """

    def __init__(
        self,
        metric: ELatentLPIPS,
        trunk: str | None = None,
        trunk_format: Literal["cm", "elatentlpips"] = "cm",
        optimizer: OptimizerCallable = torch.optim.Adam,
        rank_hidden: int = 32,
    ) -> None:
        super().__init__()
        self.metric, self.rank = metric, RankNet(rank_hidden)
        if trunk is not None:
            load_trunk(metric.trunk, trunk, trunk_format)
        metric.heads.requires_grad_(True)
        self.optimizer_factory = optimizer

    def configure_optimizers(self):  # noqa: D102 - Lightning hook
        return self.optimizer_factory([*self.metric.heads.parameters(), *self.rank.parameters()])

    def distances(self, ref: Tensor, p0: Tensor, p1: Tensor) -> tuple[Tensor, Tensor]:
        """``d(ref, p0)`` and ``d(ref, p1)``, each ``[N]``."""
        return self.metric(ref, p0), self.metric(ref, p1)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """The ranking BCE of one 2AFC batch."""
        ref, p0, p1, judge = batch
        d0, d1 = self.distances(ref, p0, p1)
        loss = F.binary_cross_entropy_with_logits(self.rank(d0, d1), judge.float())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(ref))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:  # noqa: D102
        with torch.no_grad():
            for head in self.metric.heads:
                head.weight.clamp_(min=0)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """The 2AFC agreement with people (Zhang et al. 2018, Sec. 4)."""
        ref, p0, p1, judge = batch
        d0, d1 = self.distances(ref, p0, p1)
        score = (d1 < d0) * judge + (d0 < d1) * (1 - judge) + (d0 == d1) * 0.5
        self.log("val/2afc", score.float().mean(), prog_bar=True, batch_size=len(ref))
