"""Training objectives ``objective(denoiser, x0, labels, step, total_steps) -> loss[N]``."""

from cm.objectives.amed import AMEDDistillation
from cm.objectives.augment import augment
from cm.objectives.base import Objective, copy_net_weights
from cm.objectives.consistency import ConsistencyObjective, ConsistencyTraining
from cm.objectives.ddpm import DDPMLoss
from cm.objectives.denoising import DenoisingScoreMatching
from cm.objectives.diffusion2gan import (
    discriminator_gan_loss,
    generator_gan_loss,
    is_lazy_step,
    mix_and_match,
    r1_penalty,
)
from cm.objectives.distances import L1, LPIPS, PseudoHuber, SquaredL2
from cm.objectives.distillation import ConsistencyDistillation
from cm.objectives.ect import ConsistencyTuning
from cm.objectives.elatentlpips import ELatentLPIPS
from cm.objectives.meanflow import MeanFlow
from cm.objectives.progressive import ProgressiveDistillation
from cm.objectives.scm import (
    ContinuousConsistency,
    ContinuousConsistencyDistillation,
    ContinuousConsistencyTraining,
)

__all__ = [
    "AMEDDistillation",
    "L1",
    "LPIPS",
    "ConsistencyDistillation",
    "ConsistencyObjective",
    "ConsistencyTraining",
    "ConsistencyTuning",
    "ContinuousConsistency",
    "ContinuousConsistencyDistillation",
    "ContinuousConsistencyTraining",
    "DDPMLoss",
    "DenoisingScoreMatching",
    "ELatentLPIPS",
    "MeanFlow",
    "Objective",
    "ProgressiveDistillation",
    "PseudoHuber",
    "SquaredL2",
    "augment",
    "discriminator_gan_loss",
    "generator_gan_loss",
    "is_lazy_step",
    "mix_and_match",
    "r1_penalty",
    "copy_net_weights",
]
