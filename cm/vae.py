"""The one VAE path of latent models (Rombach et al. 2022, LDM): pixels <-> scaled latents.

``VAE`` wraps a frozen diffusers ``AutoencoderKL`` read from a local folder (SD's
``stabilityai/sd-vae-ft-ema`` / ``sd-vae-ft-mse``, or an SD pipeline's ``vae/``): ``encode``
maps images in [-1, 1] to latents ``z = (E(x) - shift_factor) * scaling_factor`` (0.18215 and
no shift for SD 1.x/2.x, the published values in the VAE's ``config.json``), ``decode`` maps
latents back to images in [-1, 1]. Latent datasets (``cm.data.Latents``) encode through it, and
latent denoisers decode their samples through it.

A denoiser *holds* its VAE (``LatentSpace``) without registering it as a submodule: the VAE's
weights come from its folder, so checkpoints, exports, EMA copies and DDP buckets never carry its
frozen parameters, and a deep copy (the EMA) shares it. It follows its input to the device it is
called on. ``diffusers`` is an optional extra.
"""

import hashlib
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.hub import local_or_cached

INSTALL = "pip install diffusers (the optional extra cm[sd])"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WHERE = (
    "download a diffusers AutoencoderKL, e.g. stabilityai/sd-vae-ft-ema or "
    "stabilityai/sd-vae-ft-mse from the Hugging Face Hub "
    "(AutoencoderKL.from_pretrained(...).save_pretrained(DIR)), and give DIR"
)


def diffusers_module(what: str = "The Stable Diffusion teacher") -> Any:
    """The ``diffusers`` module, or one clear error saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"{what} needs diffusers: {INSTALL}.") from None
    return diffusers


def vae_folder(path: str | Path) -> Path:
    """The folder of a diffusers ``AutoencoderKL``: ``path`` itself or its ``vae/`` (a pipeline).

    ``path`` may be a Hugging Face Hub id (``stabilityai/sd-vae-ft-mse``), read from the HF
    cache (``cm.hub.resolve``). A missing folder, ``config.json`` or safetensors weights file is
    one ``FileNotFoundError`` naming the path and where to get a VAE. Pickled ``.bin`` weights
    are not read.
    """
    root = local_or_cached(path, "VAE")
    if not (root / "config.json").is_file() and (root / "vae" / "config.json").is_file():
        root = root / "vae"
    missing = next((n for n in ("config.json", WEIGHTS) if not (root / n).is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"No VAE at '{root}' (missing {missing}): {WHERE}.")
    return root


class VAE(nn.Module):
    """A frozen ``AutoencoderKL`` between [-1, 1] pixels and scaled latents (Rombach et al. 2022).

    Frozen and in eval mode for good; it moves itself to the device of its input. Only a local
    folder or a Hub id's snapshot in the Hugging Face cache is read, and only safetensors
    weights.

    Args:
        path: local folder of a diffusers ``AutoencoderKL`` (``config.json`` and
            ``diffusion_pytorch_model.safetensors``), or of a pipeline with such a ``vae/``.
        scaling_factor: latent scale; None: the VAE's ``config.json`` (SD: 0.18215).
        shift_factor: latent shift, subtracted before scaling; None: the ``config.json``'s
            (SD: none, i.e. 0).
        dtype: parameter dtype (``float16`` halves GPU memory; inputs are cast to it and outputs
            returned as float32).
    """

    def __init__(
        self,
        path: str,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    ) -> None:
        super().__init__()
        diffusers = diffusers_module("A VAE (cm.vae.VAE)")
        root = vae_folder(path)
        try:
            self.autoencoder = diffusers.AutoencoderKL.from_pretrained(
                root,
                torch_dtype=getattr(torch, dtype),
                local_files_only=True,
                use_safetensors=True,
                low_cpu_mem_usage=False,
            )
        except (OSError, ValueError, RuntimeError) as e:
            first = " ".join(str(e).split())[:200]
            raise UserError(
                f"Cannot load the VAE at '{root}' ({type(e).__name__}: {first}): {WHERE}."
            ) from None
        config = self.autoencoder.config
        self.path = str(root.resolve())
        self.scaling_factor = float(
            scaling_factor if scaling_factor is not None else config.scaling_factor
        )
        shift = shift_factor if shift_factor is not None else config.get("shift_factor")
        self.shift_factor = float(shift or 0.0)
        self.in_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "VAE":
        """Stay in eval mode: the VAE is frozen."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype."""
        return self.autoencoder.dtype

    def _follow(self, x: Tensor) -> Tensor:
        """``x`` in the VAE's dtype, after moving the VAE to ``x``'s device if needed."""
        if self.autoencoder.device != x.device:
            self.to(x.device)
        return x.to(self.dtype)

    def check_channels(self, channels: int) -> None:
        """Refuse images of ``channels`` channels: the VAE's own, or grayscale for RGB, pass."""
        if channels != self.in_channels and (channels, self.in_channels) != (1, 3):
            raise UserError(
                f"The VAE at '{self.path}' encodes {self.in_channels}-channel images, got "
                f"{channels} channels: give images with {self.in_channels} channels."
            )

    def _rgb(self, images: Tensor) -> Tensor:
        """Grayscale ``[N, 1, H, W]`` repeated to the VAE's 3 channels; others must match."""
        self.check_channels(images.shape[1])
        return images.expand(-1, 3, -1, -1) if images.shape[1] < self.in_channels else images

    @torch.no_grad()
    def moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The unscaled posterior's mean and std ``[N, c, H/f, W/f]`` (float32) of ``images``."""
        posterior = self.autoencoder.encode(self._follow(self._rgb(images))).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def scale(self, z: Tensor) -> Tensor:
        """Raw latents (a posterior mean or sample) -> ``(z - shift_factor) * scaling_factor``."""
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of images in [-1, 1]: the posterior mean, or a sample with ``generator``.

        Args:
            images: ``[N, C, H, W]`` in [-1, 1] (grayscale is repeated to RGB).
            generator: draw ``z = mean + std * n`` with it (on the CPU); None: the mean.
        """
        mean, std = self.moments(images)
        if generator is not None:
            n = torch.randn(mean.shape, generator=generator).to(mean.device)
            mean = mean + std * n
        return self.scale(mean)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] (clamped, float32) ``[N, C, f h, f w]`` of scaled latents."""
        z = latents.float() / self.scaling_factor + self.shift_factor
        return self.autoencoder.decode(self._follow(z)).sample.float().clamp(-1, 1)

    def encoder_digest(self) -> str:
        """SHA-256 of the encoder's weights (and dtype): what a latent cache depends on.

        The decoder is left out: SD's ``ft-ema`` and ``ft-mse`` VAEs fine-tune only the decoder,
        so their latents, and caches, are the same.
        """
        digest = hashlib.sha256(str(self.dtype).encode())
        modules = (self.autoencoder.encoder, getattr(self.autoencoder, "quant_conv", None))
        for module in (m for m in modules if m is not None):
            for name, tensor in module.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
        return digest.hexdigest()


