"""Training objectives ``objective(denoiser, x0, labels, step, total_steps) -> loss[N]``."""

from cm.objectives.base import Objective
from cm.objectives.consistency import ConsistencyTraining
from cm.objectives.ddpm import DDPMLoss
from cm.objectives.denoising import DenoisingScoreMatching
from cm.objectives.distances import L1, LPIPS, PseudoHuber, SquaredL2

__all__ = [
    "L1",
    "LPIPS",
    "ConsistencyTraining",
    "DDPMLoss",
    "DenoisingScoreMatching",
    "Objective",
    "PseudoHuber",
    "SquaredL2",
]
