"""Zero-shot image editing with consistency models and diffusion models (Song et al. 2023, Alg. 4).

Inpainting, colorization and super-resolution replace the known coordinates ``A y`` after every
denoising step; SDEdit and denoising start the sampler from an image at a given sigma;
interpolation slerps two noises. See :func:`cm.editing.loop.edit`.
"""

from cm.editing.loop import ODEConsistency, Replaced, edit, interpolation_alphas, slerp, start
from cm.editing.operators import (
    Colorize,
    Inpaint,
    Operator,
    SuperRes,
    colorization_matrix,
    dense,
    half_mask,
    qr_basis,
    superres_matrix,
)

__all__ = [
    "Colorize",
    "Inpaint",
    "ODEConsistency",
    "Operator",
    "Replaced",
    "SuperRes",
    "colorization_matrix",
    "dense",
    "edit",
    "half_mask",
    "interpolation_alphas",
    "qr_basis",
    "slerp",
    "start",
    "superres_matrix",
]
