"""ADM: the ablated diffusion UNet of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs").

The architecture of openai/guided-diffusion and openai/consistency_models (``unet.py``,
``UNetModel``), used by the consistency models of Song et al. 2023 on ImageNet-64 and LSUN-256:
residual blocks with adaptive group norm (scale-shift), multi-head self-attention at chosen
resolutions, BigGAN-style residual up/down-sampling, and zero-initialised output layers.

Checkpoint layout: parameters are registered in the same order, with the same shapes, as OpenAI's
``UNetModel`` (the class embedding is a bias-free ``Linear``, i.e. the transposed
``nn.Embedding`` table), and the fused ``qkv`` 1x1 convolution is split ``(3, heads, head_dim)``
like the flash-attention path of openai/consistency_models. ``cm.convert.convert_openai`` maps a
published state dict onto it by name (and reorders guided-diffusion's legacy attention).

Text conditioning (``context_dim > 0``; Rombach et al. 2022, Sec. 3.3): every attention block
also gets a cross-attention submodule ``cross`` (``cm.networks.attention.CrossAttention``) whose
keys and values come from a context of token embeddings. The context travels in the one
denoiser interface ``D(x, sigma, labels)``: a 3-D ``labels`` ``[N, L, context_dim]`` (e.g. the
token embeddings of the frozen ``cm.networks.text.TextEncoder``, computed outside the network)
is the cross-attention context; a 2-D ``labels`` ``[N, label_dim]`` stays a one-hot class label.
The new parameters only add keys (``...cross.*``) and the output projection is zero-initialised,
so a converted checkpoint loaded with ``strict=False`` computes its old function at init.
"""

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cm.errors import UserError
from cm.networks.attention import CrossAttention
from cm.networks.checkpointing import checkpointed
from cm.networks.embeddings import check_resolution, second_time_embedding, timestep_embedding
from cm.networks.norms import GroupNorm, pixel_norm


