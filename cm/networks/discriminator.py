"""Diffusion2GAN's conditional diffusion discriminator (Kang et al. 2024, Sec. 4.2, Fig. 4).

The teacher's U-Net, initialised from the teacher's weights, judges an image ``x`` given the
noise ``z`` it came from and the class label ``c`` (``D(x, z, c)``):

- ``x`` enters at a fixed noise level ``sigma`` through the teacher's own input scaling and
  timestep input (``c_in(sigma) x`` and ``c_noise = noise_scale * ln(sigma)``, the EDM /
  consistency-model preconditioning), so the copied network sees inputs it was trained on. No
  noise is added: ``D`` is deterministic, which keeps R1 and the readouts exact. A small
  ``sigma`` (near the data) is the default, as the paper feeds the image at an early timestep.
- ``z`` enters through an extra zero-initialised 3x3 convolution added to the first encoder
  convolution (equivalent to concatenating ``z`` on channels with zero-initialised extra input
  channels), so at initialisation ``D`` ignores ``z``.
- ``c`` goes through the U-Net's own label embedding.
- Multi-scale input ("in"): after every down-sampling of the encoder a zero-initialised 3x3
  convolution adds a resized copy of ``[c_in x, z]``.
- Multi-scale output ("out"): at every decoder resolution, real/fake readout heads on the
  encoder skip features, on the up-sampled bottleneck features, and on the decoder features
  (which the U-Net computes as the combination of the two). Each head is a per-position logit
  map ``[N, 1, h, w]``; the GAN loss is applied per position (``cm.objectives.diffusion2gan``).

The U-Net's output layers (ADM ``out_norm``/``out_conv``, NCSN++ ``head``s) are dropped: a
discriminator has no use for them, and unused parameters would trouble DDP. ``ADMDiscriminator``
wraps ``cm.networks.ADMUNet``, ``NCSNppDiscriminator`` wraps ``cm.networks.NCSNpp`` (EDM's
DDPM++/NCSN++), ``cm.networks.sd_discriminator.SDDiscriminator`` a diffusers
``UNet2DConditionModel`` (Stable Diffusion); all share the injections and heads of
``UNetDiscriminator``.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cm.errors import UserError
from cm.networks.adm import ADMUNet, Downsample, ResBlock, group_norm, zero_init
from cm.networks.embeddings import timestep_embedding
from cm.networks.ncsnpp import NCSNpp

# inject(i, h): add the i-th input injection (0: z at the first conv; k > 0: the k-th downsampling).
Inject = Callable[[int, Tensor], Tensor]
# (skip features, bottleneck, decoder features), skips and decoder keyed by resolution.
Features = tuple[dict[int, Tensor], Tensor, dict[int, Tensor]]
# The backbone's conditioning: an embedding [N, E], or (embedding, text context [N, L, D]).
Cond = Tensor | tuple[Tensor, Tensor]


class ReadoutHead(nn.Module):
    """Per-position real/fake logits ``conv1x1(silu(norm(h)))`` (Kang et al. 2024, Sec. 4.2).

    Args:
        channels: input feature channels.
        num_groups: maximum number of GroupNorm groups.
    """

    def __init__(self, channels: int, num_groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, h: Tensor) -> Tensor:
        """Logits ``[N, 1, h, w]`` from features ``[N, C, h, w]``."""
        return self.conv(F.silu(self.norm(h)))


class UNetDiscriminator(nn.Module):
    """Multi-scale in-and-out conditional U-Net discriminator (Kang et al. 2024, Sec. 4.2).

    ``D(x, z, labels) -> list of logit maps [N, 1, h, w]``, three per decoder resolution
    (skip, bottleneck, decoder; lowest resolution first). Subclasses run their backbone
    (``_embed``, ``_features``); this class adds the zero-initialised ``z`` and multi-scale input
    convolutions and the readout heads. Initialise from the teacher with ``init_from(teacher)``
    (``Diffusion2GANModule`` does so).

    Args:
        net: the U-Net with the teacher's architecture (the teacher network's config).
        sigma: the fixed noise level at which ``D`` reads images (the teacher's timestep input).
        sigma_data: the data standard deviation of the teacher's preconditioner (``c_in``).
        noise_scale: the teacher's ``c_noise = noise_scale * ln(sigma)`` (0.25 for EDM,
            250 for openai/consistency_models' EDM teachers).
        num_groups: maximum GroupNorm groups of the readout heads.
    """

    dropped: tuple[str, ...] = ()  # state-dict keys (substrings) of the U-Net's output layers

    def __init__(
        self,
        net: nn.Module,
        sigma: float = 0.5,
        sigma_data: float = 0.5,
        noise_scale: float = 0.25,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if sigma <= 0:
            raise UserError(f"The discriminator's sigma must be positive, got {sigma}.")
        self.sigma, self.sigma_data, self.noise_scale = sigma, sigma_data, noise_scale
        self.net = net
        c = net.in_channels
        enc, mid, dec, injected = self._shapes()
        self.z_in = zero_init(nn.Conv2d(c, injected[0], 3, padding=1))
        # "In": one zero-init conv per down-sampling, adding a resized copy of [c_in x, z].
        self.x_in = nn.ModuleList(
            [zero_init(nn.Conv2d(2 * c, ch, 3, padding=1)) for ch in injected[1:]]
        )
        self.resolutions = sorted(dec)
        g = num_groups
        self.skip_heads = nn.ModuleList([ReadoutHead(enc[r], g) for r in self.resolutions])
        self.mid_heads = nn.ModuleList([ReadoutHead(mid, g) for _ in self.resolutions])
        self.dec_heads = nn.ModuleList([ReadoutHead(dec[r], g) for r in self.resolutions])

    @torch.no_grad()
    def _shapes(self) -> tuple[dict[int, int], int, dict[int, int], list[int]]:
        """Channels of the skip/decoder features per resolution, the bottleneck, the injections.

        Read from one batch-1 pass, so any layout of the backbone is handled alike.
        """
        net, injected = self.net, []

        def record(i: int, h: Tensor) -> Tensor:
            injected.append(h.shape[1])
            return h

        res = net.img_resolution
        x = torch.zeros(1, net.in_channels, res, res)
        emb = self._embed(torch.zeros(1), None)
        skips, mid, dec = self._features(x, emb, record)
        enc_ch = {r: h.shape[1] for r, h in skips.items()}
        return enc_ch, mid.shape[1], {r: h.shape[1] for r, h in dec.items()}, injected

    def c_noise(self) -> float:
        """The teacher's timestep input at ``sigma`` (EDM: ``noise_scale * ln(sigma)``)."""
        return self.noise_scale * math.log(self.sigma)

    def _embed(self, c_noise: Tensor, labels: Tensor | None) -> Cond:
        """The backbone's noise (+ class) embedding (+ text context)."""
        raise NotImplementedError

    def _features(self, x: Tensor, emb: Cond, inject: Inject) -> Features:
        """Run the backbone's encoder, bottleneck and decoder (without output layers)."""
        raise NotImplementedError

    @torch.no_grad()
    def init_from(self, teacher: nn.Module) -> None:
        """Copy the teacher network's weights (all but its output layers) into ``net``."""
        t_net = getattr(teacher, "net", teacher)
        t_state = {
            k: v for k, v in t_net.state_dict().items() if not any(d in k for d in self.dropped)
        }
        s_state = self.net.state_dict()
        bad = [k for k in s_state if k not in t_state or t_state[k].shape != s_state[k].shape]
        if bad or len(s_state) != len(t_state):
            raise UserError(
                f"Cannot initialise the discriminator from the teacher: their networks differ "
                f"(e.g. at '{(bad or sorted(set(t_state) - set(s_state)))[0]}'); give "
                "discriminator.init_args.net the teacher's network config."
            )
        self.net.load_state_dict(t_state)

    def forward(self, x: Tensor, z: Tensor, labels: Tensor | None = None) -> list[Tensor]:
        """Logit maps for images ``x`` ``[N, C, H, W]`` given noise ``z`` and labels.

        Args:
            x: images in [-1, 1] (real, generated, or mix-and-matched).
            z: the unit-variance noise each image is paired with.
            labels: one-hot labels ``[N, label_dim]``, text contexts ``[N, L, D]``, or None.
        """
        c_in = 1 / math.sqrt(self.sigma**2 + self.sigma_data**2)
        c_noise = x.new_full((x.shape[0],), self.c_noise())
        emb = self._embed(c_noise, labels)
        z = z.to(x.dtype)
        xz = torch.cat([c_in * x, z], dim=1)

        def inject(i: int, h: Tensor) -> Tensor:
            if i == 0:  # = concatenating z on the first conv's input, zero-init extra channels
                return h + self.z_in(z)
            return h + self.x_in[i - 1](F.interpolate(xz, size=h.shape[-2:], mode="area"))

        skips, mid, dec = self._features(c_in * x, emb, inject)
        logits = []
        for j, res in enumerate(self.resolutions):
            up = F.interpolate(mid, size=(res, res), mode="nearest")
            logits.append(self.skip_heads[j](skips[res]))
            logits.append(self.mid_heads[j](up))
            logits.append(self.dec_heads[j](dec[res]))
        return logits


def _is_down(block: nn.Module) -> bool:
    """Whether an ADM encoder entry halves the resolution (down ResBlock or Downsample)."""
    return any(
        isinstance(m, Downsample) or (isinstance(m, ResBlock) and m.resample == "down")
        for m in block
    )


class ADMDiscriminator(UNetDiscriminator):
    """Diffusion2GAN discriminator on the teacher's ``ADMUNet`` (Kang et al. 2024, Sec. 4.2).

    Args:
        net: an ``ADMUNet`` with the teacher's architecture.
        sigma: the fixed noise level at which ``D`` reads images.
        sigma_data: the teacher's ``sigma_data``.
        noise_scale: the teacher's ``c_noise = noise_scale * ln(sigma)``.
        num_groups: maximum GroupNorm groups of the readout heads.
    """

    dropped = ("out_norm.", "out_conv.")

    def __init__(
        self,
        net: ADMUNet,
        sigma: float = 0.5,
        sigma_data: float = 0.5,
        noise_scale: float = 0.25,
        num_groups: int = 32,
    ) -> None:
        if not isinstance(net, ADMUNet):
            raise TypeError(f"ADMDiscriminator needs an ADMUNet, got {type(net).__name__}.")
        del net.out_norm, net.out_conv
        super().__init__(net, sigma, sigma_data, noise_scale, num_groups)

    def _embed(self, c_noise: Tensor, labels: Tensor | None) -> Tensor:
        """ADM's timestep MLP plus the label embedding (``ADMUNet.forward``)."""
        net = self.net
        emb = net.time_embed(timestep_embedding(c_noise, net.model_channels))
        if net.label_embed is not None and labels is not None:
            emb = emb + net.label_embed(labels.to(emb.dtype))
        return emb

    def _features(self, x: Tensor, emb: Tensor, inject: Inject) -> Features:
        """ADM encoder/middle/decoder; the last feature at each resolution is read out."""
        net, h, hs, skips, dec, k = self.net, x, [], {}, {}, 0
        for i, block in enumerate(net.encoder):
            h = block(h, emb)
            if i == 0 or _is_down(block):
                h, k = inject(k, h), k + 1
            hs.append(h)
            skips[h.shape[-1]] = h
        mid = h = net.middle(h, emb)
        for block in net.decoder:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
            dec[h.shape[-1]] = h
        return skips, mid, dec


class NCSNppDiscriminator(UNetDiscriminator):
    """Diffusion2GAN discriminator on the teacher's ``NCSNpp`` (EDM's DDPM++/NCSN++; Sec. 4.2).

    Args:
        net: an ``NCSNpp`` with the teacher's architecture.
        sigma: the fixed noise level at which ``D`` reads images.
        sigma_data: the teacher's ``sigma_data``.
        noise_scale: the teacher's ``c_noise = noise_scale * ln(sigma)``.
        num_groups: maximum GroupNorm groups of the readout heads.
    """

    dropped = (".head.",)

    def __init__(
        self,
        net: NCSNpp,
        sigma: float = 0.5,
        sigma_data: float = 0.5,
        noise_scale: float = 0.25,
        num_groups: int = 32,
    ) -> None:
        if not isinstance(net, NCSNpp):
            raise TypeError(f"NCSNppDiscriminator needs an NCSNpp, got {type(net).__name__}.")
        for level in net.dec:
            level.head = None
        super().__init__(net, sigma, sigma_data, noise_scale, num_groups)

    def _embed(self, c_noise: Tensor, labels: Tensor | None) -> Tensor:
        """EDM's mapping network (``NCSNpp.forward``)."""
        net = self.net
        emb = net.map_noise(c_noise)
        if net.map_label is not None:
            if labels is None:
                labels = emb.new_zeros(emb.shape[0], net.label_dim)
            emb = emb + net.map_label(labels.to(emb.dtype) * math.sqrt(net.label_dim))
        return F.silu(net.map_layer1(F.silu(net.map_layer0(emb))))

    def _features(self, x: Tensor, emb: Tensor, inject: Inject) -> Features:
        """DDPM++ encoder/decoder; the bottleneck is the decoder's bottom entry (attention)."""
        net, k = self.net, 1
        h = inject(0, net.enc_in(x))
        hs, aux, skips, dec, mid = [h], x, {}, {}, None
        for level in net.enc:
            for down in level.entry:
                h = down(h, emb)
                if level.aux is not None:
                    h, aux = level.aux(h, aux)
                h, k = inject(k, h), k + 1
                hs.append(h)
            for blk in level.blocks:
                h = blk(h, emb)
                hs.append(h)
            skips[h.shape[-1]] = h
        for level in net.dec:
            for blk in level.entry:
                h = blk(h, emb)
            mid = h if mid is None else mid
            for blk in level.blocks:
                h = blk(torch.cat([h, hs.pop()], dim=1), emb)
            dec[h.shape[-1]] = h
        return skips, mid, dec
