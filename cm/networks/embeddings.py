"""Noise-level embeddings and shared checks of the UNets (``c_noise`` -> features)."""

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cm.errors import UserError


def check_resolution(img_resolution: int, channel_mult: Sequence[int]) -> None:
    """Raise a clear error unless the UNet's ``len(channel_mult) - 1`` halvings divide the size."""
    factor = 2 ** (len(channel_mult) - 1)
    if img_resolution % factor:
        raise UserError(
            f"img_resolution {img_resolution} is not divisible by {factor} "
            f"(2^(len(channel_mult) - 1) for channel_mult {list(channel_mult)}): "
            "change one of them."
        )


def _embedding_dtype(c_noise: Tensor) -> torch.dtype:
    """float32 for float32 and lower ``c_noise`` (also under bf16 autocast), float64 for float64."""
    return torch.promote_types(c_noise.dtype, torch.float32)


def timestep_embedding(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of ``c_noise`` (Dhariwal & Nichol 2021; Vaswani et al. 2017, Sec. 3.5).

    Matches OpenAI's ``timestep_embedding``: ``[cos(c f_i), sin(c f_i)]`` with frequencies
    ``f_i = max_period ** (-i / (dim // 2))``, zero-padded to ``dim`` when ``dim`` is odd.

    Args:
        c_noise: noise conditioning, ``[N]``; may be fractional.
        dim: embedding width.
        max_period: the lowest frequency is ``1 / max_period``.

    Returns:
        ``[N, dim]`` embedding in float32 (float64 for float64 ``c_noise``, so that float64
        tests of derivatives in ``c_noise`` see float64 precision).
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=c_noise.device)
    freqs = torch.exp(-math.log(max_period) * i / half)
    c_noise = c_noise.to(_embedding_dtype(c_noise))
    args = c_noise[:, None] * freqs.to(c_noise.dtype)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class PositionalEmbedding(nn.Module):
    """Sinusoidal ``c_noise`` embedding of DDPM++ (Song et al. 2021; Vaswani et al. 2017).

    ``[sin(c f_i), cos(c f_i)]`` with ``f_i = max_positions ** (-i / (dim / 2 - 1))``: frequencies
    from 1 down to exactly ``1 / max_positions`` (EDM's ``endpoint=True``).
    """

    def __init__(self, num_channels: int, max_positions: float = 10000.0) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, c_noise: Tensor) -> Tensor:
        """Embed ``c_noise`` ``[N]`` as ``[N, num_channels]``."""
        half = self.num_channels // 2
        i = torch.arange(half, dtype=torch.float32, device=c_noise.device)
        freqs = (1 / self.max_positions) ** (i / (half - 1))
        c_noise = c_noise.to(_embedding_dtype(c_noise))
        x = torch.outer(c_noise, freqs.to(c_noise.dtype))
        return torch.cat([x.sin(), x.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of ``c_noise`` for NCSN++ (Song et al. 2021; Tancik et al. 2020).

    ``[sin(2 pi c w_i), cos(2 pi c w_i)]`` with fixed ``w_i ~ N(0, scale^2)`` (a buffer, not
    trained). Song & Dhariwal 2023 (iCT, Sec. 3.1) lower ``scale`` from 16 to 0.02 for stability.
    """

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        """Embed ``c_noise`` ``[N]`` as ``[N, num_channels]``."""
        c_noise = c_noise.to(_embedding_dtype(c_noise))
        x = torch.outer(c_noise, 2 * math.pi * self.freqs.to(c_noise.dtype))
        return torch.cat([x.sin(), x.cos()], dim=1)


def second_time_embedding(
    embed: nn.Module | None,
    features: Callable[[Tensor], Tensor],
    c_noise_to: Tensor | None,
    c_noise: Tensor,
) -> Tensor | float:
    """``embed(features(c_noise_to))``, a flow map's second time (``cm.flowmap``), or 0 without.

    ``c_noise`` ``[N]`` gives the batch size and dtype; ``c_noise_to`` None is 0. A second time
    given to a network built without one (``embed`` None) is one clear error.
    """
    if embed is None:
        if c_noise_to is not None:
            raise UserError(
                "A second time input (c_noise_to) was given to a network built without one: "
                "set the network's second_time: true for a flow map."
            )
        return 0.0
    n = c_noise.shape[0]
    c_noise_to = c_noise.new_zeros(n) if c_noise_to is None else c_noise_to.reshape(-1).expand(n)
    return embed(features(c_noise_to))
