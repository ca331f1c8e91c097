"""``Diffusion2GANModule``: a one-step conditional GAN distilled from ODE pairs (Kang et al. 2024).

Manual optimization, one generator (G) and one discriminator (D) step per batch of teacher ODE
pairs ``(z, x, c)`` (``cm.training.PairDataModule``):

- G step (Kang et al. 2024, Eq. 2 + Eq. 5): ``x_hat = G(z * sigma_max, sigma_max, c)``,
  ``L_G = d(x_hat, x) + lambda_GAN * softplus(-D(x_hat, z, c))`` with any distance object
  (``cm.objectives.LPIPS``, ``ELatentLPIPS``, ``SquaredL2``, ...); ``lambda_GAN = 0`` is the
  regression-only student ("teacher-free" in the sense that no teacher runs during training).
  The adversarial term starts after ``gan_start`` iterations (GAN warm-up; D trains from the start).
- D step (Sec. 4.2): per-position non-saturating loss on real ``(x, z, c)`` versus fake
  ``(x_hat, z, c)``, a ``mix_fraction`` of whose rows are real images of *other* rows
  (mix-and-match; with text, half of those rows are instead real images with another row's
  caption, ``swap_contexts``), plus single-sample R1 every ``r1_interval`` iterations (lazy,
  scaled by the interval as in StyleGAN2).

Latent text-to-image students (Stable Diffusion, Sec. 5): G is a trainable
``cm.networks.stable_diffusion.StableDiffusionDenoiser`` called once at the highest trained
timestep, ``labels`` are CLIP token embeddings from ``PairDataModule(text_encoder=...)``, the
distance is ``cm.objectives.ELatentLPIPS``, D is ``cm.networks.sd_discriminator.SDDiscriminator``,
and sample grids take the pairs' prompts and are decoded by G's (frozen) VAE.

Lightning traps handled here: ``trainer.global_step`` counts every ``LightningOptimizer.step``;
the D step goes straight through the strategy (precision plugin included) so that
``global_step`` counts G iterations, and ``trainer.max_steps``, ``SampleGrid`` intervals and the
data stream's resume position keep their ``DenoiserModule`` meaning. Lazy R1, EMA and the RNG
use the module's own iteration counter (saved in checkpoints). The D step's own draws (which
rows are mix-and-matched, with which partner, and the R1 sample) are functions of the global
sample index (``SampleDraws``, as every objective's): under DDP each rank sees the whole step's
batch of reals, so ``world_size`` ranks train D as one process with the global batch.
Trainer-level gradient clipping is not allowed with manual optimization: use
``gradient_clip_val`` here. Under DDP G and D are wrapped together and each step leaves the
other's parameters unused, so multi-GPU configs use ``strategy:
ddp_find_unused_parameters_true``. The teacher (a ``cm.io.PretrainedDenoiser``) only
initialises G and D and is never stored.
"""

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.attention import SDPBackend, sdpa_kernel

from cm.data.stream import step_seed
from cm.ema import EMA
from cm.errors import UserError
from cm.objectives.base import SampleDraws, copy_net_weights
from cm.objectives.diffusion2gan import (
    discriminator_gan_loss,
    generator_gan_loss,
    is_lazy_step,
    mix_and_match,
    r1_penalty,
    swap_contexts,
)
from cm.solvers.sampling import Sampler
from cm.training.base import GenerativeModule, Nonfinite


