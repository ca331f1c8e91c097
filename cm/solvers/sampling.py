"""Seeded generation: per-seed noise and labels, a sigma grid and a solver, as one object."""

import inspect
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.protocols import Denoiser
from cm.schedules import cosine_sigmas, schedule_sigmas, vp_timestep_sigmas
from cm.solvers.consistency import onestep


class SeededNoise:
    """Per-sample generators: row ``i`` draws from ``torch.Generator().manual_seed(seeds[i])``.

    The same seed gives the same sample at any batch size or world size (as EDM's
    ``StackedRandomGenerator``). Draws happen on the CPU and move to ``device``.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device

    def randn(self, shape: Sequence[int]) -> Tensor:
        """Standard normal ``[len(seeds), *shape]``."""
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators]).to(
            self.device
        )

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal shaped like ``x`` (its first dim is the number of seeds)."""
        return self.randn(x.shape[1:]).to(dtype=x.dtype)


def seed_labels(seeds: Sequence[int], label_dim: int, class_label: int | None = None) -> Tensor:
    """One-hot labels ``[N, label_dim]``: ``seed % label_dim`` (balanced) or ``class_label``."""
    idx = torch.as_tensor([int(s) % label_dim for s in seeds])
    if class_label is not None:
        idx = torch.full_like(idx, class_label)
    return torch.nn.functional.one_hot(idx, label_dim).float()


