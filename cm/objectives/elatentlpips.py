"""E-LatentLPIPS, the latent-space perceptual distance of Kang et al. 2024 (Sec. 3.2)."""

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from cm.errors import UserError
from cm.networks.latent_vgg import LatentVGG16BN
from cm.objectives.augment import PRESETS, augment

RELEASE = "https://huggingface.co/Mingguksky/elatentlpips/tree/main/elatentlpips_ckpt"
Format = Literal["cm", "elatentlpips"]


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file, a ``.pt`` state dict or a ``.ckpt``/``.pth.tar``.

    Pickles are read with ``weights_only=True``; a checkpoint's ``state_dict`` entry is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"E-LatentLPIPS weights '{path}' not found: train them with configs/"
            f"elatentlpips_2afc.yaml, or download <encoder>_latest_vgg16_tuned.pth (the "
            f"elatentlpips release) from {RELEASE} and pass format='elatentlpips'."
        )
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code; not a torch file at all
        raise UserError(
            f"'{path}' is not a checkpoint of plain tensors ({type(e).__name__}): save "
            "module.state_dict() with torch.save or safetensors."
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"'{path}' is not a state dict: save module.state_dict() with torch.save.")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


# elatentlpips release -> ours. The tuned file is its ELatentLPIPS.state_dict(): net.slice{1-5}
# hold vgg16_bn's features under their torchvision indices (0-6, 7-13, 14-23, 24-33, 34-43), and
# lin{k}.model.{0 or 1 after Dropout}.weight are the 1x1 heads. The trunk-only file
# <encoder>_latent_vgg16.pth.tar is {'state_dict': {'module.model.features|classifier.*'}, ...}.
PUBLISHED_KEYS = (
    (re.compile(r"^net\.slice[1-5]\.(\d+)\.(\w+)$"), r"trunk.features.\1.\2"),
    (re.compile(r"^lin([0-4])\.model\.[01]\.weight$"), r"heads.\1.weight"),
    (re.compile(r"^(?:module\.)?model\.(features|classifier)\.(\d+)\.(\w+)$"), r"trunk.\1.\2.\3"),
)


