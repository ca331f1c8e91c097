"""Diffusion2GAN losses (Kang et al. 2024, Sec. 3-4): per-position GAN, lazy R1, mix-and-match.

The generator is a denoiser called once at ``sigma_max``: ``x_hat = G(z * sigma_max, sigma_max,
c)``. It regresses the teacher's ODE endpoint ``x`` for the same ``(z, c)`` (Eq. 2, with LPIPS or
E-LatentLPIPS as the distance) and, with weight ``lambda_GAN``, fools a conditional discriminator
``D(x, z, c)`` (Eq. 5). Discriminators return a list of per-position logit maps
(``cm.networks.ADMDiscriminator``); every loss here is averaged over positions and heads and
returned per sample, ``[N]``.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cm.errors import UserError

Discriminator = Callable[[Tensor, Tensor, Tensor | None], list[Tensor]]


def _per_sample(maps: list[Tensor], fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Mean of ``fn(logits)`` over the positions of each map and over maps: ``[N]``."""
    return torch.stack([fn(m.float()).flatten(1).mean(1) for m in maps]).mean(0)


def generator_gan_loss(fake_logits: list[Tensor]) -> Tensor:
    """Non-saturating generator loss ``softplus(-D(x_hat))`` per position (Kang et al. Eq. 5)."""
    return _per_sample(fake_logits, lambda s: F.softplus(-s))


def discriminator_gan_loss(real_logits: list[Tensor], fake_logits: list[Tensor]) -> Tensor:
    """Discriminator loss ``softplus(-D(x)) + softplus(D(x_hat))`` per position (Eq. 5)."""
    return _per_sample(real_logits, lambda s: F.softplus(-s)) + _per_sample(fake_logits, F.softplus)


def r1_penalty(
    discriminator: Discriminator,
    x: Tensor,
    z: Tensor,
    labels: Tensor | None,
    gamma: float,
    index: int = 0,
) -> Tensor:
    """Single-sample R1, ``gamma / 2 * ||grad_x D(x_i, z_i, c_i)||^2`` (Kang et al. Sec. 4.2).

    Mescheder et al. 2018's R1 on real data, evaluated on one sample of the batch (the paper's
    "single-sample R1" keeps the double backward through a large U-Net affordable); only row
    ``index`` of ``x`` enters the graph. ``D``'s output is summed over positions and heads.

    Args:
        discriminator: ``D(x, z, labels) -> list of logit maps``.
        x: real images ``[N, C, H, W]``.
        z: their noise.
        labels: their one-hot labels or None.
        gamma: the R1 weight.
        index: which sample to penalise.
    """
    x_i = x[index : index + 1].detach().requires_grad_(True)
    labels_i = labels[index : index + 1] if labels is not None else None
    logits = discriminator(x_i, z[index : index + 1], labels_i)
    score = sum(m.float().sum() for m in logits)
    (grad,) = torch.autograd.grad(score, x_i, create_graph=True)
    return 0.5 * gamma * grad.square().sum()


def is_lazy_step(step: int, interval: int) -> bool:
    """Whether ``step`` applies the lazy regulariser (Karras et al. 2020, StyleGAN2 Sec. 3.1)."""
    return interval > 0 and step % interval == 0


def mix_and_match(
    x_real: Tensor,
    x_fake: Tensor,
    z: Tensor,
    labels: Tensor | None,
    fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mix-and-match fakes (Kang et al. 2024, Sec. 4.2): real images with unrelated ``(z, c)``.

    A ``fraction`` of the fake batch is replaced by real images of *other* rows (row ``i`` gets
    ``x_real[(i + s) % N]`` for a random shift ``0 < s < N``) while keeping row ``i``'s noise and
    label, so ``D`` must judge whether an image belongs to its ``(z, c)``, not only realism. All
    rows are labelled fake. Returns the mixed fake images and the boolean mask of replaced rows.

    Args:
        x_real: the teacher's images ``[N, C, H, W]`` paired with ``z``/``labels``.
        x_fake: the generator's images for the same ``z``/``labels``.
        z: the noise (unchanged; returned rows keep their own).
        labels: the labels (unchanged), or None.
        fraction: share of the fake rows to replace, in [0, 1].
        generator: RNG for which rows and which shift; in training the step's shared
            generator (``SampleDraws.shared``) over all ranks' rows, so the choice is a function
            of the global sample index (``Diffusion2GANModule`` gathers the batch).
    """
    if not 0 <= fraction <= 1:
        raise UserError(f"mix_fraction must lie in [0, 1], got {fraction}.")
    n = x_fake.shape[0]
    k = round(fraction * n) if n > 1 else 0
    mask = torch.zeros(n, dtype=torch.bool, device=x_fake.device)
    if k == 0:
        return x_fake, mask
    rows = torch.randperm(n, generator=generator)[:k].to(x_fake.device)
    shift = int(torch.randint(1, n, (), generator=generator))
    mask[rows] = True
    unrelated = x_real.detach().roll(-shift, dims=0)  # row i holds x_real[(i + s) % N]
    mixed = torch.where(mask[:, None, None, None], unrelated.to(x_fake.dtype), x_fake)
    return mixed, mask


def swap_contexts(
    x_real: Tensor,
    x_fake: Tensor,
    labels: Tensor,
    mixed: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Text mix-and-match (Kang et al. 2024, Sec. 4.2): a real image with another row's text.

    Every other row that ``mix_and_match`` replaced (``mixed``) instead keeps its own real image
    and noise and gets the text context of row ``(i + s) % N`` (a random shift ``0 < s < N``),
    so ``D`` must also judge whether an image matches its caption. Those rows are fakes too.
    Returns the fake images and their contexts.

    Args:
        x_real: the teacher's images ``[N, C, H, W]``.
        x_fake: the mix-and-matched fakes.
        labels: the text contexts ``[N, L, D]`` of the rows.
        mixed: boolean ``[N]``, the rows ``mix_and_match`` replaced.
        generator: RNG for the shift (in training, as for ``mix_and_match``).
    """
    n = labels.shape[0]
    rows = mixed.nonzero().flatten()[::2]
    if n < 2 or rows.numel() == 0:
        return x_fake, labels
    shift = int(torch.randint(1, n, (), generator=generator))
    x_fake, contexts = x_fake.clone(), labels.clone()
    x_fake[rows] = x_real[rows].to(x_fake.dtype)
    contexts[rows] = labels[(rows + shift) % n]
    return x_fake, contexts
