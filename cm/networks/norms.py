"""Normalization layers shared by the UNets: GroupNorm under autocast and pixel normalization.

``GroupNorm`` is ``nn.GroupNorm`` (same parameters, same state-dict keys, same values outside
autocast) that runs in float32 under autocast on every device, as CUDA's autocast already does
(``group_norm`` is on its float32 list). CPU autocast instead runs a bfloat16 group norm whose
forward-mode derivative comes out in float32 next to a bfloat16 value, and the next convolution
rejects that tangent, so ``torch.func.jvp`` through a UNet (sCM, Lu & Song 2024) fails under CPU
bf16 autocast without it.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm(nn.GroupNorm):
    """Wu & He 2018 (Eq. 1-2): GroupNorm computed in float32 (float64 for float64) under autocast.

    Outside autocast it is ``nn.GroupNorm`` exactly. Under autocast the output is float32, as
    CUDA autocast's ``group_norm`` (and OpenAI's ``GroupNorm32``) gives.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` ``[N, C, ...]`` over groups of channels and the spatial positions."""
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps)


def pixel_norm(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """Karras et al. 2018 (PGGAN, Sec. 4.2): ``x / sqrt(mean_j x_j^2 + eps)`` over ``dim``.

    Every feature vector along ``dim`` (the channels) gets unit root-mean-square; computed in
    float32 (float64 for float64) and returned in the dtype of ``x``.

    Args:
        x: features, e.g. ``[N, C, 1, 1]`` embeddings or ``[N, C, H, W]`` maps.
        dim: the dimension normalized over.
        eps: keeps the division finite for an all-zero vector (PGGAN's ``1e-8``).
    """
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    return (y * torch.rsqrt(y.square().mean(dim=dim, keepdim=True) + eps)).to(x.dtype)