class Diffusion2GANModule(GenerativeModule):
    """Diffusion2GAN training (Kang et al. 2024, Sec. 3-4): regression + conditional GAN.

    Args:
        denoiser: the generator G, a denoiser (e.g. ``cm.precond.EDMPrecond`` around the
            teacher's network) called once at ``sampler``'s ``sigma_max``.
        distance: the regression distance ``d(x_hat, x) -> [N]`` (Eq. 2), e.g.
            ``cm.objectives.LPIPS``, ``cm.objectives.ELatentLPIPS`` or ``cm.objectives.SquaredL2``.
        discriminator: ``D(x, z, labels) -> list of logit maps``, e.g.
            ``cm.networks.ADMDiscriminator``; None (or ``lambda_gan = 0``): regression only.
        teacher: the diffusion teacher whose network initialises G and D (e.g. a
            ``cm.io.PretrainedDenoiser``); None keeps their initialisation.
        init_generator: a denoiser whose network initialises G instead of the teacher's, e.g.
            the regression-only student's checkpoint as a ``cm.io.PretrainedDenoiser``, to
            fine-tune it with the GAN loss (D still starts from the teacher).
        optimizer: G's optimizer factory.
        discriminator_optimizer: D's optimizer factory.
        lambda_gan: weight of G's non-saturating GAN loss (Eq. 5).
        r1_gamma: R1 weight ``gamma``.
        r1_interval: apply R1 every this many iterations (lazy regularisation; 0 disables R1).
        mix_fraction: share of D's fake rows replaced by mismatched real images (mix-and-match).
        gan_start: iterations of pure regression before G gets the GAN loss (warm-up).
        gradient_clip_val: clip each network's gradient norm to this (None: no clipping).
        ema: evaluation EMA of G; None samples with the online weights.
        sampler: how samples are drawn; the default (``cm.solvers.consistency.onestep``) is the
            one-step generator, and its ``sigma_max`` is G's input noise level in training too.
        nonfinite: a G or D step with a NaN/Inf loss or gradient: ``"stop"`` ends the run with
            a clear message, ``"skip"`` leaves that network, its optimizer state and the EMA
            untouched (the step still counts), warns on the console and logs
            ``train/skipped_steps``.
        max_consecutive_skips: under ``nonfinite="skip"``, end the run with an error once this
            many G (or D) steps in a row were skipped (a diverged run does not recover).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        distance: nn.Module,
        discriminator: nn.Module | None = None,
        teacher: nn.Module | None = None,
        init_generator: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        discriminator_optimizer: OptimizerCallable = torch.optim.Adam,
        lambda_gan: float = 0.0,
        r1_gamma: float = 1.0,
        r1_interval: int = 16,
        mix_fraction: float = 0.25,
        gan_start: int = 0,
        gradient_clip_val: float | None = None,
        ema: EMA | None = None,
        sampler: Sampler | None = None,
        nonfinite: Nonfinite = "stop",
        max_consecutive_skips: int = 10,
    ) -> None:
        if lambda_gan < 0 or r1_gamma < 0 or r1_interval < 0 or gan_start < 0:
            raise UserError("lambda_gan, r1_gamma, r1_interval and gan_start must be >= 0.")
        if not 0 <= mix_fraction <= 1:
            raise UserError(f"mix_fraction must lie in [0, 1], got {mix_fraction}.")
        if lambda_gan > 0 and discriminator is None:
            raise UserError("lambda_gan > 0 needs a discriminator (e.g. ADMDiscriminator).")
        if init_generator is not None or teacher is not None:
            copy_net_weights(denoiser, init_generator if init_generator is not None else teacher)
        if teacher is not None and discriminator is not None:
            discriminator.init_from(teacher)
        # G is initialised above, before the base copies it into the EMA.
        super().__init__(denoiser, ema, sampler, nonfinite, max_consecutive_skips)
        self.automatic_optimization = False
        self.distance = distance
        # Without the GAN term the discriminator would never be used: keep it out entirely.
        self.discriminator = discriminator if lambda_gan > 0 else None
        self.optimizer_factory, self.d_optimizer_factory = optimizer, discriminator_optimizer
        self.lambda_gan, self.r1_gamma, self.r1_interval = lambda_gan, r1_gamma, r1_interval
        self.mix_fraction, self.gan_start = mix_fraction, gan_start
        self.gradient_clip_val = gradient_clip_val
        self.iteration = 0
        self.draws = SampleDraws()  # D's mix-and-match rows and R1 sample (global sample index)

    @property
    def sigma_max(self) -> float:
        """G's input noise level: the first sigma of the sampler's grid (``onestep``'s ``T``)."""
        return float(self.sampler.grid(self.denoiser)[0])


    def configure_optimizers(self):  # noqa: D102 - Lightning hook
        opt_g = self.optimizer_factory(self.denoiser.parameters())
        if self.discriminator is None:
            return opt_g
        return [opt_g, self.d_optimizer_factory(self.discriminator.parameters())]

    def _step(self, optimizer, loss: Tensor, count: bool = True) -> bool:
        """Backward, clip and step one optimizer (``count=False``: not in ``global_step``).

        Returns False for a non-finite step under ``nonfinite="skip"``: the gradients are
        dropped, so the optimizer step (still counted) changes no parameter and no moment.
        """
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        finite = self.finite_or_skip(loss.detach(), optimizer)
        if finite and self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, self.gradient_clip_val, "norm")
        if count:
            optimizer.step()
        else:
            # LightningOptimizer.step = count + strategy.optimizer_step; skip the count only.
            self.trainer.strategy.optimizer_step(optimizer.optimizer, lambda: None)
        return finite

    def generator_loss(self, z: Tensor, x: Tensor, labels: Tensor | None) -> tuple[Tensor, ...]:
        """``x_hat`` and ``L_G = d(x_hat, x) + lambda_GAN * L_GAN`` (Kang et al. Eq. 2, 5)."""
        sigma = self.sigma_max
        x_hat = self.denoiser(z * sigma, z.new_full((z.shape[0],), sigma), labels)
        reg = self.distance(x_hat, x).mean()
        adv = torch.zeros((), device=z.device)
        if self.discriminator is not None and self.iteration >= self.gan_start:
            # D's weights get no gradient from G's loss (and stay untouched by G's optimizer).
            self.discriminator.requires_grad_(False)
            adv = generator_gan_loss(self.discriminator(x_hat, z, labels)).mean()
            self.discriminator.requires_grad_(True)
        return x_hat, reg, adv, reg + self.lambda_gan * adv

    def discriminator_loss(
        self, z: Tensor, x: Tensor, x_hat: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """D's GAN loss on real vs. mix-and-matched fakes, and lazy single-sample R1 (Sec. 4.2).

        Mix-and-match and R1 draw over the step's whole batch (all ranks' rows, gathered) from
        ``self.draws``' shared generator, and each rank keeps its rows: the fakes, their partners
        and the R1 sample are those of one process with the global batch. The rank holding the R1
        sample weighs it by ``world_size``, so the ranks' averaged gradient carries it once.
        """
        D, n, gather = self.discriminator, x.shape[0], self._whole_batch
        generator = self.draws.shared()
        x_all, labels_all = gather(x), gather(labels) if labels is not None else None
        fake, mixed = mix_and_match(
            x_all, gather(x_hat.detach()), gather(z), labels_all, self.mix_fraction, generator
        )
        fake_labels = labels_all
        if labels_all is not None and labels_all.ndim == 3:
            fake, fake_labels = swap_contexts(x_all, fake, labels_all, mixed, generator)
        mine = slice(self.draws.offset, self.draws.offset + n)
        fake = fake[mine]
        fake_labels = fake_labels[mine] if fake_labels is not None else None
        real_logits, fake_logits = D(x, z, labels), D(fake, z, fake_labels)
        loss = discriminator_gan_loss(real_logits, fake_logits).mean()
        r1 = torch.zeros((), device=z.device)
        if self.r1_gamma > 0 and is_lazy_step(self.iteration, self.r1_interval):
            index = int(torch.randint(x_all.shape[0], (), generator=generator)) - mine.start
            mine_r1 = 0 <= index < n
            if mine_r1 or is_sharded(D):
                # A sharded D's forward and backward are collectives: every rank runs R1 (on
                # its first row when the sample is another rank's) and only the owner's counts.
                # Lazy: the penalty applied every r1_interval steps carries r1_interval times its
                # weight, so its average strength matches R1 on every step (StyleGAN2, Sec. 3.1).
                # R1 differentiates a gradient: fused attention kernels (flash, memory-efficient;
                # e.g. diffusers' SDPA processor) have no double backward, the math kernel has.
                with sdpa_kernel(SDPBackend.MATH):
                    r1 = r1_penalty(D, x, z, labels, self.r1_gamma, index if mine_r1 else 0)
                r1 = r1 * (self.r1_interval * self._world_size() if mine_r1 else 0.0)
        score = torch.stack([m.mean() for m in real_logits]).mean().detach()
        return loss, r1, score

    def _world_size(self) -> int:
        """The trainer's world size (1 outside a trainer)."""
        return self.trainer.world_size if self._trainer is not None else 1

    def _whole_batch(self, t: Tensor) -> Tensor:
        """All ranks' rows of ``t`` in global order (rank ``r``'s from ``r * n``)."""
        if self._world_size() == 1:
            return t
        return self.all_gather(t).flatten(0, 1)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """One G step, then one D step (when there is a discriminator), on ``(z, x, c)`` pairs."""
        z, x, labels = batch
        labels = labels if labels.numel() > 0 else None
        optimizers = self.optimizers()
        opt_g = optimizers[0] if isinstance(optimizers, list) else optimizers

        x_hat, reg, adv, loss_g = self.generator_loss(z, x, labels)
        if self._step(opt_g, loss_g) and self.ema is not None:
            batch_size = z.shape[0] * self.trainer.world_size
            self.ema.update(self.ema_denoiser, self.denoiser, self.iteration, batch_size)
        logs = {"train/loss": loss_g.detach(), "train/regression": reg.detach()}

        if self.discriminator is not None:
            r1_step = self.r1_gamma > 0 and is_lazy_step(self.iteration, self.r1_interval)
            with kept_gathered(self.discriminator, r1_step):
                loss_d, r1, score = self.discriminator_loss(z, x, x_hat, labels)
                self._step(optimizers[1], loss_d + r1, count=False)
            logs.update({"train/gan_g": adv.detach(), "train/gan_d": loss_d.detach()})
            logs["train/d_real"] = score
            if is_lazy_step(self.iteration, self.r1_interval):
                logs["train/r1"] = r1.detach()
        self.log_skipped()
        self.log("train/loss", logs.pop("train/loss"), prog_bar=True)
        self.log_dict(logs)
        self.iteration += 1

    def on_train_batch_start(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """Key D's draws to the global sample index; seed dropout from ``(seed, iteration, rank)``.

        As ``DenoiserModule``: the draws' seed ``(run seed, iteration)`` is shared by all ranks,
        rank ``r`` holding rows ``[r * n, (r + 1) * n)`` of the step's batch; network dropout
        stays per rank (global RNG). The trailing 1 and 2 keep the streams apart.
        """
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(step_seed(seed, self.iteration, self.global_rank, 1))
        n, world = len(batch[0]), self.trainer.world_size
        self.draws.set(step_seed(seed, self.iteration, 2), self.global_rank * n, n * world)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the iteration counter (lazy R1, EMA, warm-up and RNG depend on it)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["diffusion2gan_iteration"] = self.iteration

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the iteration counter."""
        super().on_load_checkpoint(checkpoint)
        self.iteration = int(checkpoint.get("diffusion2gan_iteration", 0))


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 (``cm.training.FSDP``) sharded any part of ``module``."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


@contextlib.contextmanager
def kept_gathered(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Keep a sharded ``module``'s gathered weights through the block's backward passes.

    R1 (Mescheder et al. 2018) differentiates D's input gradient: its first backward
    (``autograd.grad(create_graph=True)``) would let FSDP2 free the gathered weights that the
    second (the optimizer step's) reads again. Resharding waits for the end of the block.
    """
    units = [m for m in module.modules() if isinstance(m, FSDPModule)] if enabled else []
    for unit in units:
        unit.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_backward(True, recurse=False)
            unit.reshard()