def group_norm(channels: int, num_groups: int = 32) -> GroupNorm:
    """ADM GroupNorm (Dhariwal & Nichol 2021) with ``gcd(num_groups, channels)`` groups.

    For the published widths (multiples of 32) this is OpenAI's ``GroupNorm32(32, channels)``,
    in float32 under autocast like it (``cm.networks.norms.GroupNorm``).
    """
    return GroupNorm(math.gcd(num_groups, channels), channels, eps=1e-5)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` (Dhariwal & Nichol 2021; OpenAI's ``zero_module``)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


Resample = Literal["none", "up", "down"]


class ResBlock(nn.Module):
    """Residual block with (adaptive) group norm, Dhariwal & Nichol 2021, Sec. 3 / App. A.

    ``h = conv0(silu(norm0(x)))``; then ``norm1(h) * (1 + scale) + shift`` with ``(scale, shift)``
    from the embedding (AdaGN), or ``norm1(h + emb)`` without scale-shift; then
    ``conv1(dropout(silu(.)))`` with ``conv1`` zero-initialised, plus a (1x1 conv) skip. With
    ``resample`` the block also halves (2x2 average pool) or doubles (nearest) the resolution of
    both paths, between ``norm0``/``silu`` and ``conv0`` (BigGAN-style up/down blocks).

    ``double_norm`` is sCM's adaptive double normalization (Lu & Song 2024, Sec. 4.1): AdaGN
    ``y = norm(h) * s(t) + b(t)`` becomes ``y = norm(h) * pnorm(s(t)) + pnorm(b(t))`` with ADM's
    ``s(t) = 1 + scale``, ``b(t) = shift`` and ``pnorm`` the pixel normalization over channels
    (``cm.networks.norms.pixel_norm``): unit-RMS scale and shift whatever the affine output's
    magnitude, AdaGN's expressiveness without its instability in consistency training.

    Args:
        in_channels: input channels.
        out_channels: output channels; a 1x1 skip convolution is added when they differ.
        emb_channels: width of the timestep (+ class) embedding.
        dropout: dropout probability before the last convolution.
        use_scale_shift_norm: AdaGN ``norm(h) * (1 + scale) + shift`` instead of ``norm(h + emb)``.
        resample: ``"down"``, ``"up"`` or ``"none"``.
        num_groups: maximum number of GroupNorm groups.
        double_norm: adaptive double normalization (sCM); needs ``use_scale_shift_norm``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        resample: Resample = "none",
        num_groups: int = 32,
        double_norm: bool = False,
    ) -> None:
        super().__init__()
        if double_norm and not use_scale_shift_norm:
            raise UserError("double_norm (sCM) normalizes AdaGN: set use_scale_shift_norm")
        self.use_scale_shift_norm = use_scale_shift_norm
        self.double_norm = double_norm
        self.resample = resample
        # Registration order follows OpenAI's ResBlock (in_layers, emb_layers, out_layers, skip).
        self.norm0 = group_norm(in_channels, num_groups)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, out_channels * (2 if use_scale_shift_norm else 1))
        self.norm1 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.skip = nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        match self.resample:
            case "down":
                return F.avg_pool2d(x, 2)
            case "up":
                return F.interpolate(x, scale_factor=2.0, mode="nearest")
            case _:
                return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block to ``x`` ``[N, C, H, W]`` given the embedding ``emb`` ``[N, E]``."""
        h = self._resample(F.silu(self.norm0(x)))
        x = self._resample(x)
        h = self.conv0(h)
        e = self.affine(F.silu(emb))[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            s = 1 + scale  # AdaGN's s(t), b(t) = shift
            if self.double_norm:
                s, shift = pixel_norm(s), pixel_norm(shift)
            h = self.norm1(h) * s + shift
        else:
            h = self.norm1(h + e)
        h = self.conv1(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head spatial self-attention with residual, Dhariwal & Nichol 2021, Sec. 3.

    ``x + proj_out(attn(qkv(norm(x))))`` with a fused 1x1 ``qkv`` convolution (channels split as
    ``(3, heads, head_dim)``), softmax scale ``1 / sqrt(head_dim)`` through
    ``scaled_dot_product_attention``, and a zero-initialised ``proj_out``; with ``context_dim``
    followed by cross-attention to a token context (Rombach et al. 2022, Eq. 3).

    Args:
        channels: input and output channels.
        num_heads: number of heads, used when ``num_head_channels`` is -1.
        num_head_channels: channels per head; overrides ``num_heads`` unless -1.
        num_groups: maximum number of GroupNorm groups.
        context_dim: width of the cross-attention context tokens; 0 = self-attention only.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 4,
        num_head_channels: int = -1,
        num_groups: int = 32,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise UserError(f"{channels} channels not divisible by {num_head_channels}/head")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise UserError(f"{channels} channels not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))
        # Registered last and only when asked for: the OpenAI key layout is unchanged.
        self.cross = (
            CrossAttention(channels, context_dim, num_heads, num_groups) if context_dim else None
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Attend over the ``H * W`` positions of ``x`` ``[N, C, H, W]``, then to ``context``."""
        n, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, -1)
        # Each [N, heads, HW, head_dim]; with channels-last weights (cm.training.speed) head_dim
        # has unit stride, as the flash/memory-efficient attention kernels want.
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(n, c, height, width)
        x = x + self.proj_out(h)
        if self.cross is not None and context is not None:
            x = self.cross(x, context)
        return x


class Downsample(nn.Module):
    """Plain down-sampling of ADM (Dhariwal & Nichol 2021): stride-2 3x3 conv or 2x2 average pool.

    Args:
        channels: input and output channels.
        use_conv: learned stride-2 convolution instead of average pooling.
    """

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        """Halve the resolution of ``x``."""
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Plain up-sampling of ADM (Dhariwal & Nichol 2021): nearest x2, then an optional 3x3 conv.

    Args:
        channels: input and output channels.
        use_conv: apply a learned 3x3 convolution after the nearest-neighbour up-sampling.
    """

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        """Double the resolution of ``x``."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class EmbedSequential(nn.ModuleList):
    """ADM layers in order (Dhariwal & Nichol 2021); res blocks get ``emb``, attention context."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        """Apply the layers in order."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ADMUNet(nn.Module):
    """ADM UNet of Dhariwal & Nichol 2021 (OpenAI ``UNetModel``), as used by Song et al. 2023.

    ``F(x, c_noise, labels)``: the network sees only ``c_noise`` (e.g. ``1000 * 0.25 * ln(sigma)``
    for consistency models, chosen by the preconditioner), never ``sigma``. The defaults are the
    ImageNet-64 configuration of Song et al. 2023 (``--num_channels 192 --num_res_blocks 3
    --attention_resolutions 32,16,8 --num_head_channels 64 --resblock_updown True
    --use_scale_shift_norm True``, channel_mult ``1,2,3,4``) except ``label_dim``; set
    ``label_dim: 1000`` for the class-conditional model. For sCM (Lu & Song 2024, Sec. 4.1) wrap
    it in ``TrigFlowPrecond`` (``c_noise = t``, so this sinusoidal embedding is the positional one
    with frequencies at most 1 that the paper asks for) and set ``double_norm: true``.

    Args:
        img_resolution: training image resolution; ``attention_resolutions`` refer to it. The
            network runs at any resolution divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels: input image channels.
        out_channels: output channels (OpenAI's ``learn_sigma`` doubles them; not used here).
        label_dim: number of classes for one-hot labels ``[N, label_dim]``; 0 = unconditional.
        model_channels: base width; level ``i`` has ``channel_mult[i] * model_channels`` channels
            and the embedding has ``4 * model_channels``.
        channel_mult: width multiplier per resolution level, highest resolution first.
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_resolutions: feature-map resolutions (in pixels) with self-attention, e.g.
            ``[32, 16, 8]``; the middle block always has attention.
        num_heads: attention heads, used when ``num_head_channels`` is -1.
        num_head_channels: channels per attention head; -1 to use ``num_heads`` instead.
        dropout: dropout probability inside the residual blocks.
        resblock_updown: up/down-sample with residual blocks (BigGAN) instead of plain resampling.
        use_scale_shift_norm: adaptive group norm ``norm(h) * (1 + scale) + shift``.
        conv_resample: learned convolutions in plain up/down-sampling (when not
            ``resblock_updown``).
        num_groups: GroupNorm groups (``gcd(num_groups, channels)`` for narrow layers).
        context_dim: width of text-token context ``[N, L, context_dim]`` passed as 3-D
            ``labels``; every attention block then also cross-attends to it (Rombach et al.
            2022). 0 = no cross-attention.
        double_norm: sCM's AdaGN ``norm(h) * pnorm(s(t)) + pnorm(b(t))`` in every residual
            block (Lu & Song 2024, Sec. 4.1; see ``ResBlock``); needs ``use_scale_shift_norm``.
        second_time: embed a second time input ``c_noise_to`` (a flow map's ``t - r`` or ``r``,
            ``cm.flowmap``) with its own MLP added to the time embedding; its last layer starts
            at zero, so a diffusion checkpoint loads (non-strictly) into the same function.
        checkpointing: recompute every encoder, middle and decoder block's activations in the
            backward pass while training (Chen et al. 2016; ``cm.networks.checkpointing``):
            trades about one extra forward pass per step for the blocks' activation memory.
            Outputs, gradients and parameter names are unchanged.
    """

    def __init__(
        self,
        img_resolution: int = 64,
        in_channels: int = 3,
        out_channels: int = 3,
        label_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_res_blocks: int = 3,
        attention_resolutions: Sequence[int] = (32, 16, 8),
        num_heads: int = 4,
        num_head_channels: int = 64,
        dropout: float = 0.0,
        resblock_updown: bool = True,
        use_scale_shift_norm: bool = True,
        conv_resample: bool = True,
        num_groups: int = 32,
        context_dim: int = 0,
        double_norm: bool = False,
        second_time: bool = False,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_resolution(img_resolution, channel_mult)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.context_dim = context_dim
        self.checkpointing = checkpointing
        self.model_channels = model_channels
        emb_ch = 4 * model_channels

        def res_block(cin: int, cout: int, resample: Resample = "none") -> ResBlock:
            return ResBlock(
                cin, cout, emb_ch, dropout, use_scale_shift_norm, resample, num_groups, double_norm
            )

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads, num_head_channels, num_groups, context_dim)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        self.time_embed_to = None
        if second_time:
            self.time_embed_to = nn.Sequential(
                nn.Linear(model_channels, emb_ch), nn.SiLU(), zero_init(nn.Linear(emb_ch, emb_ch))
            )
        self.label_embed = None
        if label_dim:
            # One-hot labels through a bias-free Linear == nn.Embedding; N(0, 1) init like it.
            self.label_embed = nn.Linear(label_dim, emb_ch, bias=False)
            nn.init.normal_(self.label_embed.weight)

        # Encoder: every entry produces one skip connection.
        ch = channel_mult[0] * model_channels
        res = img_resolution
        self.encoder = nn.ModuleList([EmbedSequential([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        skips = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if res in attention_resolutions:
                    layers.append(attention(ch))
                self.encoder.append(EmbedSequential(layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    res_block(ch, ch, "down") if resblock_updown else Downsample(ch, conv_resample)
                )
                self.encoder.append(EmbedSequential([down]))
                skips.append(ch)
                res //= 2

        self.middle = EmbedSequential([res_block(ch, ch), attention(ch), res_block(ch, ch)])

        # Decoder: every entry consumes one skip connection (concatenated on channels).
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skips.pop(), mult * model_channels)]
                ch = mult * model_channels
                if res in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    up = res_block(ch, ch, "up") if resblock_updown else Upsample(ch, conv_resample)
                    layers.append(up)
                    res *= 2
                self.decoder.append(EmbedSequential(layers))

        self.out_norm = group_norm(ch, num_groups)
        self.out_conv = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        labels: Tensor | None = None,
        c_noise_to: Tensor | None = None,
    ) -> Tensor:
        """Predict ``[N, out_channels, H, W]`` from ``x`` ``[N, C, H, W]`` and ``c_noise`` ``[N]``.

        Args:
            x: network input (already scaled by the preconditioner's ``c_in``).
            c_noise: noise conditioning, one float per sample (a scalar broadcasts).
            labels: one-hot (or soft) class labels ``[N, label_dim]``; ``None`` or all-zero rows
                give no class embedding. Ignored when ``label_dim == 0``. With ``context_dim``,
                text-token context ``[N, L, context_dim]`` for the cross-attention instead.
            c_noise_to: the second time input ``[N]`` of a flow map (``second_time``); None is 0.
        """
        c_noise = c_noise.reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(c_noise, self.model_channels))
        emb = emb + second_time_embedding(
            self.time_embed_to,
            lambda c: timestep_embedding(c, self.model_channels),
            c_noise_to,
            c_noise,
        )
        context = None
        if labels is not None and labels.ndim == 3:
            if labels.shape[-1] != self.context_dim:
                raise UserError(
                    f"Text context of width {labels.shape[-1]} given to an ADMUNet with "
                    f"context_dim={self.context_dim}: set model context_dim to the encoder width."
                )
            context = labels
        elif self.label_embed is not None and labels is not None:
            emb = emb + self.label_embed(labels.to(emb.dtype))

        h = x
        hs = []
        for block in self.encoder:
            h = checkpointed(self.checkpointing, block, h, emb, context)
            hs.append(h)
        h = checkpointed(self.checkpointing, self.middle, h, emb, context)
        for block in self.decoder:
            h = torch.cat([h, hs.pop()], dim=1)
            h = checkpointed(self.checkpointing, block, h, emb, context)
        return self.out_conv(F.silu(self.out_norm(h)))
