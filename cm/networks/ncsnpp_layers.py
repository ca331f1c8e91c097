"""Building blocks of DDPM++ / NCSN++ (Song et al. 2021, App. H), in the form of EDM's ``SongUNet``.

Residual blocks with FIR up/down-sampling, single-head self-attention, the progressive input
path and output heads; ``cm.networks.ncsnpp.NCSNpp`` assembles them (and re-exports them, so
``from cm.networks.ncsnpp import FIRResample`` keeps working).
"""

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cm.errors import UserError
from cm.networks.norms import GroupNorm

Resample = Literal["none", "up", "down"]
SKIP_SCALE = math.sqrt(0.5)  # every residual sum is rescaled by 1/sqrt(2) (skip_rescale)
ZERO_GAIN = 1e-5  # "zero" init of the last layer of each residual branch, as EDM


def xavier(module: nn.Conv2d | nn.Linear, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform weight times ``gain``, zero bias (Song et al. 2021, App. H; EDM)."""
    nn.init.xavier_uniform_(module.weight, gain=gain)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def conv(cin: int, cout: int, kernel: int, gain: float = 1.0, padding: int | None = None):
    """Square convolution, 'same' padding unless given, Xavier init (Song et al. 2021, App. H)."""
    padding = kernel // 2 if padding is None else padding
    return xavier(nn.Conv2d(cin, cout, kernel, padding=padding), gain)


def group_norm(channels: int, num_groups: int = 32) -> GroupNorm:
    """GroupNorm of Song et al. 2021: ``min(32, C // 4)`` groups (>= 4 channels each), eps 1e-6.

    That is EDM's and score_sde's rule; for narrow layers the count is reduced to a divisor of C.
    """
    groups = math.gcd(min(num_groups, max(channels // 4, 1)), channels)
    return GroupNorm(groups, channels, eps=1e-6)  # float32 under autocast (cm.networks.norms)


class FIRResample(nn.Module):
    """Up/down-sampling by 2 with a separable FIR filter (Song et al. 2021, App. H; Zhang 2019).

    The 2D filter ``f f^T / (sum f)^2`` of the taps ``f`` is applied depthwise: a stride-2
    convolution down-samples, a stride-2 transposed convolution (filter times 4, keeping the mean)
    up-samples. ``[1, 1]`` is 2x2 average pooling / nearest-neighbour up-sampling; ``[1, 3, 3, 1]``
    is NCSN++'s. The default ``padding``, ``(len(f) - 1) // 2``, exactly halves/doubles H and W.
    """

    def __init__(
        self,
        mode: Literal["up", "down"],
        resample_filter: Sequence[int] = (1, 1),
        padding: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("up", "down"):
            raise UserError(f"mode must be 'up' or 'down', got {mode!r}")
        self.mode = mode
        self.padding = (len(resample_filter) - 1) // 2 if padding is None else padding
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer(
            "filter", torch.outer(f, f)[None, None] / f.sum() ** 2, persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        """Resample ``x`` ``[N, C, H, W]`` to twice or half its resolution."""
        c = x.shape[1]
        f = self.filter.to(x.dtype).tile(c, 1, 1, 1)  # one filter per channel
        match self.mode:
            case "down":
                return F.conv2d(x, f, stride=2, padding=self.padding, groups=c)
            case _:
                return F.conv_transpose2d(x, f * 4, stride=2, padding=self.padding, groups=c)


class SelfAttention(nn.Module):
    """Single-head spatial self-attention of DDPM++/NCSN++ (Song et al. 2021; Ho et al. 2020).

    Returns ``proj(attn(qkv(norm(x))))``; the caller adds the residual. ``qkv`` is a fused 1x1
    convolution with channels ordered ``(C, 3)``; ``proj`` starts near zero.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = conv(channels, 3 * channels, 1, gain=math.sqrt(0.2))
        self.proj = conv(channels, channels, 1, gain=ZERO_GAIN)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the ``H * W`` positions of ``x`` ``[N, C, H, W]``."""
        n, c, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, c, 3, height * width).unbind(2)  # [N, C, HW]
        # [N, 1, HW, C] with a unit stride on C: what the flash/memory-efficient kernels take.
        q, k, v = (t.mT[:, None].contiguous() for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a[:, 0].mT.reshape(n, c, height, width))


class UNetBlock(nn.Module):
    """Residual block of DDPM++/NCSN++ (Song et al. 2021, App. H; BigGAN up/down blocks).

    ``h = conv0(resample(silu(norm0(x))))``, ``h = conv1(dropout(silu(norm1(h + affine(emb)))))``,
    ``x = (h + skip(resample(x))) / sqrt(2)``, then optionally ``x = (x + attn(x)) / sqrt(2)``.
    ``skip`` is a 1x1 convolution whenever the block resamples or changes the width.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        emb_channels: width of the (noise + label) embedding.
        resample: ``"up"``, ``"down"`` or ``"none"``.
        attention: append single-head self-attention.
        dropout: dropout probability before ``conv1``.
        resample_filter: FIR taps for up/down-sampling.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        resample: Resample = "none",
        attention: bool = False,
        dropout: float = 0.0,
        resample_filter: Sequence[int] = (1, 1),
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        # Registration order as EDM's UNetBlock: norm0, conv0, affine, norm1, conv1, skip, attn.
        self.norm0 = group_norm(in_channels)
        self.conv0 = conv(in_channels, out_channels, 3)
        self.affine = xavier(nn.Linear(emb_channels, out_channels))
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv(out_channels, out_channels, 3, gain=ZERO_GAIN)
        self.resample: nn.Module = nn.Identity()
        if resample != "none":
            self.resample = FIRResample(resample, resample_filter)
        self.skip: nn.Module = nn.Identity()
        if in_channels != out_channels or resample != "none":
            self.skip = conv(in_channels, out_channels, 1)
        self.attn = SelfAttention(out_channels) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block to ``x`` ``[N, C, H, W]`` given the embedding ``emb`` ``[N, E]``."""
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        h = h + self.affine(emb)[:, :, None, None].to(h.dtype)
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        x = (h + self.skip(self.resample(x))) * SKIP_SCALE
        if self.attn is not None:
            x = (x + self.attn(x)) * SKIP_SCALE
        return x


class ProgressiveInput(nn.Module):
    """Progressive-growing input path into the encoder (Song et al. 2021, App. H).

    ``skip``: down-sample the image pyramid ``aux`` and add ``conv1x1(aux)`` to ``h``.
    ``residual`` (NCSN++): ``h = aux = (h + down(conv3x3(aux))) / sqrt(2)``; the convolution runs
    at the finer resolution, padded by the filter's reach, and the filter down-samples unpadded
    (EDM's ``fused_resample``). ``aux`` starts as the input image.
    """

    def __init__(
        self,
        kind: Literal["skip", "residual"],
        aux_channels: int,
        out_channels: int,
        resample_filter: Sequence[int],
    ) -> None:
        super().__init__()
        self.kind = kind
        match kind:
            case "skip":
                self.down = FIRResample("down", resample_filter)
                self.conv = conv(aux_channels, out_channels, 1)
            case "residual":
                reach = (len(resample_filter) - 1) // 2
                self.conv = conv(aux_channels, out_channels, 3, padding=1 + reach)
                self.down = FIRResample("down", resample_filter, padding=0)
            case _:
                raise UserError(f"unknown progressive input {kind!r}")

    def forward(self, h: Tensor, aux: Tensor) -> tuple[Tensor, Tensor]:
        """Return the level's features and the ``aux`` carried to the next level."""
        match self.kind:
            case "skip":
                aux = self.down(aux)
                return h + self.conv(aux), aux
            case _:
                h = (h + self.down(self.conv(aux))) * SKIP_SCALE
                return h, h


class OutputHead(nn.Module):
    """Output layer of DDPM++/NCSN++ (Song et al. 2021): GroupNorm, SiLU, near-zero 3x3 conv.

    With the ``skip`` decoder every level has one, and the coarser output is up-sampled (with
    ``resample_filter``; None at the coarsest head) and added.
    """

    def __init__(
        self, in_channels: int, out_channels: int, resample_filter: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.up = FIRResample("up", resample_filter) if resample_filter is not None else None
        self.norm = group_norm(in_channels)
        self.conv = conv(in_channels, out_channels, 3, gain=ZERO_GAIN)

    def forward(self, h: Tensor, out: Tensor | None) -> Tensor:
        """Return ``conv(silu(norm(h)))`` plus the up-sampled coarser output, if any."""
        y = self.conv(F.silu(self.norm(h)))
        if out is None:
            return y
        return y + (self.up(out) if self.up is not None else out)


class Level(nn.Module):
    """Modules of one resolution of the DDPM++/NCSN++ UNet (Song et al. 2021), a container.

    Encoder: ``entry`` is ``[down block]`` (empty at full resolution), ``aux`` the progressive
    input. Decoder: ``entry`` is ``[attention block, block]`` at the bottom, else ``[up block]``;
    each of its ``blocks`` consumes one encoder skip; ``head`` is an output layer.
    """

    def __init__(
        self,
        entry: Sequence[UNetBlock],
        blocks: Sequence[UNetBlock],
        aux: ProgressiveInput | None = None,
        head: OutputHead | None = None,
    ) -> None:
        super().__init__()
        self.entry = nn.ModuleList(entry)
        self.aux = aux
        self.blocks = nn.ModuleList(blocks)
        self.head = head
