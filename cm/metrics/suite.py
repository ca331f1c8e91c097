"""``MetricSuite``: FID, IS, KID, precision/recall and CLIP score from one feature pass.

The feature network runs once per batch; FID, KID and IS are torchmetrics' metrics fed with the
features through a pass-through module, so their generated-sample states are torchmetrics states
(sums and concatenations) and ``compute`` syncs them across DDP ranks. The real side is a reference
file loaded identically on every rank and kept in non-persistent buffers.
"""

import itertools
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

from cm.errors import UserError
from cm.metrics.clip import ClipEncoder, CLIPScore
from cm.metrics.features import (
    INCEPTION_CLASSES,
    InceptionFeatures,
    PassThrough,
    build_extractor,
    to_nchw_uint8,
)
from cm.metrics.precision_recall import PrecisionRecall, cat_state
from cm.metrics.reference import load_reference, reference_features, reference_gaussian

METRICS = ("fid", "is", "kid", "precision", "recall", "clip_score")
NEEDS_REFERENCE = ("fid", "kid", "precision", "recall")


class ReferenceFID(FrechetInceptionDistance):
    """FID (Heusel et al. 2017, Eq. 6) of generated features against a fixed ``(mu, sigma)``.

    torchmetrics' metric with a pass-through feature module: ``update(features, real=False)``.

    Args:
        mu: reference mean ``[D]``.
        sigma: reference covariance ``[D, D]``.
    """

    def __init__(self, mu: Tensor, sigma: Tensor) -> None:
        super().__init__(feature=PassThrough(mu.shape[0]), reset_real_features=False)
        self.register_buffer("ref_mu", mu.double(), persistent=False)
        self.register_buffer("ref_sigma", sigma.double(), persistent=False)

    def compute(self) -> Tensor:
        """FID from the generated sums (as torchmetrics) and the reference Gaussian."""
        n = self.fake_features_num_samples
        if n < 2:
            raise UserError(f"FID needs at least 2 generated samples, got {int(n)}.")
        mean = (self.fake_features_sum / n).unsqueeze(0)
        cov = (self.fake_features_cov_sum - n * mean.T @ mean) / (n - 1)
        return _compute_fid(self.ref_mu, self.ref_sigma, mean.squeeze(0), cov).float()


