"""Feature extractors of the metrics: torch-fidelity's Inception v3, open_clip, or any module.

Every extractor takes uint8 images ``[N, C, H, W]`` and returns ``(features [N, D], logits)``,
where ``logits`` are Inception's unbiased ``[N, 1008]`` logits (for IS) or None. The Inception is
the port of the TF graph used for published FID/IS/KID tables (Heusel et al. 2017, Salimans et al.
2016), with the TF1-compatible bilinear resize to 299x299 (``antialias=False``).
"""

import importlib
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import NoTrainInceptionV3

from cm.errors import UserError
from cm.metrics.autocast import no_autocast
from cm.metrics.clip import ClipEncoder
from cm.weights import REGISTRY, load_state_dict

INCEPTION_FEATURES = 2048
INCEPTION_CLASSES = 1008  # the TF graph's 1000 classes plus 8 unused ones


def to_nchw_uint8(images: Tensor | Any, channels: int | None = 3) -> Tensor:
    """uint8 ``[N, H, W, C]`` (the ``.npz`` layout) or ``[N, C, H, W]`` images as ``[N, C, H, W]``.

    Args:
        images: a uint8 tensor or numpy array with 1 or 3 channels, channels first or last.
        channels: channels the extractor wants: 1-channel images are repeated to 3 when it is 3;
            None leaves them as they are.

    Returns:
        A contiguous uint8 tensor ``[N, C, H, W]``.
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise UserError(
            f"Expected uint8 images [N, H, W, C] or [N, C, H, W], got {x.dtype} of shape "
            f"{tuple(x.shape)}: convert with cm.io.to_uint8 first."
        )
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
    elif x.shape[1] not in (1, 3):
        raise UserError(
            f"Cannot tell the channel axis of images of shape {tuple(x.shape)}: expected 1 or 3 "
            "channels first ([N, C, H, W]) or last ([N, H, W, C])."
        )
    if channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grayscale as RGB, as the Inception/CLIP inputs expect
    return x.contiguous()


class _WeightsHandedOver(Exception):
    """torch-fidelity's Inception constructor reached for its weights file (cm loads them)."""


class _NoWeightsFile:
    """Stands in for torch-fidelity's weights path: its first use stops the constructor.

    ``FeatureExtractorInceptionV3.__init__`` builds its layers, then calls ``torch.load(path,
    weights_only=False)`` on the path it is given (or downloads when it is None). Opening this
    object raises ``_WeightsHandedOver`` before a byte is read, so torch-fidelity unpickles
    nothing; cm then loads its SHA-256-checked, ``weights_only`` state dict into the layers.
    """

    def __fspath__(self) -> str:
        raise _WeightsHandedOver

    def __getattr__(self, name: str) -> Any:
        raise _WeightsHandedOver


class TFInception(NoTrainInceptionV3):
    """torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's layers) filled with ``state``.

    Args:
        state: torch-fidelity's Inception state dict (from ``cm.weights.load_state_dict``).
    """

    def __init__(self, state: dict[str, Tensor]) -> None:
        features = [str(INCEPTION_FEATURES), "logits_unbiased"]
        try:
            super().__init__("inception-v3-compat", features, _NoWeightsFile(), antialias=False)
        except _WeightsHandedOver:
            pass  # the layers exist; what follows torch.load in torch-fidelity is redone here
        else:  # a torch-fidelity that no longer opens the path: a bug to see, not a user error
            raise TypeError("this torch-fidelity's Inception did not ask for its weights file")
        self.use_antialias = False  # TF1-compatible resize: the numbers of published tables
        self.load_state_dict(state)  # strict: every layer gets a published tensor
        self.requires_grad_(False).eval()


