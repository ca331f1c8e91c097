"""Stable Diffusion (Rombach et al. 2022) as a ``cm`` denoiser in latent space, via ``diffusers``.

SD's UNet is a VP ``eps``-prediction model over T = 1000 discrete timesteps, so it is exposed
exactly like any discrete DDPM (``cm.precond.VPPrecond``): ``sigma_t = sqrt((1 - abar_t) /
abar_t)`` from the scheduler's betas (``scaled_linear`` for SD 1.x), the nearest trained
timestep, ``D(z; sigma) = z - sigma eps(z / sqrt(1 + sigma^2), t, c)``. The text context ``c``
is the ``labels`` argument: CLIP ViT-L/14 token embeddings ``[N, 77, 768]``
(``cm.networks.text.TextEncoder("ViT-L-14", "openai")`` gives SD 1.x's conditioning). Images
live in the VAE's latent space scaled by ``scaling_factor`` (0.18215 for SD 1.x): ``encode``
and ``decode`` map between [-1, 1] pixels and latents through the pipeline's ``vae/``, loaded
as every latent model's VAE (``cm.vae.VAE``, held outside the module tree: not in checkpoints
or exports). ``diffusers`` is an optional extra.

A teacher is frozen; ``trainable=True`` makes the U-Net a student initialised from the
published weights (Diffusion2GAN's one-step generator). ``load_unet`` is shared with
``cm.networks.sd_discriminator.SDDiscriminator``, which starts from the same U-Net.
"""

import json
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.hub import local_or_cached
from cm.precond import VPPrecond
from cm.schedules import vp_sigmas
from cm.vae import VAE, diffusers_module

SD_SCALING = 0.18215  # SD 1.x/2.x's published latent scale, when no VAE is loaded


def _diffusers():
    """The ``diffusers`` module, or one clear error saying how to install it."""
    return diffusers_module("The Stable Diffusion teacher")


def scheduler_betas(config: dict) -> Tensor:
    """DDPM betas ``[T]`` (float64) of a diffusers scheduler config (Ho et al. 2020; SD 1.x)."""
    T = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    match config.get("beta_schedule", "linear"):
        case "linear":
            return torch.linspace(start, end, T, dtype=torch.float64)
        case "scaled_linear":  # SD: linear in sqrt(beta)
            return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
        case other:
            raise UserError(f"Unsupported beta_schedule {other!r}: use linear or scaled_linear.")


class _UNetEps(nn.Module):
    """``eps(x_t, t, c)`` of a diffusers ``UNet2DConditionModel``: the network sees ``t``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.img_resolution = int(unet.config.sample_size)
        self.in_channels = int(unet.config.in_channels)
        self.label_dim = 0  # text context, not classes
        self.context_dim = int(unet.config.cross_attention_dim)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """Predicted noise ``[N, 4, h, w]``; ``labels`` is the context ``[N, L, D]``."""
        if labels is None or labels.ndim != 3:
            raise UserError(
                "Stable Diffusion needs text token embeddings [N, L, D] as labels "
                "(cm.networks.text.TextEncoder; the empty caption for unconditional)."
            )
        dtype = self.unet.dtype
        out = self.unet(x.to(dtype), c_noise, encoder_hidden_states=labels.to(dtype))
        return out.sample


def load_unet(path: str, dtype: str = "float32") -> tuple[nn.Module, Tensor, Path]:
    """The ``UNet2DConditionModel`` of a local diffusers pipeline, its DDPM betas and its root.

    Args:
        path: a local diffusers pipeline directory with ``unet/`` and ``scheduler/``, or the
            Hugging Face Hub id of one (``stable-diffusion-v1-5/stable-diffusion-v1-5``), read
            from the HF cache (``cm.hub.resolve``).
        dtype: parameter dtype of the UNet (``float32``, ``float16`` or ``bfloat16``).
    """
    diffusers = _diffusers()
    root = local_or_cached(path, "Stable Diffusion pipeline")
    sched = root / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise FileNotFoundError(
            f"No diffusers pipeline at '{root}' (missing {sched.relative_to(root)}): give "
            "the local directory of a Stable Diffusion checkpoint in diffusers format."
        )
    config = json.loads(sched.read_text())
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise UserError(
            f"'{root}' predicts {config['prediction_type']}; only epsilon is supported."
        )
    unet = diffusers.UNet2DConditionModel.from_pretrained(
        root / "unet", torch_dtype=getattr(torch, dtype)
    )
    return unet, scheduler_betas(config), root


class StableDiffusionDenoiser(VPPrecond):
    """Stable Diffusion's UNet as ``D(z, sigma, labels)`` in EDM coordinates (Rombach et al. 2022).

    As a teacher it is frozen (eval, no gradients); ``trainable=True`` makes the UNet a student
    initialised from the published weights (Diffusion2GAN's generator, Kang et al. 2024), the
    VAE staying frozen. Latent shape is ``[4, sample_size, sample_size]``
    (``self.net.in_channels``, ``self.net.img_resolution``).

    Args:
        path: a local diffusers pipeline directory with ``unet/``, ``vae/`` and ``scheduler/``.
        dtype: parameter dtype of the UNet and VAE (``float16`` halves GPU memory; a trainable
            UNet stays ``float32`` and trains under the trainer's mixed precision).
        load_vae: also load the VAE for ``encode``/``decode`` (not needed for latent pairs;
            a student needs it to decode its sample grids into pixels).
        trainable: train the UNet (a student) instead of freezing it (a teacher).
    """

    # Always a latent model: without its VAE (load_vae=False) it cannot decode its samples.
    latent = True
    missing_vae = "This {name} was built with load_vae=False."

    def __init__(
        self,
        path: str,
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        load_vae: bool = True,
        trainable: bool = False,
    ) -> None:
        if trainable and dtype != "float32":
            raise UserError(
                f"A trainable StableDiffusionDenoiser keeps float32 weights, got dtype={dtype}: "
                "use trainer.precision bf16-mixed for half-precision compute."
            )
        unet, betas, root = load_unet(path, dtype)
        super().__init__(_UNetEps(unet), "linear", len(betas))
        # Replace VPPrecond's linear table with the scheduler's (SD: scaled_linear).
        self.betas, self.sigmas = betas, vp_sigmas(betas)
        self.set_vae(VAE(str(root / "vae"), dtype=dtype) if load_vae else None)
        self.path, self.trainable = str(root), trainable
        # Checkpoints written when the VAE was a submodule carry its weights: they are ignored.
        self.register_load_state_dict_pre_hook(_drop_vae_weights)
        if not trainable:
            self.requires_grad_(False).eval()

    @property
    def scaling_factor(self) -> float:
        """The VAE's latent scale (SD 1.x: 0.18215)."""
        return self.vae.scaling_factor if self.vae is not None else SD_SCALING

    def train(self, mode: bool = True) -> "StableDiffusionDenoiser":
        """Switch the UNet's mode (a frozen teacher stays in eval); the VAE always stays in eval."""
        return super().train(mode and self.trainable)


def _drop_vae_weights(module: nn.Module, state: dict[str, Tensor], prefix: str, *args) -> None:
    """Remove the ``vae.*`` entries of checkpoints from before the VAE left the module tree."""
    for key in [k for k in state if k.startswith(prefix + "vae.")]:
        del state[key]