def convert_published(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an ``elatentlpips`` release state dict to ``ELatentLPIPS`` keys (drops others)."""
    out = {}
    for key, value in state.items():
        for pattern, target in PUBLISHED_KEYS:
            if pattern.match(key):
                out[pattern.sub(target, key)] = value
                break
    return out


def _submodule(state: dict[str, Tensor], anchor: str) -> dict[str, Tensor]:
    """The entries under the prefix that ``anchor`` has in ``state`` (Lightning adds prefixes)."""
    prefix = next((k[: -len(anchor)] for k in state if k.endswith(anchor)), None)
    if prefix is None:
        return {}
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _load(module: nn.Module, state: dict[str, Tensor], path: str | Path, strict: bool) -> None:
    """``load_state_dict`` with one sentence instead of PyTorch's list on a mismatch."""
    try:
        module.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise UserError(
            f"'{path}' does not fit this {type(module).__name__} ({first.strip()}): check "
            "latent_channels, widths and format."
        ) from None


def load_trunk(trunk: LatentVGG16BN, path: str | Path, format: Format = "cm") -> None:
    """Kang et al. 2024, Sec. 3.2: load the ImageNet-latent VGG into ``trunk``.

    Args:
        trunk: the network to fill.
        path: a ``LatentVGGClassifier`` checkpoint or safetensors file (``format="cm"``), or the
            release's ``<encoder>_latent_vgg16.pth.tar`` / tuned file (``"elatentlpips"``).
        format: key layout of ``path``.
    """
    state = read_weights(path)
    if format == "elatentlpips":
        state = _submodule(convert_published(state), "features.0.weight")
    else:
        state = _submodule(state, "features.0.weight")
    if not state:
        raise UserError(f"'{path}' holds no latent VGG features: is format={format!r} right?")
    if not trunk.num_classes:
        state = {k: v for k, v in state.items() if k.startswith("features.")}
    _load(trunk, state, path, strict=trunk.num_classes > 0)


def unit_normalize(f: Tensor, eps: float = 1e-8) -> Tensor:
    """Zhang et al. 2018, Eq. 1: features unit-normalised over channels (release's eps)."""
    return f * torch.rsqrt(f.pow(2).sum(1, keepdim=True) + eps)


class ELatentLPIPS(nn.Module):
    """Kang et al. 2024, Sec. 3.2: LPIPS on VAE latents with an augmentation ensemble.

    ``d(x, y) = sum_k mean_hw w_k . (f_k(x') - f_k(y'))^2 + l1_weight * mean|x - y|`` with
    ``f_k`` the unit-normalised taps of ``LatentVGG16BN``, ``w_k >= 0`` the 1x1 heads and
    ``(x', y') = augment(x, y)`` drawn afresh each call (the ensemble is over training steps).
    The trunk is frozen in eval mode and runs in float32 under autocast; the heads are frozen
    too unless a calibration module unfreezes them. Without ``path`` the heads are all ones
    (LPIPS' uncalibrated "baseline": a plain channel sum).

    Args:
        latent_channels: channels of the latents (4 for SD1.5).
        augment: augmentation letters from ``bgco`` (``""`` for plain LatentLPIPS).
        l1_weight: weight of the latent L1 term (the release's forward adds it with weight 1).
        path: weights: ours (safetensors or ``.ckpt`` of ``ELatentLPIPSCalibration``) or the
            release's ``<encoder>_latest_vgg16_tuned.pth``.
        format: ``"cm"`` or ``"elatentlpips"`` (the release's key names, remapped).
        widths: trunk widths (VGG16: 64, 128, 256, 512, 512); small values for tests.
        latent_scale: multiplies ``x - latent_shift`` first (the release's ``normalize=True``:
            0.18215 for raw SD1.5 latents); 1 for latents already scaled.
        latent_shift: subtracted before scaling (SD3: 0.0609, FLUX: 0.1159).
        dropout: dropout on the squared differences before the heads while training them.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        augment: str = "bg",
        l1_weight: float = 0.0,
        path: str | None = None,
        format: Format = "cm",
        widths: Sequence[int] = (64, 128, 256, 512, 512),
        latent_scale: float = 1.0,
        latent_shift: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if set(augment) - set(PRESETS):
            raise UserError(f"augment must use letters from 'bgco' (e.g. 'bg'), got {augment!r}.")
        self.augment, self.l1_weight, self.dropout = augment, l1_weight, dropout
        self.latent_scale, self.latent_shift = latent_scale, latent_shift
        self.trunk = LatentVGG16BN(latent_channels, widths)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        for head in self.heads:
            nn.init.ones_(head.weight)
        if path is not None:
            self.load(path, format)
        self.requires_grad_(False).eval()

    def load(self, path: str | Path, format: Format = "cm") -> None:
        """Read trunk and heads from ``path`` (ours, or the release's by key remap)."""
        state = read_weights(path)
        match format:
            case "elatentlpips":
                state = convert_published(state)
                if not any(k.startswith("heads.") for k in state):
                    raise UserError(
                        f"'{path}' holds a latent VGG trunk but no calibrated heads: pass the "
                        f"release's <encoder>_latest_vgg16_tuned.pth from {RELEASE}."
                    )
                state = {k: v for k, v in state.items() if not k.startswith("trunk.classifier")}
            case "cm":
                state = _submodule(state, "trunk.features.0.weight")
        _load(self, state, path, strict=True)

    def train(self, mode: bool = True) -> "ELatentLPIPS":
        """Keep the trunk in eval mode (BatchNorm statistics fixed); heads follow ``mode``."""
        super().train(mode)
        self.trunk.eval()
        return self

    def forward(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """E-LatentLPIPS per sample, ``[N]``; ``generator`` fixes the augmentation draw."""
        with torch.autocast(x.device.type, enabled=False):
            x = (x.float() - self.latent_shift) * self.latent_scale
            y = (y.float() - self.latent_shift) * self.latent_scale
            d = x.new_zeros(x.shape[0])
            if self.l1_weight:
                d = d + self.l1_weight * (x - y).abs().flatten(1).mean(1)  # before augmentation
            if self.augment:
                x, y = augment(x, y, self.augment, generator)
            feats = self.trunk.taps(torch.cat([x, y]))  # one pass: BN is in eval mode
            for f, head in zip(feats, self.heads, strict=True):
                fx, fy = unit_normalize(f).chunk(2)
                diff = F.dropout((fx - fy).pow(2), self.dropout, self.training)
                d = d + head(diff).mean([1, 2, 3])
            return d
