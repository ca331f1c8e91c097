"""Exact denoisers: isotropic Gaussian mixtures and finite point sets (EDM's "ideal denoiser").

With ``x = y + sigma * n`` the MMSE denoiser ``D(x; sigma) = E[y | x]`` has a closed form for these
distributions (Karras et al. 2022, Eq. 2-3 and Appendix B.3). All arithmetic is float64; results are
cast back to the input dtype. These are the ground truth for solver and objective tests.
"""

import math

import torch
from torch import Tensor, nn

from cm.errors import UserError


def _as_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast ``sigma`` to ``[N, 1]`` float64 on ``x``'s device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    return sigma.reshape(-1, 1).expand(x.shape[0], 1)


class GaussianMixture(nn.Module):
    """Isotropic Gaussian mixture ``sum_k w_k N(m_k, s_k^2 I)`` with its exact denoiser.

    Args:
        means: component means, ``[K, C, H, W]``.
        stds: per-component standard deviations ``s_k``, ``[K]``.
        weights: mixture weights ``w_k`` (normalised here), ``[K]``; uniform if None.
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1).expand(means.shape[0])
        if weights is None:
            weights = torch.ones(means.shape[0], dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        self.register_buffer("means", means)
        self.register_buffer("stds", stds.clone())
        self.register_buffer("weights", weights / weights.sum())

    @classmethod
    def random(
        cls,
        num_components: int = 10,
        shape: tuple[int, int, int] = (1, 8, 8),
        std: float = 0.1,
        seed: int = 0,
    ) -> "GaussianMixture":
        """Components with means uniform in [-0.8, 0.8] and a shared std (fixed by ``seed``)."""
        g = torch.Generator().manual_seed(seed)
        means = torch.rand((num_components, *shape), generator=g, dtype=torch.float64) * 1.6 - 0.8
        return cls(means, torch.full((num_components,), std, dtype=torch.float64))

    @property
    def num_components(self) -> int:
        """Number of components K."""
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples ``y`` (float64 ``[n, C, H, W]``) and their components ``[n]``."""
        k = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.means.shape[1:]), generator=generator, dtype=torch.float64)
        y = self.means.cpu()[k] + self.stds.cpu()[k].view(-1, 1, 1, 1) * noise
        return y.to(self.means.device), k.to(self.means.device)

    def log_responsibilities(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """``log p(k | x; sigma)`` for ``x ~ sum_k w_k N(m_k, (s_k^2 + sigma^2) I)``, ``[N, K]``."""
        x64 = x.to(torch.float64).flatten(1)
        var = self.stds.pow(2).unsqueeze(0) + _as_sigma(sigma, x).pow(2)  # [N, K]
        d = x64.shape[1]
        sq = torch.cdist(x64, self.means.flatten(1)).pow(2)  # [N, K]
        logp = self.weights.log() - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
        return logp - logp.logsumexp(dim=1, keepdim=True)

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """Exact ``E[y | x]``; with one-hot ``labels`` it conditions on the component."""
        sigma64 = _as_sigma(sigma, x)  # [N, 1]
        logr = self.log_responsibilities(x, sigma)
        if labels is not None:
            logr = torch.where(labels.to(x.device) > 0, logr, torch.full_like(logr, -math.inf))
            logr = logr - logr.logsumexp(dim=1, keepdim=True)
        x64 = x.to(torch.float64).flatten(1)
        var_y = self.stds.pow(2).unsqueeze(0)  # [1, K]
        shrink = var_y / (var_y + sigma64.pow(2))  # [N, K]: s_k^2 / (s_k^2 + sigma^2)
        m = self.means.flatten(1)  # [K, D]
        # E[y | x, k] = m_k + shrink_k (x - m_k); average over k with the responsibilities.
        r = logr.exp()
        D_x = (r * (1 - shrink)) @ m + (r * shrink).sum(1, keepdim=True) * x64
        return D_x.reshape(x.shape).to(x.dtype)

    def flow(self, x: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        """Exact PF-ODE map ``x(sigma_from) -> x(sigma_to)`` (single component only).

        For ``N(m, s^2 I)`` the ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` gives
        ``x(t) = m + (x(t0) - m) sqrt((s^2 + t^2) / (s^2 + t0^2))``.
        """
        if self.num_components != 1:
            raise UserError("GaussianMixture.flow is exact only for one component; use K=1.")
        s2 = self.stds[0] ** 2
        scale = torch.sqrt((s2 + sigma_to**2) / (s2 + sigma_from**2))
        m = self.means[0].to(x.device)
        return (m + (x.to(torch.float64) - m) * scale).to(x.dtype)


class RandomGaussianMixture(GaussianMixture):
    """Karras et al. 2022, Eq. 2-3: the exact denoiser of ``dataset: mixture``, built from YAML.

    Equal to ``cm.data.MixtureDataset(...).mixture`` (and ``ImageDataModule("mixture", ...)``) for
    the same arguments; it conditions on one-hot component labels like ``GaussianMixture``.

    Args:
        num_components: mixture components K (the classes of the data).
        resolution: image height and width.
        channels: image channels.
        std: standard deviation of every component.
        seed: fixes the means (uniform in [-0.8, 0.8]).
    """

    def __init__(
        self,
        num_components: int = 10,
        resolution: int = 8,
        channels: int = 1,
        std: float = 0.1,
        seed: int = 0,
    ) -> None:
        gm = GaussianMixture.random(num_components, (channels, resolution, resolution), std, seed)
        super().__init__(gm.means, gm.stds, gm.weights)


class PointSetDenoiser(nn.Module):
    """EDM's ideal denoiser for a finite data set ``{y_i}`` (Karras et al. 2022, Eq. 57).

    ``D(x; sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i``.

    Args:
        points: the data set, ``[M, C, H, W]``.
        labels: optional one-hot labels of the points, ``[M, L]``; when given at call time only
            points of the requested class count.
    """

    def __init__(self, points: Tensor, labels: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("points", torch.as_tensor(points, dtype=torch.float64))
        self.register_buffer("point_labels", None if labels is None else labels.argmax(1))

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """Exact ``E[y | x]`` under the empirical distribution of the points."""
        x64 = x.to(torch.float64).flatten(1)
        y = self.points.flatten(1)
        logits = -torch.cdist(x64, y).pow(2) / (2 * _as_sigma(sigma, x).pow(2))  # [N, M]
        if labels is not None and self.point_labels is not None:
            same = labels.argmax(1).unsqueeze(1) == self.point_labels.unsqueeze(0)
            logits = torch.where(same, logits, torch.full_like(logits, -math.inf))
        return (logits.softmax(1) @ y).reshape(x.shape).to(x.dtype)