class ReferenceKID(KernelInceptionDistance):
    """KID (Bińkowski et al. 2018, Eq. 4): unbiased polynomial-kernel MMD^2 over random subsets.

    Generated features are torchmetrics' ``fake_features`` state; the reference bank is a buffer.
    The subset size is ``min(subset_size, n_real, n_fake)``; subsets are drawn from a fixed seed
    (the global RNG is left alone).

    Args:
        reference: real features ``[N, D]``.
        subsets: number of subsets averaged.
        subset_size: images per subset (lowered to the sample count when fewer).
    """

    def __init__(self, reference: Tensor, subsets: int = 100, subset_size: int = 1000) -> None:
        with warnings.catch_warnings():  # torchmetrics warns that the features are kept
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(
                feature=PassThrough(reference.shape[1]), subsets=subsets, subset_size=subset_size
            )
        self.register_buffer("reference", reference.float(), persistent=False)

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` of the KID over the subsets."""
        fake = cat_state(self.fake_features)
        real = self.reference
        m = min(self.subset_size, real.shape[0], 0 if fake is None else fake.shape[0])
        if m < 2:
            raise UserError(f"KID needs at least 2 generated and 2 real samples, got {m}.")
        gen = torch.Generator().manual_seed(0)
        scores = []
        for _ in range(self.subsets):
            f_real = real[torch.randperm(real.shape[0], generator=gen)[:m].to(real.device)]
            f_fake = fake[torch.randperm(fake.shape[0], generator=gen)[:m].to(fake.device)]
            scores.append(poly_mmd(f_real.double(), f_fake.double(), self.degree, self.gamma))
        kid = torch.stack(scores)
        return kid.mean().float(), kid.std(unbiased=False).float()


class LogitsIS(InceptionScore):
    """Inception score (Salimans et al. 2016, Sec. 4) from unbiased Inception logits.

    torchmetrics' metric with a pass-through module; its split shuffle uses a fixed seed in a
    forked RNG so that evaluating never moves the training RNG.

    Args:
        splits: number of splits whose scores give the mean and standard deviation.
    """

    def __init__(self, splits: int = 10) -> None:
        with warnings.catch_warnings():  # torchmetrics warns that the features are kept
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(feature=PassThrough(INCEPTION_CLASSES), splits=splits)

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` of the score over the splits."""
        if cat_state(self.features) is None:
            raise UserError("IS needs at least one generated sample.")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(0)
            warnings.filterwarnings("ignore", "std\\(\\): degrees of freedom")  # 1 split: NaN std
            return super().compute()


class MetricSuite(nn.Module):
    """FID, IS, KID, precision/recall and CLIP score of generated images from one feature pass.

    Args:
        metrics: any subset of ``fid``, ``is``, ``kid``, ``precision``, ``recall``,
            ``clip_score``.
        feature: extractor of FID/KID/precision/recall: ``"inception"`` (torch-fidelity's
            Inception v3 pool3, 2048-d, as published tables), ``"clip"`` (image embeddings of
            ``clip_model``) or an ``nn.Module`` with ``num_features`` taking uint8
            ``[N, C, H, W]``. IS always uses the Inception.
        reference: reference ``.npz`` (``cm eval ref`` output or a guided-diffusion batch); None
            allows only ``is`` and ``clip_score``.
        kid_subset_size: KID subset size (lowered to the sample count when fewer).
        pr_k: k of the k-NN radii of precision/recall.
        clip_model: open_clip architecture for ``clip_score`` and ``feature="clip"``.
        clip_pretrained: open_clip pretrained tag.
        kid_subsets: number of KID subsets.
        is_splits: number of IS splits.
        device: where to build the suite; a feature bank extracted from a guided-diffusion
            batch's ``arr_0`` is computed there (None: CPU; or cache it once with ``cm eval ref``).
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("fid", "is", "kid", "precision", "recall"),
        feature: str | nn.Module = "inception",
        reference: str | Path | None = None,
        kid_subset_size: int = 1000,
        pr_k: int = 3,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str = "openai",
        kid_subsets: int = 100,
        is_splits: int = 10,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        metrics = tuple(dict.fromkeys(metrics))  # unique, in order
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise UserError(f"Unknown metrics {unknown}: choose among {', '.join(METRICS)}.")
        if reference is None and any(m in NEEDS_REFERENCE for m in metrics):
            raise UserError(
                f"{', '.join(m for m in metrics if m in NEEDS_REFERENCE)} need reference "
                "statistics: pass reference='ref.npz' (built with `cm eval ref`)."
            )
        self.metric_names = metrics
        ref = load_reference(reference) if reference is not None else None  # check before weights
        # (path, channels) only: the Reference holds the feature bank, kept once in the metrics
        self.reference_channels = None if ref is None else (ref.path, ref.channels)
        feature_metrics = [m for m in metrics if m in NEEDS_REFERENCE]
        self.extractor = (
            build_extractor(feature, clip_model, clip_pretrained)
            if feature_metrics
            or ("is" in metrics and isinstance(feature, str) and feature == "inception")
            else None
        )
        if self.extractor is not None and device is not None:
            self.extractor.to(device)
        self.inception = None  # a second network only when IS is asked with other features
        if "is" in metrics and not isinstance(self.extractor, InceptionFeatures):
            self.inception = InceptionFeatures()
        self.clip = None
        if "clip_score" in metrics:
            same = isinstance(self.extractor, ClipEncoder) and self.extractor.name == (
                f"clip:{clip_model}:{clip_pretrained}"
            )
            self.clip = None if same else ClipEncoder(clip_model, clip_pretrained)
        self.metrics = nn.ModuleDict()
        if feature_metrics:
            bank = None
            if {"kid", "precision", "recall"} & set(metrics) or ref.feature != self.extractor.name:
                bank = reference_features(ref, self.extractor)
                if bank.shape[1] != self.extractor.num_features:
                    raise UserError(
                        f"Reference '{ref.path}' has {bank.shape[1]}-d features but "
                        f"{self.extractor.name} gives {self.extractor.num_features}-d: rebuild "
                        "it with `cm eval ref` and this feature."
                    )
            if "fid" in metrics:
                self.metrics["fid"] = ReferenceFID(*reference_gaussian(ref, self.extractor, bank))
            if "kid" in metrics:
                self.metrics["kid"] = ReferenceKID(bank, kid_subsets, kid_subset_size)
            if "precision" in metrics or "recall" in metrics:
                self.metrics["pr"] = PrecisionRecall(bank, pr_k)
        if "is" in metrics:
            self.metrics["is"] = LogitsIS(is_splits)
        if "clip_score" in metrics:
            self.metrics["clip_score"] = CLIPScore()
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        """Where the networks and states live."""
        tensors = itertools.chain(self.parameters(), self.buffers())
        return next(tensors, torch.zeros(0)).device

    @torch.no_grad()
    def update(self, images: Tensor, captions: Sequence[str] | None = None) -> None:
        """Add a batch of generated images (and their captions, for ``clip_score`` only).

        Args:
            images: uint8 ``[N, H, W, C]`` or ``[N, C, H, W]``; 1 channel is repeated to 3 for
                Inception and CLIP.
            captions: one caption per image, required by ``clip_score``.
        """
        x = to_nchw_uint8(images, channels=None).to(self.device)
        path, channels = self.reference_channels or (None, None)
        if channels is not None and x.shape[1] != channels:
            raise UserError(
                f"The samples have {x.shape[1]} channel(s) but the reference '{path}' was built "
                f"from {channels}-channel images: score samples against a reference of the same "
                "data (cm eval ref --data with the model's training config)."
            )
        rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        logits = None
        if self.extractor is not None:
            ex_in = rgb if self.extractor.channels == 3 else x
            features, logits = self.extractor(ex_in)
            if "fid" in self.metrics:
                self.metrics["fid"].update(features, real=False)
            if "kid" in self.metrics:
                self.metrics["kid"].update(features, real=False)
            if "pr" in self.metrics:
                self.metrics["pr"].update(features)
        if "is" in self.metrics:
            if self.inception is not None:
                logits = self.inception(rgb)[1]
            self.metrics["is"].update(logits)
        if "clip_score" in self.metrics:
            if captions is None or len(captions) != x.shape[0]:
                raise UserError(
                    f"clip_score needs one caption per image: got {x.shape[0]} images and "
                    f"{0 if captions is None else len(captions)} captions (pass captions=[...])."
                )
            clip = self.clip if self.clip is not None else self.extractor
            image_emb = features if clip is self.extractor else clip.encode_images(rgb)
            self.metrics["clip_score"].update(image_emb, clip.encode_text(captions))

    def compute(self) -> dict[str, float]:
        """The metrics over all images seen on all ranks (collective: call on every rank).

        Returns:
            A dict with keys among ``fid``, ``is``, ``is_std``, ``kid``, ``kid_std``,
            ``precision``, ``recall``, ``clip_score``.
        """
        out: dict[str, float] = {}
        if "fid" in self.metrics:
            out["fid"] = float(self.metrics["fid"].compute())
        if "is" in self.metrics:
            mean, std = self.metrics["is"].compute()
            out["is"], out["is_std"] = float(mean), float(std)
        if "kid" in self.metrics:
            mean, std = self.metrics["kid"].compute()
            out["kid"], out["kid_std"] = float(mean), float(std)
        if "pr" in self.metrics:
            precision, recall = self.metrics["pr"].compute()
            out.update(precision=float(precision), recall=float(recall))
        if "clip_score" in self.metrics:
            out["clip_score"] = float(self.metrics["clip_score"].compute())
        asked = {m for m in self.metric_names} | {f"{m}_std" for m in self.metric_names}
        return {k: v for k, v in out.items() if k in asked}

    def reset(self) -> None:
        """Forget the generated samples; the reference statistics stay loaded."""
        for metric in self.metrics.values():
            metric.reset()
