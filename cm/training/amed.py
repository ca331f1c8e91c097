"""``AMEDModule``: train an AMED predictor against a frozen denoiser (Zhou et al. 2024, Alg. 2)."""

from collections.abc import Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from cm.io import image_spec
from cm.networks.amed import AMEDPredictor
from cm.objectives.amed import AMEDDistillation
from cm.solvers.sampling import SeededNoise, seed_labels
from cm.training.base import GuardedModule, Nonfinite


class AMEDModule(GuardedModule):
    """Fit ``predictor`` so its solver matches a finer teacher, one optimizer step per interval.

    A batch is a batch of noise seeds (``cm.training.SeedDataModule``): the teacher trajectory is
    computed once per batch, then interval ``n = 0 .. N - 2`` takes one Adam step on its own loss,
    as diff-sampler's training loop (so ``global_step`` advances ``N - 1`` per batch). The frozen
    denoiser never trains and never goes into the optimizer; a ``cm.io.PretrainedDenoiser`` also
    stays out of the checkpoint. ``cm sample --solver amed --predictor CKPT`` samples with the
    result on the grid it was trained for.

    Args:
        denoiser: the frozen denoiser, e.g. ``cm.io.PretrainedDenoiser`` or a ``cm.oracle`` one.
        predictor: the ``AMEDPredictor`` to train (it fixes grid, base solver, AFS).
        objective: teacher and loss; default Heun with ``M = 1`` (the paper's CIFAR-10 setting).
        optimizer: optimizer factory over the predictor's parameters (the paper: Adam, lr 5e-3).
        lr_scheduler: optional scheduler factory, stepped after every interval step (the paper:
            none, a constant learning rate).
        image_shape: ``[C, H, W]`` of the noise; default from the denoiser's network or oracle.
        label_dim: one-hot classes drawn as ``seed % label_dim``; default the network's (or 0).
        nonfinite: an interval step with a NaN/Inf loss or gradient: ``"stop"`` ends the run with
            a clear message, ``"skip"`` leaves the predictor and its optimizer state untouched
            (the step still counts), warns and logs ``train/skipped_steps``.
        max_consecutive_skips: under ``nonfinite="skip"``, end the run with an error once this
            many interval steps in a row were skipped.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        predictor: AMEDPredictor,
        objective: AMEDDistillation | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        image_shape: Sequence[int] | None = None,
        label_dim: int | None = None,
        nonfinite: Nonfinite = "stop",
        max_consecutive_skips: int = 10,
    ) -> None:
        super().__init__(nonfinite, max_consecutive_skips)
        self.automatic_optimization = False
        self.denoiser = denoiser.requires_grad_(False).eval()
        self.predictor = predictor
        self.objective = objective if objective is not None else AMEDDistillation()
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        if image_shape and label_dim is not None:  # given: the denoiser need not tell
            self.image_shape, self.label_dim = tuple(image_shape), label_dim
        else:
            shape, classes = image_spec(denoiser)
            self.image_shape = tuple(image_shape) if image_shape else shape
            self.label_dim = classes if label_dim is None else label_dim

    def train(self, mode: bool = True) -> "AMEDModule":
        """Train the predictor; the denoiser stays in eval mode (no dropout)."""
        super().train(mode)
        self.denoiser.eval()
        return self

    def configure_optimizers(self):  # noqa: D102 - Lightning hook
        optimizer = self.optimizer_factory(self.predictor.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        """One teacher trajectory per seed, then one optimizer step per interval."""
        seeds = batch.tolist()
        grid = self.predictor.grid()
        x = SeededNoise(seeds, self.device).randn(self.image_shape) * grid[0].item()
        labels = None
        if self.label_dim:
            labels = seed_labels(seeds, self.label_dim).to(self.device)
        targets = self.objective.targets(self.denoiser, self.predictor, x, labels)
        forcing = self.objective.forcing(self.predictor)
        optimizer, scheduler, hist, total = self.optimizers(), self.lr_schedulers(), [], 0.0
        with self.predictor.watch(self.denoiser) as tap:
            for n, target in enumerate(targets):
                loss, x_next, hist, (r, c, a) = self.objective(
                    self.denoiser, self.predictor, tap, x, n, target, labels, hist
                )
                optimizer.zero_grad()
                self.manual_backward(loss.mean())
                # diff-sampler zeroes NaN gradients; here the nonfinite policy decides, and a
                # skipped step (gradients dropped) still counts but changes nothing.
                self.finite_or_skip(loss.detach(), optimizer)
                optimizer.step()
                if scheduler is not None:  # manual optimization: Lightning does not step it
                    scheduler.step()
                total += loss.mean().item()
                self.log(f"train/loss_{n}", loss.mean(), batch_size=len(seeds))
                self.log(f"train/r_{n}", r.mean(), batch_size=len(seeds))
                x = target if forcing else x_next.detach()
        self.log("train/loss", total, prog_bar=True, batch_size=len(seeds))
        self.log_skipped()