class Shared:
    """A reference an ``nn.Module`` does not register, and that copies (deep ones too) share."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __copy__(self) -> "Shared":
        return self

    def __deepcopy__(self, memo: dict) -> "Shared":
        return self


class LatentSpace:
    """Mixin of a denoiser in a VAE's latent space (Rombach et al. 2022): ``vae``, ``decode``.

    The VAE is held through ``Shared``, outside the module tree: not in ``state_dict()``,
    ``parameters()`` or ``.to()``, shared by deep copies. ``latent`` says whether samples are
    latents that ``decode`` turns into pixels (samplers check it).
    """

    _shared_vae: Shared | None = None
    missing_vae = (
        "{name} has no VAE to decode its latents: set its vae (init_args.vae: {{class_path: "
        "cm.vae.VAE, init_args: {{path: DIR}}}})."
    )

    def set_vae(self, vae: VAE | None) -> None:
        """Hold ``vae`` (None: a pixel-space denoiser)."""
        if vae is not None and not isinstance(vae, VAE):
            raise UserError(f"vae must be a cm.vae.VAE, got {type(vae).__name__}.")
        self._shared_vae = None if vae is None else Shared(vae)

    @property
    def vae(self) -> VAE | None:
        """The VAE its latents decode through, or None."""
        return None if self._shared_vae is None else self._shared_vae.obj

    @property
    def latent(self) -> bool:
        """Whether this denoiser generates latents (then ``decode`` gives pixels)."""
        return self.vae is not None

    def _need_vae(self) -> VAE:
        if self.vae is None:
            raise UserError(self.missing_vae.format(name=type(self).__name__))
        return self.vae

    def encode(self, images: Tensor) -> Tensor:
        """Latents ``z = scaling_factor * E(x)`` (the posterior mean) of images in [-1, 1]."""
        return self._need_vae().encode(images)

    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] (clamped) of latents, through the VAE."""
        return self._need_vae().decode(latents)
