"""ODE solvers and samplers, each ``fn(denoiser, x, sigmas, labels=None, **options) -> x``."""

from cm.solvers import consistency
from cm.solvers.amed import amed, amed_plugin
from cm.solvers.ancestral import ddim, ddpm
from cm.solvers.flowmap import flowmap
from cm.solvers.multistep import dpmpp_2m, dpmpp_3m, euler_ancestral, ipndm, unipc
from cm.solvers.rk import dpm2, dpm2_step, edm_stochastic, euler, euler_step, heun, heun_step
from cm.solvers.sampling import Sampler, SeededNoise

__all__ = [
    "Sampler",
    "SeededNoise",
    "amed",
    "amed_plugin",
    "consistency",
    "ddim",
    "ddpm",
    "dpm2",
    "dpm2_step",
    "dpmpp_2m",
    "dpmpp_3m",
    "edm_stochastic",
    "euler",
    "euler_ancestral",
    "euler_step",
    "flowmap",
    "heun",
    "heun_step",
    "ipndm",
    "unipc",
]