class Sampler:
    """A solver with its sigma grid: ``sampler(denoiser, seeds, shape)`` generates images.

    Args:
        solver: any ``cm.solvers`` function ``fn(denoiser, x, sigmas, labels=None, ...)``.
        num_steps: steps of the grid; 1 is one-step.
        sigma_min: smallest nonzero sigma of the Karras grid.
        sigma_max: the starting noise level ``T`` (Karras and cosine grids).
        rho: Karras grid exponent.
        schedule: ``"karras"`` (``karras_sigmas``, EDM Eq. 5), ``"vp"`` (``num_steps`` evenly
            spaced trained timesteps of a DDPM denoiser, ``vp_timestep_sigmas``) or ``"cosine"``
            (``cosine_sigmas``, progressive distillation's grid), ``"logsnr"`` (uniform in log
            sigma, ``logsnr_sigmas``) or ``"time_uniform"`` (``time_uniform_sigmas``, rho = 1).
        sigmas: an explicit decreasing grid instead (e.g. CM's 2-step ``[80.0, 0.661]``); a
            trailing 0 is appended when missing.
    """

    def __init__(
        self,
        solver: Callable[..., Tensor] = onestep,
        num_steps: int = 1,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigmas: list[float] | None = None,
        schedule: Literal["karras", "vp", "cosine", "logsnr", "time_uniform", "flow"] = "karras",
    ) -> None:
        self.solver = solver
        self.num_steps = num_steps
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.sigmas, self.schedule = sigmas, schedule

    def grid(self, denoiser: Denoiser | None = None) -> Tensor:
        """The decreasing float64 sigma grid ending in 0 (``"vp"`` reads ``denoiser.sigmas``).

        A discrete denoiser (one with ``round_sigma``, e.g. ``VPPrecond``) gets its grid rounded
        to trained noise levels, as EDM's samplers do.
        """
        sigmas = self._grid(denoiser)
        round_sigma = getattr(denoiser, "round_sigma", None)
        return sigmas if round_sigma is None else round_sigma(sigmas)

    def _grid(self, denoiser: Denoiser | None) -> Tensor:
        """The grid before rounding."""
        if self.sigmas is not None:
            sigmas = torch.as_tensor(self.sigmas, dtype=torch.float64)
            return sigmas if sigmas[-1] == 0 else torch.cat([sigmas, sigmas.new_zeros(1)])
        match self.schedule:
            case "karras" | "logsnr" | "time_uniform" | "flow":
                return schedule_sigmas(
                    self.schedule, self.num_steps, self.sigma_min, self.sigma_max, self.rho
                )
            case "cosine":
                return cosine_sigmas(self.num_steps, self.sigma_max)
            case "vp":
                table = getattr(denoiser, "sigmas", None)
                if table is None:
                    raise UserError(
                        "schedule 'vp' needs a DDPM denoiser (cm.precond.VPPrecond or "
                        "IDDPMPrecond) with a timestep table; use 'karras' for other denoisers."
                    )
                return vp_timestep_sigmas(table, self.num_steps)

    @torch.no_grad()
    def __call__(
        self,
        denoiser: Denoiser,
        seeds: Sequence[int],
        shape: Sequence[int],
        labels: Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Generate ``[len(seeds), *shape]`` images in ``[-1, 1]``-scale (unclipped)."""
        noise = SeededNoise(seeds, device)
        sigmas = self.grid(denoiser)
        x = noise.randn(shape) * sigmas[0].item()
        kwargs = {"noise": noise.randn_like} if _takes(self.solver, "noise") else {}
        labels = None if labels is None else labels.to(device)
        return self.solver(denoiser, x, sigmas, labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        denoiser: Denoiser,
        seeds: Sequence[int],
        shape: Sequence[int],
        label_dim: int = 0,
        class_label: int | None = None,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
    ) -> tuple[Tensor, Tensor | None]:
        """Images clamped to ``[-1, 1]`` for ``seeds`` in batches, and their class indices.

        Labels come from the seeds (``seed_labels``), so results do not depend on ``batch_size``.
        A latent denoiser (``is_latent``) samples latents of ``shape`` and returns them decoded
        into pixels by its VAE, clamped after decoding.
        """
        latent = check_latent(denoiser)
        images, classes = [], []
        for first in range(0, len(seeds), batch_size):
            chunk = list(seeds[first : first + batch_size])
            labels = seed_labels(chunk, label_dim, class_label) if label_dim else None
            x = self(denoiser, chunk, shape, labels, device)
            images.append((denoiser.decode(x) if latent else x).clamp(-1, 1))
            classes.append(None if labels is None else labels.argmax(1))
        return torch.cat(images), None if label_dim == 0 else torch.cat(classes)


def is_latent(denoiser: nn.Module) -> bool:
    """Whether ``denoiser`` generates VAE latents that its ``decode`` turns into pixels.

    True for a denoiser holding a VAE (``cm.vae.LatentSpace``: a preconditioner given ``vae``,
    a ``StableDiffusionDenoiser``), also through guidance wrappers, and for one that is a latent
    model by construction (``latent = True``) even when its VAE was not loaded.
    """
    return getattr(denoiser, "vae", None) is not None or bool(getattr(denoiser, "latent", False))


def check_latent(denoiser: nn.Module) -> bool:
    """``is_latent(denoiser)``; a latent model without its VAE is one clear error."""
    latent = is_latent(denoiser)
    if latent and getattr(denoiser, "vae", None) is None:
        raise UserError("Sampling a latent model needs its VAE to decode: set load_vae: true.")
    return latent


def _takes(fn: Callable, name: str) -> bool:
    """Whether ``fn`` accepts keyword ``name``."""
    return name in inspect.signature(fn).parameters


@torch.no_grad()
def generate_text_or_latent(
    sampler: Sampler,
    denoiser: nn.Module,
    seeds: Sequence[int],
    shape: Sequence[int],
    contexts: Callable[[Sequence[int]], Tensor] | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Pixel images in ``[-1, 1]`` of a text-conditioned and/or latent denoiser, per seed.

    Seed ``s`` gets the text context ``contexts([s])`` (so results do not depend on the batch
    size); a latent denoiser (``is_latent``, e.g. ``StableDiffusionDenoiser``) has its samples
    decoded by its VAE, clamped after decoding, not before.

    Args:
        sampler: the solver and its grid.
        denoiser: ``D(x, sigma, labels)``, in eval mode.
        seeds: one per image.
        shape: ``(C, H, W)`` the denoiser works in (latent shape for latent models).
        contexts: text contexts ``[N, L, D]`` of seeds (e.g. ``PairDataModule.contexts``);
            required when the denoiser's network has ``context_dim > 0``.
        batch_size: images per solver call.
        device: where to sample.
    """
    net = getattr(denoiser, "net", denoiser)
    if getattr(net, "context_dim", 0) and contexts is None:
        raise UserError(
            "Sampling a text-conditioned model needs prompts: attach a data module with a "
            "text_encoder (PairDataModule or ImageDataModule with captions)."
        )
    latent = check_latent(denoiser)
    images = []
    for first in range(0, len(seeds), batch_size):
        chunk = list(seeds[first : first + batch_size])
        labels = contexts(chunk) if contexts is not None else None
        x = sampler(denoiser, chunk, shape, labels, device)
        images.append((denoiser.decode(x) if latent else x).clamp(-1, 1))
    return torch.cat(images)
