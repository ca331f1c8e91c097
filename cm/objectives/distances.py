"""Distances ``d(x, y) -> [N]`` between image batches, injected into objectives."""

import math
import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cm import weights
from cm.errors import UserError


class SquaredL2(nn.Module):
    """Song et al. 2023, Sec. 3: ``d(x, y) = ||x - y||_2^2``, averaged over dimensions."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean squared error per sample, ``[N]``."""
        return (x - y).pow(2).flatten(1).mean(1)


class L1(nn.Module):
    """Song et al. 2023, Sec. 3: ``d(x, y) = ||x - y||_1``, averaged over dimensions."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean absolute error per sample, ``[N]``."""
        return (x - y).abs().flatten(1).mean(1)


class PseudoHuber(nn.Module):
    """Song & Dhariwal 2023, Sec. 3.3: ``d(x, y) = sqrt(||x - y||^2 + c^2) - c``.

    Args:
        c: the Huber scale; None gives iCT's ``c = 0.00054 sqrt(d)`` for ``d = C*H*W``.
    """

    def __init__(self, c: float | None = None) -> None:
        super().__init__()
        self.c = c

    def scale(self, x: Tensor) -> float:
        """The ``c`` used for inputs shaped like ``x``."""
        return self.c if self.c is not None else 0.00054 * math.sqrt(x[0].numel())

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Pseudo-Huber distance per sample (over the whole image, not per pixel), ``[N]``."""
        c = self.scale(x)
        return ((x - y).pow(2).flatten(1).sum(1) + c**2).sqrt() - c


# torchvision ImageNet trunks used by the lpips package (entries of ``cm.weights.REGISTRY``).
LPIPS_TRUNKS = {"vgg": "vgg16", "alex": "alexnet"}


def _average_pooling_(module: nn.Module) -> None:
    """Replace every ``MaxPool2d`` inside ``module`` by an ``AvgPool2d`` of the same window."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))


class LPIPS(nn.Module):
    """Zhang et al. 2018 LPIPS (the ``lpips`` package), CM's distance (Song et al. 2023, Sec. 5).

    Inputs in ``[-1, 1]`` below 256 px are resized bilinearly to 224 (openai/consistency_models).
    The VGG16 trunk is read from ``$CM_WEIGHTS`` or the torch hub cache (never downloaded here)
    and checked against its published SHA-256; the calibration heads ship with the ``lpips``
    package. Grayscale inputs are repeated to RGB.

    ``pooling="avg"`` replaces the trunk's max-pooling by average pooling of the same size (2x2
    for VGG), the variant openai/consistency_models trains with (piq's ``LPIPS(replace_pooling=
    True)`` on ``(x + 1) / 2``). It is otherwise the same function: piq's ImageNet mean/std
    normalisation of ``[0, 1]`` inputs equals lpips' ``ScalingLayer`` on ``[-1, 1]`` (shift
    ``2 mean - 1``, scale ``2 std``), both unit-normalise features with eps 1e-10, weight squared
    differences per channel and average spatially over relu1_2 ... relu5_3. piq downloads its own
    ``lpips_weights.pt`` heads, documented as the LPIPS v0.1 VGG weights that the ``lpips``
    package ships; that file was not compared byte for byte here (no network).

    Args:
        net: backbone, ``"vgg"`` (CM) or ``"alex"``.
        resize: side to resize to when inputs are smaller than 256 px; 0 disables it.
        pooling: ``"max"`` (LPIPS as published) or ``"avg"`` (openai/consistency_models).
    """

    def __init__(
        self, net: str = "vgg", resize: int = 224, pooling: Literal["max", "avg"] = "max"
    ) -> None:
        super().__init__()
        import lpips

        self.resize, self.pooling = resize, pooling
        if net not in LPIPS_TRUNKS:
            raise UserError(f"LPIPS net must be one of {sorted(LPIPS_TRUNKS)}, got {net!r}.")
        # Nothing here lets lpips or torchvision torch.load a file: the trunk comes from the
        # SHA-256-checked cache and the heads from the package, both read with weights_only=True.
        spec = weights.entry(LPIPS_TRUNKS[net])
        state = weights.load_state_dict(spec)
        self.lpips = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        missing, _ = self.lpips.load_state_dict(
            torch.load(heads, map_location="cpu", weights_only=True), strict=False
        )
        # lpips registers each head twice (lin<k> and lins.<k>, one tensor); the file has lin<k>
        if lost := [key for key in missing if re.match(r"lin\d", key)]:
            raise UserError(f"The lpips package's heads '{heads}' lack {lost[0]}: reinstall it.")
        # lpips keeps torchvision's indices: net.sliceK.<idx>.<param> <- features.<idx>.<param>
        trunk = {}
        for key in self.lpips.net.state_dict():
            _, idx, param = key.split(".")
            if f"features.{idx}.{param}" not in state:
                raise UserError(
                    f"'{spec.filename}' is not a torchvision {net} checkpoint: download it "
                    f"again (`cm weights fetch {spec.name}`)."
                )
            trunk[key] = state[f"features.{idx}.{param}"]
        self.lpips.net.load_state_dict(trunk)
        match pooling:
            case "avg":
                _average_pooling_(self.lpips.net)
            case "max":
                pass
        self.lpips.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LPIPS":
        """Keep the metric network in eval mode."""
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS per sample, ``[N]``, computed in float32 whatever the autocast dtype."""
        # CT/CD compare two nearly equal images: in bf16 the feature differences that carry the
        # gradient drown in rounding, so the metric network runs in float32 (as piq does in
        # openai/consistency_models, which trains in fp16 but evaluates LPIPS in fp32).
        with torch.autocast(x.device.type, enabled=False):
            x, y = x.float(), y.float()
            if x.shape[1] == 1:
                x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
            if self.resize and x.shape[-1] < 256:
                x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False)
                y = F.interpolate(y, size=self.resize, mode="bilinear", align_corners=False)
            return self.lpips(x, y).flatten(1).mean(1)
