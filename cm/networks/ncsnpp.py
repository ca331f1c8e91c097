"""DDPM++ and NCSN++ of Song et al. 2021 ("Score-Based Generative Modeling through SDEs", App. H).

One configurable UNet in the form of EDM's ``SongUNet`` (Karras et al. 2022), as used for the
CIFAR-10 consistency models (Song et al. 2023; Song & Dhariwal 2023, iCT): BigGAN-style residual
blocks that up/down-sample through an FIR filter, residual sums scaled by ``1 / sqrt(2)``,
single-head self-attention, and optional progressive-growing paths into the encoder and out of
the decoder.

- DDPM++: ``embedding_type="positional"``, standard encoder and decoder, filter ``[1, 1]``.
- NCSN++: ``embedding_type="fourier"`` (scale 16), ``channel_mult_noise=2``,
  ``encoder_type="residual"``, standard decoder, filter ``[1, 3, 3, 1]``.

Checkpoint layout: parameters are registered in the order and with the shapes of EDM's
``SongUNet`` without augmentation conditioning (``augment_dim=0``), and the fused ``qkv`` 1x1
convolution splits its channels as ``(C, 3)`` like it; ``cm.convert.convert_edm`` maps such a
state dict by name. The Fourier frequencies are the buffer ``map_noise.freqs``.
"""

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cm.errors import UserError
from cm.networks.embeddings import FourierEmbedding, PositionalEmbedding, check_resolution

