"""The latent VGG16-BN of E-LatentLPIPS (Kang et al. 2024, Sec. 3.2 and App.)."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cm.errors import UserError

# VGG16's convolutions per stage (Simonyan & Zisserman 2015, configuration D).
DEPTHS = (2, 2, 3, 3, 3)


class LatentVGG16BN(nn.Module):
    """Kang et al. 2024, Sec. 3.2: VGG16-BN on VAE latents, first three max-pools removed.

    ``features`` keeps torchvision's ``vgg16_bn`` indices (conv, BN, ReLU per layer; a stage ends
    with its max-pool, an ``nn.Identity`` for the first three), so published trunks load by key.
    ``taps`` returns each stage's output, the five LPIPS features: as in the ``elatentlpips``
    release, the last two are taken after their (kept) max-pool, i.e. ``pool(relu4_3)`` and
    ``pool(relu5_3)``; a 16x16 latent gives 16, 16, 16, 8, 4 pixels.

    Args:
        in_channels: latent channels (4 for SD1.5/SD2/SDXL, 16 for SD3/FLUX).
        widths: feature widths of the five stages (VGG16: 64, 128, 256, 512, 512).
        num_classes: classifier outputs for the ImageNet pre-training; 0 builds no classifier.
        hidden: width of the two hidden classifier layers (torchvision: 4096).
        pool_size: side of the adaptive average pool before the classifier (torchvision: 7).
        dropout: classifier dropout.
    """

    def __init__(
        self,
        in_channels: int = 4,
        widths: Sequence[int] = (64, 128, 256, 512, 512),
        num_classes: int = 0,
        hidden: int = 4096,
        pool_size: int = 7,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if len(widths) != len(DEPTHS):
            raise UserError(f"widths needs one width per VGG16 stage (5), got {list(widths)}.")
        self.in_channels, self.widths, self.num_classes = in_channels, tuple(widths), num_classes
        layers: list[nn.Module] = []
        self.tap_indices: list[int] = []
        c_in = in_channels
        for stage, (depth, c) in enumerate(zip(DEPTHS, widths, strict=True)):
            for _ in range(depth):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(True)]
                c_in = c
            layers.append(nn.MaxPool2d(2, 2) if stage >= 3 else nn.Identity())
            self.tap_indices.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        if num_classes:
            self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
            # torchvision's layout, so classifier.{0,3,6} keys match published checkpoints
            self.classifier = nn.Sequential(
                nn.Linear(c_in * pool_size**2, hidden),
                nn.ReLU(True),
                nn.Dropout(dropout),
                nn.Linear(hidden, hidden),
                nn.ReLU(True),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )

    def taps(self, x: Tensor) -> list[Tensor]:
        """Zhang et al. 2018, Sec. 3: the five stage outputs ``[N, widths[k], H_k, W_k]``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise UserError(
                f"LatentVGG16BN expects [N, {self.in_channels}, H, W] latents, got "
                f"{list(x.shape)}: set in_channels to the VAE's latent channels."
            )
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.tap_indices:
                out.append(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[N, num_classes]`` for the latent ImageNet pre-training (Sec. 3.2)."""
        if not self.num_classes:
            raise UserError("This LatentVGG16BN has no classifier: build it with num_classes > 0.")
        h = self.avgpool(self.taps(x)[-1])
        return self.classifier(torch.flatten(h, 1))
