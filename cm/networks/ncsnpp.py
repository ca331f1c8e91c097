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
from cm.networks.checkpointing import checkpointed
from cm.networks.embeddings import (
    FourierEmbedding,
    PositionalEmbedding,
    check_resolution,
    second_time_embedding,
)
from cm.networks.ncsnpp_layers import (
    SKIP_SCALE,
    ZERO_GAIN,
    FIRResample,
    Level,
    OutputHead,
    ProgressiveInput,
    Resample,
    SelfAttention,
    UNetBlock,
    conv,
    group_norm,
    xavier,
)

__all__ = [
    "SKIP_SCALE",
    "ZERO_GAIN",
    "FIRResample",
    "Level",
    "NCSNpp",
    "OutputHead",
    "ProgressiveInput",
    "SelfAttention",
    "UNetBlock",
    "conv",
    "group_norm",
    "xavier",
]

EmbeddingType = Literal["positional", "fourier"]
EncoderType = Literal["standard", "skip", "residual"]
DecoderType = Literal["standard", "skip"]


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
        second_time: embed a second time input ``c_noise_to`` (a flow map's ``t - r``,
            ``cm.flowmap``) with the same ``map_noise``, read by ``map_layer0`` beside the first
            as py-meanflow's ``[emb(t), emb(h)]`` (Geng et al. 2025; xavier over both halves).
        checkpointing: recompute every residual block's activations (``UNetBlock``, with its
            attention) in the backward pass while training (Chen et al. 2016;
            ``cm.networks.checkpointing``): trades about one extra forward pass per step for the
            blocks' activation memory. Outputs, gradients and parameter names are unchanged.
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
        second_time: bool = False,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_resolution(img_resolution, channel_mult)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.checkpointing = checkpointing
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
        self.map_layer0_to = None
        if second_time:  # py-meanflow: map_layer0 reads [emb(t), emb(h)], xavier over both
            joint = xavier(nn.Linear(2 * noise_ch, emb_ch))
            self.map_layer0_to = nn.Linear(noise_ch, emb_ch, bias=False)
            with torch.no_grad():
                self.map_layer0.weight.copy_(joint.weight[:, :noise_ch])
                self.map_layer0_to.weight.copy_(joint.weight[:, noise_ch:])

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
            labels: one-hot (or soft) class labels ``[N, label_dim]``; ``None`` means all-zero
                rows (no class, as EDM). Ignored when ``label_dim == 0``.
            c_noise_to: the second time input ``[N]`` of a flow map (``second_time``); None is 0.
        """
        c_noise = c_noise.reshape(-1).expand(x.shape[0])
        emb = self.map_noise(c_noise).to(x.dtype)
        if self.map_label is not None:
            if labels is None:
                labels = x.new_zeros(x.shape[0], self.label_dim)
            # One-hot rows scaled to unit variance per entry, as EDM.
            emb = emb + self.map_label(labels.to(emb.dtype) * math.sqrt(self.label_dim))
        pre = self.map_layer0(emb) + second_time_embedding(
            self.map_layer0_to, lambda c: self.map_noise(c).to(x.dtype), c_noise_to, c_noise
        )
        emb = F.silu(self.map_layer1(F.silu(pre)))

        h = self.enc_in(x)
        skips = [h]
        aux = x
        for level in self.enc:
            for down in level.entry:
                h = checkpointed(self.checkpointing, down, h, emb)
                if level.aux is not None:
                    h, aux = level.aux(h, aux)
                skips.append(h)
            for blk in level.blocks:
                h = checkpointed(self.checkpointing, blk, h, emb)
                skips.append(h)

        out = None
        for level in self.dec:
            for blk in level.entry:
                h = checkpointed(self.checkpointing, blk, h, emb)
            for blk in level.blocks:
                h = torch.cat([h, skips.pop()], dim=1)
                h = checkpointed(self.checkpointing, blk, h, emb)
            if level.head is not None:
                out = level.head(h, out)
        return out
