"""Preconditioners: wrap an injected raw network ``F`` into a denoiser ``D(x, sigma, labels)``.

``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))`` (Karras et al.
2022, Eq. 7). The network never sees ``sigma``, only ``c_noise``; the scalings are computed in
float32 whatever the autocast dtype of the network.
"""

import torch
from torch import Tensor, nn


def _sigma_column(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``sigma`` as float32 ``[N, 1, 1, 1]`` broadcastable against ``x``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)


class Preconditioner(nn.Module):
    """Base of the EDM-style preconditioners (Karras et al. 2022, Eq. 7).

    Args:
        net: the raw network ``F(x, c_noise, labels)``.
        sigma_data: standard deviation of the data, ``sigma_d``.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(c_skip, c_out, c_in, c_noise)`` for ``sigma`` shaped ``[N, 1, 1, 1]``."""
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` (Karras et al. 2022, Eq. 7)."""
        x = x.to(torch.float32)
        sigma = _sigma_column(sigma, x)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x = self.net(c_in * x, c_noise.flatten(), labels)
        return c_skip * x + c_out * F_x.to(torch.float32)


class EDMPrecond(Preconditioner):
    """Karras et al. 2022, Table 1 ("Ours"): EDM scalings, ``c_noise = noise_scale * ln(sigma)``.

    Args:
        net: the raw network ``F(x, c_noise, labels)``.
        sigma_data: standard deviation of the data, ``sigma_d``.
        noise_scale: 0.25 as EDM; openai/consistency_models' EDM teachers use
            ``1000 * 0.25 * ln(sigma + 1e-44)``, i.e. 250.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, noise_scale: float = 0.25) -> None:
        super().__init__(net, sigma_data)
        self.noise_scale = noise_scale

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """EDM Table 1: ``c_skip, c_out, c_in, c_noise``."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, self.noise_scale * torch.log(sigma + 1e-44)


class ConsistencyPrecond(Preconditioner):
    """Song et al. 2023, Appendix C: consistency parameterization with ``D(x, sigma_min) == x``.

    ``c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)``, ``c_out = sd (sigma - sigma_min) /
    sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)`` and, as openai/consistency_models,
    ``c_noise = 1000 * 0.25 * ln(sigma + 1e-44)``. At ``sigma_min``, ``c_skip`` is exactly 1 and
    ``c_out`` exactly 0, so the boundary condition holds bit for bit.

    Args:
        net: the raw network ``F(x, c_noise, labels)``.
        sigma_data: standard deviation of the data, ``sigma_d``.
        sigma_min: the boundary ``epsilon`` where ``D`` is the identity.
        noise_scale: ``c_noise = noise_scale * ln(sigma)``.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        noise_scale: float = 250.0,
    ) -> None:
        super().__init__(net, sigma_data)
        self.sigma_min, self.noise_scale = sigma_min, noise_scale

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Song et al. 2023, Eq. 7 with Appendix C's choices."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
        c_out = (sigma - self.sigma_min) * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = self.noise_scale * torch.log(sigma + 1e-44)
        return c_skip, c_out, c_in, c_noise
