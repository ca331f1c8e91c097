"""ODE solvers and samplers, each ``fn(denoiser, x, sigmas, labels=None, **options) -> x``."""

from cm.solvers import consistency
from cm.solvers.ancestral import ddim, ddpm
from cm.solvers.rk import euler, euler_step, heun, heun_step
from cm.solvers.sampling import Sampler, SeededNoise

__all__ = [
    "Sampler",
    "SeededNoise",
    "consistency",
    "ddim",
    "ddpm",
    "euler",
    "euler_step",
    "heun",
    "heun_step",
]