EmbeddingType = Literal["positional", "fourier"]
EncoderType = Literal["standard", "skip", "residual"]
DecoderType = Literal["standard", "skip"]
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


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm of Song et al. 2021: ``min(32, C // 4)`` groups (>= 4 channels each), eps 1e-6.

    That is EDM's and score_sde's rule; for narrow layers the count is reduced to a divisor of C.
    """
    groups = math.gcd(min(num_groups, max(channels // 4, 1)), channels)
    return nn.GroupNorm(groups, channels, eps=1e-6)


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


class NCSNpp(nn.Module):
    """DDPM++ / NCSN++ UNet of Song et al. 2021 (App. H), configurable as EDM's ``SongUNet``.

    ``F(x, c_noise, labels)``: the network sees only ``c_noise`` (``ln(sigma) / 4`` for EDM and
    consistency models), never ``sigma``. The defaults are EDM's CIFAR-10 DDPM++ (55.7M
    parameters) with dropout 0.10; NCSN++ is ``embedding_type: fourier, channel_mult_noise: 2,
    encoder_type: residual, resample_filter: [1, 3, 3, 1]`` (56.4M).

    Args:
        img_resolution: training image resolution; ``attn_resolutions`` refer to it. The network
            runs at any resolution divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels: input image channels.
        out_channels: output channels.
        label_dim: number of classes for one-hot labels ``[N, label_dim]``; 0 = unconditional.
        model_channels: base width; level ``i`` has ``channel_mult[i] * model_channels`` channels.
        channel_mult: width multiplier per resolution level, highest resolution first.
        channel_mult_emb: the embedding has ``channel_mult_emb * model_channels`` channels.
        num_blocks: residual blocks per level in the encoder (the decoder has one more).
        attn_resolutions: resolutions (pixels) with self-attention; the bottleneck always has it.
        dropout: dropout probability inside the residual blocks.
        embedding_type: ``c_noise`` embedding, ``positional`` (DDPM++) or ``fourier`` (NCSN++).
        fourier_scale: standard deviation of the Fourier frequencies (16; iCT uses 0.02).
        channel_mult_noise: the noise embedding has ``channel_mult_noise * model_channels``
            channels (1 for DDPM++, 2 for NCSN++).
        encoder_type: ``standard``, ``skip`` (image pyramid added by 1x1 convs) or ``residual``
            (NCSN++'s strided-conv input path).
        decoder_type: ``standard`` or ``skip`` (an output head at every level, summed up).
        resample_filter: FIR taps for up/down-sampling, ``[1, 1]`` (DDPM++) or ``[1, 3, 3, 1]``.
    """

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        label_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        embedding_type: EmbeddingType = "positional",
        fourier_scale: float = 16.0,
        channel_mult_noise: int = 1,
        encoder_type: EncoderType = "standard",
        decoder_type: DecoderType = "standard",
        resample_filter: Sequence[int] = (1, 1),
    ) -> None:
        super().__init__()
        check_resolution(img_resolution, channel_mult)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        emb_ch = channel_mult_emb * model_channels
        noise_ch = channel_mult_noise * model_channels
        taps = tuple(resample_filter)

        def block(cin: int, cout: int, resample: Resample = "none", attn: bool = False):
            return UNetBlock(cin, cout, emb_ch, resample, attn, dropout, taps)

        # Mapping: c_noise (+ label) -> embedding. Order as EDM: map_noise, map_label, layer0/1.
        match embedding_type:
            case "positional":
                self.map_noise: nn.Module = PositionalEmbedding(noise_ch)
            case "fourier":
                self.map_noise = FourierEmbedding(noise_ch, fourier_scale)
            case _:
                raise UserError(f"unknown embedding_type {embedding_type!r}")
        self.map_label = xavier(nn.Linear(label_dim, noise_ch)) if label_dim else None
        self.map_layer0 = xavier(nn.Linear(noise_ch, emb_ch))
        self.map_layer1 = xavier(nn.Linear(emb_ch, emb_ch))

        # Encoder: the input conv and every block/down block produce one skip.
        self.enc_in = conv(in_channels, model_channels, 3)
        self.enc = nn.ModuleList()
        ch, aux_ch = model_channels, in_channels
        skips = [ch]
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            entry, aux = [], None
            if level:
                entry.append(block(ch, ch, "down"))
                match encoder_type:
                    case "standard":
                        pass
                    case "skip":
                        aux = ProgressiveInput("skip", aux_ch, ch, taps)
                    case "residual":
                        aux, aux_ch = ProgressiveInput("residual", aux_ch, ch, taps), ch
                    case _:
                        raise UserError(f"unknown encoder_type {encoder_type!r}")
                skips.append(ch)
            blocks = []
            for _ in range(num_blocks):
                blocks.append(block(ch, mult * model_channels, attn=res in attn_resolutions))
                ch = mult * model_channels
                skips.append(ch)
            self.enc.append(Level(entry, blocks, aux=aux))

        # Decoder, coarsest level first.
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            bottom = level == len(channel_mult) - 1
            entry = [block(ch, ch, attn=True), block(ch, ch)] if bottom else [block(ch, ch, "up")]
            blocks = []
            for i in range(num_blocks + 1):
                attn = i == num_blocks and res in attn_resolutions
                blocks.append(block(ch + skips.pop(), mult * model_channels, attn=attn))
                ch = mult * model_channels
            head = None
            match decoder_type:
                case "standard":
                    head = OutputHead(ch, out_channels) if level == 0 else None
                case "skip":
                    head = OutputHead(ch, out_channels, None if bottom else taps)
                case _:
                    raise UserError(f"unknown decoder_type {decoder_type!r}")
            self.dec.append(Level(entry, blocks, head=head))

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """Predict ``[N, out_channels, H, W]`` from ``x`` ``[N, C, H, W]`` and ``c_noise`` ``[N]``.

        Args:
            x: network input (already scaled by the preconditioner's ``c_in``).
            c_noise: noise conditioning, one float per sample (a scalar broadcasts).
            labels: one-hot (or soft) class labels ``[N, label_dim]``; ``None`` means all-zero
                rows (no class, as EDM). Ignored when ``label_dim == 0``.
        """
        c_noise = c_noise.reshape(-1).expand(x.shape[0])
        emb = self.map_noise(c_noise).to(x.dtype)
        if self.map_label is not None:
            if labels is None:
                labels = x.new_zeros(x.shape[0], self.label_dim)
            # One-hot rows scaled to unit variance per entry, as EDM.
            emb = emb + self.map_label(labels.to(emb.dtype) * math.sqrt(self.label_dim))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        h = self.enc_in(x)
        skips = [h]
        aux = x
        for level in self.enc:
            for down in level.entry:
                h = down(h, emb)
                if level.aux is not None:
                    h, aux = level.aux(h, aux)
                skips.append(h)
            for blk in level.blocks:
                h = blk(h, emb)
                skips.append(h)

        out = None
        for level in self.dec:
            for blk in level.entry:
                h = blk(h, emb)
            for blk in level.blocks:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb)
            if level.head is not None:
                out = level.head(h, out)
        return out
