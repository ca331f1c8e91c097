"""What every cm LightningModule shares: saved config, the ``nonfinite`` policy, a sampled denoiser.

Three layers, each a plain base class (no method borrowing between regimes):

- ``ConfiguredModule``: the YAML config given to the CLI becomes the checkpoint's hyperparameters
  (the latent-VGG trainers stop here);
- ``GuardedModule``: the ``nonfinite`` policy (skip or stop on a NaN/Inf loss or gradient), with
  its counters saved in checkpoints (``AMEDModule``);
- ``GenerativeModule``: a trained denoiser, its evaluation EMA and sampler, the data checks,
  ``generate`` and ``predict_step`` (``DenoiserModule``, ``Diffusion2GANModule``).
"""

import copy
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from cm.ema import EMA
from cm.errors import UserError
from cm.io import image_spec, to_uint8
from cm.solvers.sampling import Sampler, generate_text_or_latent, is_latent
from cm.training.sharding import FSDP

Nonfinite = Literal["skip", "stop"]


class ConfiguredModule(L.LightningModule):
    """A LightningModule whose CLI config (``class_path``/``init_args``) is its hyperparameters."""

    def __init__(self) -> None:
        super().__init__()
        # Under the CLI Lightning hands us the YAML config as hparams, and `load_from_checkpoint`
        # and `cm sample` rebuild from it; built in Python, the arguments are objects, which must
        # not be pickled into checkpoints (they are read weights_only).
        if _given_hyperparameters.get() is not None:
            self.save_hyperparameters()

    def configure_model(self) -> None:
        """Under ``cm.training.FSDP``, shard the trainable networks; other strategies: nothing."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP):
            self.check_sharding()
            strategy.shard(self)

    def check_sharding(self) -> None:
        """Raise a ``UserError`` if this module cannot train under ``cm.training.FSDP``.

        ``cm fit`` calls it before the ranks start (one error line), ``configure_model`` again.
        """


class GuardedModule(ConfiguredModule):
    """The ``nonfinite`` policy: a step with a NaN/Inf loss or gradient is skipped or stops the run.

    Args:
        nonfinite: ``"stop"`` ends the run with an error (the default: it usually means a
            diverged run, better seen at once); ``"skip"`` drops the step (no parameter, moment or
            EMA update; the step still counts, so curricula and data stay aligned), warns on the
            console and logs ``train/skipped_steps``.
        max_consecutive_skips: under ``nonfinite="skip"``, end the run with an error once this
            many steps of one optimizer in a row were skipped: a run whose weights are already
            NaN or huge never recovers, and would otherwise finish "successfully" with garbage.
    """

    def __init__(self, nonfinite: Nonfinite = "stop", max_consecutive_skips: int = 10) -> None:
        super().__init__()
        if max_consecutive_skips < 1:
            raise UserError(
                f"model.init_args.max_consecutive_skips must be at least 1, got "
                f"{max_consecutive_skips}: use nonfinite=stop to stop at the first non-finite step."
            )
        self.nonfinite, self.max_consecutive_skips = nonfinite, max_consecutive_skips
        self.skipped_steps = 0
        self.skip_streaks: dict[int, int] = {}  # optimizer index -> skips in a row

    def finite_or_skip(self, loss: Tensor | None, optimizer) -> bool:
        """Whether to step ``optimizer``: its loss and gradients are finite on every rank.

        Otherwise the ``nonfinite`` policy applies: ``"stop"`` raises one clear error, ``"skip"``
        drops the gradients (an optimizer step then changes no parameter or moment), counts the
        step, warns on rank zero and ends the run after ``max_consecutive_skips`` in a row.
        """
        streak = self._optimizer_index(optimizer)  # G and D keep separate streaks
        if all_finite(self.trainer, loss, optimizer):
            self.skip_streaks[streak] = 0
            return True
        optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        step = self.global_step
        if self.nonfinite == "stop":
            raise UserError(
                f"Non-finite loss or gradients at step {step}: the run diverged; lower "
                "the learning rate, or set model.init_args.nonfinite=skip to skip such steps."
            )
        self.skip_streaks[streak] = run = self.skip_streaks.get(streak, 0) + 1
        limit = self.max_consecutive_skips
        if run >= limit:
            raise UserError(
                f"Non-finite loss or gradients in {run} steps in a row (up to step {step}; "
                f"model.init_args.max_consecutive_skips={limit}): the run diverged and skipping "
                "cannot recover it; lower the learning rate or resume from an earlier checkpoint."
            )
        rank_zero_warn(
            f"Step {step}: non-finite loss or gradients, step skipped (nonfinite=skip; "
            f"{self.skipped_steps} skipped in all, {run} in a row, the run stops at {limit}).",
            category=NonFiniteStepWarning,
        )
        return False

    def _optimizer_index(self, optimizer) -> int:
        """The optimizer's position in ``trainer.optimizers``: a key that survives a resume."""
        raw = getattr(optimizer, "optimizer", optimizer)
        return next((i for i, o in enumerate(self.trainer.optimizers) if o is raw), 0)

    def log_skipped(self) -> None:
        """Log ``train/skipped_steps`` under ``nonfinite="skip"``."""
        if self.nonfinite == "skip":
            self.log("train/skipped_steps", float(self.skipped_steps))

    def on_train_end(self) -> None:
        """Say on the console how many steps ``nonfinite="skip"`` dropped in this run."""
        if self.skipped_steps:
            rank_zero_warn(
                f"{self.skipped_steps} optimizer step(s) in {self.global_step} training steps "
                "were skipped for non-finite loss or gradients (nonfinite=skip): check the run "
                "before using it.",
                category=NonFiniteStepWarning,
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the skip counters (total and the current streaks) across resumes."""
        checkpoint["nonfinite_skipped_steps"] = self.skipped_steps
        checkpoint["nonfinite_skip_streaks"] = dict(self.skip_streaks)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the skip counters (0 for checkpoints written before they existed)."""
        self.skipped_steps = int(checkpoint.get("nonfinite_skipped_steps", 0))
        streaks = checkpoint.get("nonfinite_skip_streaks", {})
        self.skip_streaks = {int(k): int(v) for k, v in streaks.items()}


class NonFiniteStepWarning(UserWarning):
    """A training step was skipped for a NaN/Inf loss or gradient (``nonfinite="skip"``)."""


def all_finite(trainer: L.Trainer, loss: Tensor | None, optimizer) -> bool:
    """Whether ``loss`` and the gradients of ``optimizer``'s parameters are finite on every rank.

    One all-reduced flag, so all ranks take the same decision. Under a 16-bit ``GradScaler`` the
    scaler owns this decision (it skips the step and lowers the scale): True.
    """
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        return True
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    finite = loss is None or bool(torch.isfinite(loss).all())
    if finite and grads:
        finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
    return trainer.strategy.reduce_boolean_decision(finite, all=True)


class GenerativeModule(GuardedModule):
    """A trained denoiser ``D(x, sigma, labels)`` sampled with its EMA copy.

    The evaluation EMA covers the denoiser alone (never teachers, discriminators or metric
    networks) and lives in the checkpoint as ``ema_denoiser``.

    Args:
        denoiser: the trained denoiser (copied by the EMA as it is now: initialise it first).
        ema: evaluation EMA; None samples with the online weights.
        sampler: how samples are drawn (solver, steps) by callbacks, ``predict`` and
            ``cm sample``.
        nonfinite: see ``GuardedModule``.
        max_consecutive_skips: see ``GuardedModule``.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        ema: EMA | None = None,
        sampler: Sampler | None = None,
        nonfinite: Nonfinite = "stop",
        max_consecutive_skips: int = 10,
    ) -> None:
        super().__init__(nonfinite, max_consecutive_skips)
        self.denoiser = denoiser
        self.ema = ema
        self.ema_denoiser = None
        if ema is not None:
            self.ema_denoiser = copy.deepcopy(denoiser).requires_grad_(False)
        self.sampler = sampler if sampler is not None else Sampler()

    def check_sharding(self) -> None:
        """Sampling under ``cm.training.FSDP`` needs the EMA copy (see ``ConfiguredModule``).

        The EMA stays replicated, so rank 0 alone can sample grids and ranks can sample unequal
        seed shares; the sharded online denoiser can only run on all ranks at once.
        """
        if self.ema_denoiser is None:
            raise UserError(
                "cm.training.FSDP samples with the replicated EMA copy, and this "
                f"{type(self).__name__} has none: set model.init_args.ema (e.g. "
                "{class_path: cm.ema.EMA, init_args: {decay: 0.0}} keeps a copy of the online "
                "weights), or train with trainer.strategy=ddp."
            )
        super().check_sharding()

    @property
    def eval_denoiser(self) -> nn.Module:
        """The denoiser used for sampling: the EMA copy when there is one."""
        return self.ema_denoiser if self.ema_denoiser is not None else self.denoiser

    @property
    def net(self) -> nn.Module:
        """The raw network behind the preconditioner (or the denoiser itself)."""
        return getattr(self.denoiser, "net", self.denoiser)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of generated images, from the data when attached, else the network."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "resolution"):
            return (dm.channels, dm.resolution, dm.resolution)
        return image_spec(self.denoiser)[0]

    @property
    def label_dim(self) -> int:
        """Number of classes the denoiser is conditioned on (0: unconditional)."""
        return int(getattr(self.net, "label_dim", 0))

    def setup(self, stage: str) -> None:
        """Check that data and network agree on resolution, channels and labels.

        For VAE latents (``cm.data.Latents``) the resolution and channels are the latents', and
        the denoiser must hold a VAE of the same latent scaling to decode its samples.
        """
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "resolution"):
            return
        vae = getattr(dm, "vae", None)
        if vae is not None:
            _check_latent_denoiser(self.denoiser, vae)
        checks = [
            ("resolution", dm.resolution, getattr(self.net, "img_resolution", dm.resolution)),
            ("channels", dm.channels, getattr(self.net, "in_channels", dm.channels)),
            ("label_dim", dm.label_dim, getattr(self.net, "label_dim", dm.label_dim)),
        ]
        for name, data_value, net_value in checks:
            if data_value != net_value:
                data = "The data"
                hint = _DATA_KEYS[name]
                if vae is not None and name != "label_dim":
                    data = f"The latent data (cm.data.Latents, through the VAE at '{vae.path}')"
                    hint = _LATENT_KEYS[name].format(side=data_value * vae.downsample, vae=vae)
                raise UserError(
                    f"{data} has {name} {data_value} but the network has {name} {net_value}: "
                    f"set model.init_args.denoiser.init_args.net.init_args.{_NET_KEYS[name]} to "
                    f"{data_value}{hint}."
                )

    @torch.no_grad()
    def generate(
        self,
        seeds: Sequence[int],
        class_label: int | None = None,
        sampler: Sampler | None = None,
        batch_size: int = 256,
    ) -> tuple[Tensor, Tensor | None]:
        """EMA-denoiser images in ``[-1, 1]`` for ``seeds`` (per-seed deterministic), classes.

        A text model (``context_dim > 0``) takes seed ``s``'s prompt from the attached data module
        (``contexts``: ``ImageDataModule`` with captions, ``PairDataModule`` of text pairs) and
        returns no class labels; a latent model (``cm.solvers.sampling.is_latent``: one holding a
        VAE, e.g. ``StableDiffusionDenoiser`` or a preconditioner given ``vae``) samples latents
        and returns them decoded into pixels by its VAE.
        """
        denoiser = self.eval_denoiser
        was_training = denoiser.training
        denoiser.eval()
        sampler = sampler or self.sampler
        if getattr(self.net, "context_dim", 0):
            dm = self.trainer.datamodule if self._trainer is not None else None
            contexts = getattr(dm, "contexts", None)
            images = generate_text_or_latent(
                sampler, denoiser, seeds, self.image_shape, contexts, batch_size, self.device
            )
            out = (images, None)
        else:
            out = sampler.generate(
                denoiser,
                seeds,
                self.image_shape,
                self.label_dim,
                class_label,
                batch_size,
                self.device,
            )
        denoiser.train(was_training)
        return out

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Generate uint8 NHWC images for a batch of integer seeds."""
        return to_uint8(self.generate(batch.tolist())[0])


_NET_KEYS = {"resolution": "img_resolution", "channels": "in_channels", "label_dim": "label_dim"}
# What changes the data's side of each check (ImageDataModule has no label_dim option: labels
# come from the dataset, and use_labels=false drops them).
_DATA_KEYS = {
    "resolution": " or data.init_args.resolution to match",
    "channels": " (and out_channels; a folder's channels are its images')",
    "label_dim": ", or data.init_args.use_labels to false for an unconditional model",
}
_LATENT_KEYS = {
    "resolution": " (images of {side} px through a VAE that downsamples {vae.downsample}x)",
    "channels": " (and out_channels: the VAE's latent_channels)",
}


def _check_latent_denoiser(denoiser: nn.Module, vae: nn.Module) -> None:
    """A denoiser trained on the latents of ``vae`` must decode through a VAE of its scaling."""
    own = getattr(denoiser, "vae", None)
    if not is_latent(denoiser) or own is None:
        raise UserError(
            f"The data are VAE latents (cm.data.Latents) but the denoiser has no VAE to decode "
            f"its samples: set model.init_args.denoiser.init_args.vae to the data's VAE "
            f"({{class_path: cm.vae.VAE, init_args: {{path: {vae.path}}}}})."
        )
    ours, theirs = (own.scaling_factor, own.shift_factor), (vae.scaling_factor, vae.shift_factor)
    if ours != theirs:
        raise UserError(
            f"The denoiser's VAE scales latents by (scaling_factor, shift_factor) = {ours} but "
            f"the data's VAE by {theirs}: give both VAEs the same factors."
        )
