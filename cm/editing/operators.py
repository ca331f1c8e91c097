"""Orthogonal transforms ``A`` and masks ``Omega`` for zero-shot editing (Song et al. 2023, Alg. 4).

Every operator keeps the coordinates of ``A y`` where ``Omega == 0`` and lets the model generate
those where ``Omega == 1``:
``replace(y, x) = A^{-1}[(A y) * (1 - Omega) + (A x) * Omega]``. ``A`` is orthogonal, so
``A^{-1} = A^T``. The matrices follow openai/consistency_models ``cm/karras_diffusion.py``
(``iterative_colorization``, ``iterative_superres``).
"""

from typing import Literal

import torch
from torch import Tensor

from cm.errors import UserError

# ITU-R 601 luma weights, as in openai/consistency_models' iterative_colorization.
LUMA = (0.2989, 0.5870, 0.1140)
MaskName = Literal["left", "right", "top", "bottom", "center"]


def qr_basis(first: Tensor) -> Tensor:
    """Song et al. 2023, App. D: orthogonal ``Q`` whose first column is ``first / |first|``.

    QR of the identity with its first column replaced by the unit vector; the sign is flipped
    when the first column comes out negative (openai's ``obtain_orthogonal_matrix``).

    Args:
        first: the direction of the kept coordinate, ``[d]``.
    """
    v = first.to(torch.float64) / first.to(torch.float64).norm()
    m = torch.eye(len(v), dtype=torch.float64)
    m[:, 0] = v
    q = torch.linalg.qr(m).Q
    return -q if q[:, 0].sum() < 0 else q


def colorization_matrix() -> Tensor:
    """Song et al. 2023, App. D (colorization): ``Q [3, 3]``, ``Q[:, 0] = w / |w|`` (w: luma)."""
    return qr_basis(torch.tensor(LUMA, dtype=torch.float64))


def superres_matrix(patch: int) -> Tensor:
    """Song et al. 2023, App. D (super-resolution): ``Q [p^2, p^2]`` with ``Q[:, 0] = 1 / p``."""
    return qr_basis(torch.ones(patch * patch, dtype=torch.float64))


class Operator:
    """Song et al. 2023, Alg. 4: an orthogonal ``A`` and a mask ``Omega`` (1 = generated)."""

    def A(self, x: Tensor) -> Tensor:
        """The coordinates ``A x``."""
        raise NotImplementedError

    def A_inv(self, z: Tensor) -> Tensor:
        """``A^{-1} z = A^T z`` (``A`` is orthogonal)."""
        raise NotImplementedError

    def omega(self, z: Tensor) -> Tensor:
        """The mask ``Omega`` broadcastable to the coordinates ``z = A x``; 1 = generated."""
        raise NotImplementedError

    def replace(self, y: Tensor, x: Tensor) -> Tensor:
        """Song et al. 2023, Alg. 4 line 9: ``A^{-1}[(A y)(1 - Omega) + (A x) Omega]``."""
        ay, ax = self.A(y), self.A(x)
        omega = self.omega(ay).to(ay.dtype)
        return self.A_inv(ay * (1 - omega) + ax * omega)

    def project(self, y: Tensor) -> Tensor:
        """Song et al. 2023, Alg. 4 line 2: the kept part ``A^{-1}[(A y)(1 - Omega)]`` of ``y``."""
        return self.replace(y, torch.zeros_like(y))


class Inpaint(Operator):
    """Song et al. 2023, Sec. 6.1 (inpainting): ``A = I``; ``Omega`` marks the pixels to fill.

    Args:
        omega: 1 where pixels are generated, 0 where ``y`` is kept; ``[H, W]``, ``[1 or C, H, W]``
            or ``[N, 1 or C, H, W]``.
    """

    def __init__(self, omega: Tensor) -> None:
        while omega.ndim < 4:
            omega = omega.unsqueeze(0)
        self.mask = omega

    def A(self, x: Tensor) -> Tensor:
        """``A = I``."""
        return x

    def A_inv(self, z: Tensor) -> Tensor:
        """``A^{-1} = I``."""
        return z

    def omega(self, z: Tensor) -> Tensor:
        """The pixel mask on ``z``'s device."""
        return self.mask.to(z.device)