class InceptionFeatures(nn.Module):
    """Inception v3 pool3 features and unbiased logits, as torch-fidelity (Szegedy et al. 2016).

    Weights are torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` found by
    ``cm.weights.find("inception")`` (a missing file is one ``FileNotFoundError``), checked
    against its published SHA-256 and read with ``weights_only=True``: a replaced file is one
    ``UserError`` and never runs code.

    Args:
        weights_path: the weights file; None looks it up in ``$CM_WEIGHTS`` and the torch hub cache.
    """

    num_features = INCEPTION_FEATURES
    channels = 3
    name = "inception"

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        state = load_state_dict("inception", weights_path)
        try:
            self.net = TFInception(state)
        except RuntimeError:  # wrong keys or shapes: another network's state dict
            spec = REGISTRY["inception"]
            raise UserError(
                f"'{weights_path or spec.filename}' is not torch-fidelity's Inception state dict "
                f"(missing, unexpected or misshapen keys): download {spec.filename} again from "
                f"{spec.url}."
            ) from None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``[N, 3, H, W]`` uint8 -> pool3 features ``[N, 2048]``, unbiased logits ``[N, 1008]``."""
        with no_autocast(images.device):
            features, logits = self.net._torch_fidelity_forward(images)
        return features.float(), logits.float()


class ModuleFeatures(nn.Module):
    """A user module ``uint8 [N, C, H, W] -> [N, num_features]`` as an extractor (no logits).

    Args:
        module: an ``nn.Module`` with an int attribute ``num_features``; it gets the images with
            the channels they have (no repetition to RGB).
    """

    channels = None

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        num = getattr(module, "num_features", None)
        if isinstance(num, Tensor):
            num = int(num.item())
        if not isinstance(num, int) or num < 1:
            raise TypeError(
                f"Feature module {type(module).__name__} needs an int attribute num_features "
                "(the length of the vectors its forward returns)."
            )
        self.module = module.eval().requires_grad_(False)
        self.num_features = num
        self.name = f"{type(module).__module__}.{type(module).__qualname__}"

    def forward(self, images: Tensor) -> tuple[Tensor, None]:
        """``[N, C, H, W]`` uint8 -> features ``[N, num_features]`` (float32), no logits."""
        with no_autocast(images.device):
            features = self.module(images)
        if features.ndim != 2 or features.shape != (images.shape[0], self.num_features):
            raise UserError(
                f"Feature module {self.name} returned shape {tuple(features.shape)}; expected "
                f"[{images.shape[0]}, {self.num_features}] (one vector of num_features per image)."
            )
        return features.float(), None


class PassThrough(nn.Module):
    """Identity with ``num_features``: lets torchmetrics' FID/KID/IS take precomputed features.

    Args:
        num_features: the feature length the metric sizes its states with.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        """Return ``features`` ``[N, num_features]`` unchanged."""
        return features


def build_extractor(
    feature: str | nn.Module, clip_model: str = "ViT-L-14", clip_pretrained: str = "openai"
) -> nn.Module:
    """The extractor named by ``feature``: ``inception``, ``clip``, or a module (wrapped).

    Args:
        feature: ``"inception"``, ``"clip"`` (the image tower of ``clip_model``), an
            ``nn.Module`` with ``num_features`` taking uint8 ``[N, C, H, W]``, or the import
            path of such a class (built with no arguments).
        clip_model: open_clip architecture for ``"clip"``.
        clip_pretrained: open_clip pretrained tag for ``"clip"``.

    Returns:
        A module with ``num_features``, ``channels``, ``name`` and ``forward -> (features,
        logits or None)``.
    """
    if isinstance(feature, nn.Module):
        return ModuleFeatures(feature)
    if feature == "inception":
        return InceptionFeatures()
    if feature == "clip":
        return ClipEncoder(clip_model, clip_pretrained)
    return ModuleFeatures(import_feature(feature))


def import_feature(path: str) -> nn.Module:
    """The feature module at an import path ``pkg.module.Class``, built with no arguments."""
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(
            f"Feature {path!r} is neither inception, clip nor an importable nn.Module class "
            "(pkg.module.ClassName) with num_features."
        ) from None
    return cls()


@torch.no_grad()
def extract(extractor: nn.Module, images: Tensor, batch_size: int = 100) -> Tensor:
    """Features ``[N, D]`` (float32, on CPU) of uint8 ``images`` in batches of ``batch_size``.

    Args:
        extractor: a module from ``build_extractor``.
        images: uint8 ``[N, H, W, C]`` or ``[N, C, H, W]`` (tensor or numpy array).
        batch_size: images per forward pass.
    """
    device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    out = []
    for start in range(0, len(images), batch_size):
        x = to_nchw_uint8(images[start : start + batch_size], extractor.channels)
        out.append(extractor(x.to(device))[0].cpu())
    if not out:
        return torch.zeros(0, extractor.num_features)
    return torch.cat(out)
