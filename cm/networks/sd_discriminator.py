"""Diffusion2GAN's discriminator on Stable Diffusion's U-Net (Kang et al. 2024, Sec. 4.2, Fig. 4).

The same multi-scale in-and-out conditional discriminator as ``cm.networks.discriminator``
(``UNetDiscriminator``: zero-initialised ``z`` and resized-input convolutions, readout heads on
skip, up-sampled bottleneck and decoder features at every decoder resolution), here on a
diffusers ``UNet2DConditionModel`` initialised from the teacher's weights:

- the latent ``x`` enters at a fixed trained timestep ``t`` through the VP input scaling
  ``x / sqrt(1 + sigma_t^2)`` the teacher was trained on (``sigma_t = sqrt((1 - abar_t) /
  abar_t)``), and ``t`` itself is the U-Net's timestep input;
- the text condition goes through the U-Net's own cross-attention: ``labels`` are the CLIP
  token embeddings ``[N, L, D]`` (``encoder_hidden_states``), as for the teacher;
- the diffusers blocks are walked explicitly (``conv_in``, the time embedding, the down blocks'
  ``resnets``/``attentions``/``downsamplers``, ``mid_block``, the up blocks), so the injections
  land after every down-sampling and the features of every resolution can be read out.

The U-Net's output layers (``conv_norm_out``, ``conv_out``) are dropped. ``diffusers`` is only
imported when a discriminator is built (``cm[sd]`` extra).
"""

from typing import Literal

import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.networks.discriminator import Cond, Features, Inject, UNetDiscriminator
from cm.networks.stable_diffusion import _UNetEps, load_unet
from cm.schedules import vp_sigmas


def _transformer(attn: nn.Module, h: Tensor, context: Tensor) -> Tensor:
    """A diffusers ``Transformer2DModel`` (self- and cross-attention to ``context``) on ``h``."""
    return attn(h, encoder_hidden_states=context, return_dict=False)[0]


class SDDiscriminator(UNetDiscriminator):
    """Diffusion2GAN discriminator on SD's ``UNet2DConditionModel`` (Kang et al. 2024, Sec. 4.2).

    ``D(x, z, context)`` for latents ``x``, noise ``z`` ``[N, 4, h, w]`` and text contexts
    ``[N, L, D]`` returns three logit maps per decoder resolution (skip, bottleneck, decoder;
    lowest resolution first). The U-Net weights are read from ``path`` (the teacher's published
    weights); ``init_from(StableDiffusionDenoiser)`` copies them again from a loaded teacher.

    Args:
        path: the teacher's local diffusers pipeline directory (``unet/``, ``scheduler/``).
        timestep: the trained timestep at which ``D`` reads latents (ours: 200, ``sigma`` 0.57
            on SD 1.x's schedule, close to the ADM discriminators' ``sigma = sigma_data``).
        num_groups: maximum GroupNorm groups of the readout heads.
        dtype: parameter dtype (keep float32 for training; mixed precision runs the compute).
    """

    dropped = ("unet.conv_norm_out.", "unet.conv_out.")

    def __init__(
        self,
        path: str,
        timestep: int = 200,
        num_groups: int = 32,
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    ) -> None:
        unet, betas, _ = load_unet(path, dtype)
        if not 0 <= timestep < len(betas):
            raise UserError(f"timestep must lie in 0..{len(betas) - 1}, got {timestep}.")
        extra = [k for k in ("class_embed_type", "addition_embed_type") if unet.config.get(k)]
        if extra:
            raise UserError(
                f"SDDiscriminator supports SD 1.x/2.x U-Nets (text via cross-attention only); "
                f"'{path}' also sets {extra[0]} (e.g. SDXL)."
            )
        if type(unet.mid_block).__name__ != "UNetMidBlock2DCrossAttn":
            raise UserError(
                f"SDDiscriminator needs a cross-attention mid block (UNetMidBlock2DCrossAttn, "
                f"as SD 1.x/2.x); '{path}' has {type(unet.mid_block).__name__}."
            )
        unet.conv_norm_out = unet.conv_out = None  # the output layers: unused by D
        self.timestep = timestep
        sigma = float(vp_sigmas(betas)[timestep])
        # VP: c_in = 1 / sqrt(1 + sigma^2), i.e. the base class' c_in with sigma_data = 1.
        super().__init__(_UNetEps(unet), sigma, sigma_data=1.0, num_groups=num_groups)

    def c_noise(self) -> float:
        """The U-Net's timestep input: the trained timestep itself."""
        return float(self.timestep)

    def _embed(self, c_noise: Tensor, labels: Tensor | None) -> Cond:
        """The time embedding (``get_time_embed`` + ``time_embedding``) and the text context."""
        unet = self.net.unet
        dtype = next(unet.parameters()).dtype
        emb = unet.time_embedding(unet.get_time_embed(sample=c_noise, timestep=c_noise).to(dtype))
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        if labels is None:  # only the shape probe of __init__: one zero token
            labels = emb.new_zeros(emb.shape[0], 1, self.net.context_dim)
        elif labels.ndim != 3:
            raise UserError(
                "SDDiscriminator needs text token embeddings [N, L, D] as labels "
                "(PairDataModule with a text_encoder)."
            )
        return emb, labels.to(dtype)

    def _features(self, x: Tensor, emb: Cond, inject: Inject) -> Features:
        """conv_in, down blocks, mid block and up blocks of ``UNet2DConditionModel.forward``."""
        unet, (temb, ctx) = self.net.unet, emb
        h = inject(0, unet.conv_in(x.to(temb.dtype)))
        hs, skips, dec, k = [h], {h.shape[-1]: h}, {}, 1
        for block in unet.down_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for resnet, attn in zip(block.resnets, attentions, strict=True):
                h = resnet(h, temb)
                h = h if attn is None else _transformer(attn, h, ctx)
                hs.append(h)
                skips[h.shape[-1]] = h  # the last encoder feature at each resolution
            for down in block.downsamplers or []:
                h, k = inject(k, down(h)), k + 1
                hs.append(h)
                skips[h.shape[-1]] = h
        mid = unet.mid_block
        h = mid.resnets[0](h, temb)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
            h = resnet(_transformer(attn, h, ctx), temb)
        mid_h = h
        for block in unet.up_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for resnet, attn in zip(block.resnets, attentions, strict=True):
                h = resnet(torch.cat([h, hs.pop()], dim=1), temb)
                h = h if attn is None else _transformer(attn, h, ctx)
            dec[h.shape[-1]] = h  # the combination of skips and bottleneck at this resolution
            for up in block.upsamplers or []:
                h = up(h, hs[-1].shape[-2:] if hs else None)
        return skips, mid_h, dec