class Colorize(Operator):
    """Song et al. 2023, App. D (colorization): per pixel ``A = Q^T`` on channels; keep the luma.

    The first coordinate of ``Q^T x`` is ``w . x / |w|`` (luma up to a constant) and is kept;
    the two chroma coordinates are generated. Needs 3 channels.
    """

    def __init__(self) -> None:
        self.Q = colorization_matrix()

    def A(self, x: Tensor) -> Tensor:
        """``[N, 3, H, W] -> [N, 3, H, W]`` coordinates ``Q^T x`` per pixel."""
        return torch.einsum("nchw,cd->ndhw", x, self.Q.to(x))

    def A_inv(self, z: Tensor) -> Tensor:
        """``Q z`` per pixel."""
        return torch.einsum("ndhw,cd->nchw", z, self.Q.to(z))

    def omega(self, z: Tensor) -> Tensor:
        """0 on the luma coordinate, 1 on the two others, ``[1, 3, 1, 1]``."""
        omega = torch.ones(1, 3, 1, 1, device=z.device)
        omega[:, 0] = 0
        return omega


class SuperRes(Operator):
    """Song et al. 2023, App. D (super-resolution): per ``p x p`` patch ``A = Q^T``; keep the means.

    The first coordinate of each patch is ``p * mean(patch)`` and is kept (the low-resolution
    image); the other ``p^2 - 1`` are generated. Each channel is treated on its own.

    Args:
        patch: the upsampling factor ``p`` (image sides must be multiples of it).
    """

    def __init__(self, patch: int) -> None:
        if patch < 1:
            raise UserError(f"The super-resolution patch must be >= 1, got {patch}.")
        self.patch = patch
        self.Q = superres_matrix(patch)

    def patches(self, x: Tensor) -> Tensor:
        """``[N, C, H, W] -> [N, C, H/p * W/p, p^2]`` (patches in row-major order)."""
        n, c, h, w = x.shape
        p = self.patch
        if h % p or w % p:
            raise UserError(f"Image sides {h}x{w} are not multiples of the patch size {p}.")
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5)
        return x.reshape(n, c, (h // p) * (w // p), p * p)

    def unpatch(self, z: Tensor, h: int, w: int) -> Tensor:
        """Inverse of :meth:`patches` for an ``h x w`` image."""
        n, c = z.shape[:2]
        p = self.patch
        z = z.reshape(n, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5)
        return z.reshape(n, c, h, w)

    def A(self, x: Tensor) -> Tensor:
        """``[N, C, H, W] -> [N, C, H, W]``: ``Q^T`` of each patch, laid out as the patch."""
        z = torch.einsum("ncld,de->ncle", self.patches(x), self.Q.to(x))
        return self.unpatch(z, *x.shape[-2:])

    def A_inv(self, z: Tensor) -> Tensor:
        """``Q`` of each patch."""
        x = torch.einsum("ncle,de->ncld", self.patches(z), self.Q.to(z))
        return self.unpatch(x, *z.shape[-2:])

    def omega(self, z: Tensor) -> Tensor:
        """0 on the first coordinate of each patch (its top-left slot), 1 elsewhere."""
        omega = torch.ones(1, 1, self.patch, self.patch, device=z.device)
        omega[..., 0, 0] = 0
        return omega.repeat(1, 1, z.shape[-2] // self.patch, z.shape[-1] // self.patch)


def half_mask(name: MaskName, size: int) -> Tensor:
    """A ``[size, size]`` mask ``Omega`` (1 = generated) of a named region: a half or the center."""
    omega = torch.zeros(size, size)
    half = size // 2
    match name:
        case "left":
            omega[:, :half] = 1
        case "right":
            omega[:, half:] = 1
        case "top":
            omega[:half] = 1
        case "bottom":
            omega[half:] = 1
        case "center":
            q = size // 4
            omega[q : size - q, q : size - q] = 1
    return omega


def dense(operator: Operator, shape: tuple[int, ...]) -> Tensor:
    """The matrix ``A [D, D]`` of ``operator`` on images of ``shape = (C, H, W)`` (for tests)."""
    d = int(torch.tensor(shape).prod())
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    return operator.A(basis).reshape(d, d).T  # column j = A e_j
