"""Preconditioners: wrap an injected raw network ``F`` into a denoiser ``D(x, sigma, labels)``.

``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))`` (Karras et al.
2022, Eq. 7). The network never sees ``sigma``, only ``c_noise``; the scalings are computed in
float32 whatever the autocast dtype of the network.

A preconditioner given a ``vae`` (``cm.vae.VAE``) is a latent model (Rombach et al. 2022): it
denoises scaled VAE latents, and its samples are decoded into pixels through the VAE, which it
holds outside its module tree (``cm.vae.LatentSpace``: not in checkpoints or exports).
"""

from typing import Literal

import torch
from torch import Tensor, nn

from cm.schedules import fm_time, vp_betas, vp_sigmas
from cm.vae import VAE, LatentSpace


def _sigma_column(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``sigma`` as float32 (float64 for float64 ``x``) ``[N, 1, 1, 1]`` broadcastable on ``x``."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    sigma = torch.as_tensor(sigma, device=x.device).to(dtype)
    return sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)


class Preconditioner(LatentSpace, nn.Module):
    """Base of the EDM-style preconditioners (Karras et al. 2022, Eq. 7).

    Args:
        net: the raw network ``F(x, c_noise, labels)``.
        sigma_data: standard deviation of the data, ``sigma_d``.
        vae: the VAE of a latent model (its samples are decoded through it); None: pixels.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, vae: VAE | None = None) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data
        self.set_vae(vae)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(c_skip, c_out, c_in, c_noise)`` for ``sigma`` shaped ``[N, 1, 1, 1]``."""
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` (Karras et al. 2022, Eq. 7)."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # float32, or float64 in tests
        sigma = _sigma_column(sigma, x)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x = self.net(c_in * x, c_noise.flatten(), labels)
        return c_skip * x + c_out * F_x.to(x.dtype)


class EDMPrecond(Preconditioner):
    """Karras et al. 2022, Table 1 ("Ours"): EDM scalings, ``c_noise = noise_scale * ln(sigma)``.

    Args:
        net: the raw network ``F(x, c_noise, labels)``.
        sigma_data: standard deviation of the data, ``sigma_d``.
        noise_scale: 0.25 as EDM; openai/consistency_models' EDM teachers use
            ``1000 * 0.25 * ln(sigma + 1e-44)``, i.e. 250.
        vae: the VAE of a latent model (``cm.vae.VAE``); None: a pixel-space model.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        noise_scale: float = 0.25,
        vae: VAE | None = None,
    ) -> None:
        super().__init__(net, sigma_data, vae)
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
        vae: the VAE of a latent model (``cm.vae.VAE``); None: a pixel-space model.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        noise_scale: float = 250.0,
        vae: VAE | None = None,
    ) -> None:
        super().__init__(net, sigma_data, vae)
        self.sigma_min, self.noise_scale = sigma_min, noise_scale

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Song et al. 2023, Eq. 7 with Appendix C's choices."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
        c_out = (sigma - self.sigma_min) * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = self.noise_scale * torch.log(sigma + 1e-44)
        return c_skip, c_out, c_in, c_noise


class TrigFlowPrecond(Preconditioner):
    """Lu & Song 2024, Eq. 3-4 (sCM): ``f = cos t x_t - sin t sigma_d F(x_t / sigma_d, t)``.

    TrigFlow's ``x_t = cos t x0 + sin t z`` (``z ~ N(0, sigma_d^2 I)``) is EDM's
    ``x = x0 + sigma n`` with ``sigma = sigma_d tan t``, scaled by ``cos t``; in EDM's variables
    the sCM parameterization is EDM's ``c_skip, c_in`` with ``c_out`` negated and ``c_noise = t``:
    ``D(x; sigma) = f(cos t x, t)``. ``sigma_d F`` is the predicted PF-ODE velocity ``dx_t/dt``,
    so a TrigFlow diffusion model trains with ``DenoisingScoreMatching`` (EDM's weighting makes it
    the v-prediction loss ``||F - (dx_t/dt) / sigma_d||^2``). At ``sigma = 0`` (``t = 0``)
    ``c_skip`` is exactly 1 and ``c_out`` exactly 0, so ``D(x, 0) == x`` bit for bit.

    Args:
        net: the raw network ``F(x, c_noise, labels)``.
        sigma_data: standard deviation of the data, ``sigma_d``.
        noise_scale: ``c_noise = noise_scale * t``, ``t`` in ``[0, pi/2]``: 1 as the paper
            (positional embeddings, or Fourier ones with a small scale, see ``cm.networks``).
        vae: the VAE of a latent model (``cm.vae.VAE``); None: a pixel-space model.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        noise_scale: float = 1.0,
        vae: VAE | None = None,
    ) -> None:
        super().__init__(net, sigma_data, vae)
        self.noise_scale = noise_scale

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``c_skip = cos^2 t``, ``c_out = -sigma_d sin t``, ``c_in = cos t / sigma_d``, ``t``."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = -sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        t = trigflow_time(sigma, self.sigma_data)
        return c_skip, c_out, c_in, self.noise_scale * t


class FlowMatchingPrecond(Preconditioner):
    """Lipman et al. 2023; Ma et al. 2024 (SiT): a velocity model of ``z_t = (1 - t) x0 + t eps``.

    Flow matching is EDM's ``x = x0 + sigma n`` with ``sigma = t / (1 - t)``, scaled by
    ``1 - t = 1 / (1 + sigma)`` (``cm.schedules.fm_time``); the network predicts the velocity
    ``v = eps - x0`` of ``z_t = x / (1 + sigma)``, so ``D(x; sigma) = z_t - t v``: ``c_skip =
    c_in = 1 / (1 + sigma)``, ``c_out = -sigma / (1 + sigma)``, ``c_noise = noise_scale t``. Then
    ``||D - x0||^2 = t^2 ||v - (eps - x0)||^2``: ``DenoisingScoreMatching`` trains it with EDM's
    weighting. ``D(x, 0) == x`` exactly. A SiT or any flow-matching checkpoint samples with every
    ``cm.solvers`` ODE solver through it.

    Args:
        net: the raw network ``v(z, c_noise, labels)``.
        sigma_data: standard deviation of the data, ``sigma_d`` (for the objectives).
        noise_scale: ``c_noise = noise_scale t``, ``t`` in ``[0, 1]``: 1000 as SiT's timestep
            embedder, 1 for the raw ``t``.
        vae: the VAE of a latent model (``cm.vae.VAE``); None: a pixel-space model.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        noise_scale: float = 1000.0,
        vae: VAE | None = None,
    ) -> None:
        super().__init__(net, sigma_data, vae)
        self.noise_scale = noise_scale

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``c_skip = c_in = 1 - t``, ``c_out = -t``, ``c_noise = noise_scale t``."""
        one_minus_t = 1 / (1 + sigma)
        t = fm_time(sigma)
        return one_minus_t, -t, one_minus_t, self.noise_scale * t


def trigflow_time(sigma: Tensor, sigma_data: float) -> Tensor:
    """Lu & Song 2024, Sec. 2.2: TrigFlow's ``t = arctan(sigma / sigma_d)`` of EDM's ``sigma``."""
    return torch.atan2(sigma, torch.full_like(sigma, sigma_data))


def trigflow_flow(
    denoiser: nn.Module, x_t: Tensor, t: Tensor, labels: Tensor | None, sigma_data: float
) -> Tensor:
    """``F(x_t, t)`` of any denoiser: ``sigma_d F = (cos t x_t - D(x_t / cos t; sigma)) / sin t``.

    Lu & Song 2024, Eq. 4 solved for ``F``: the denoiser's ``f(x_t, t) = D(x_t / cos t; sigma)``
    with ``sigma = sigma_d tan t``, in TrigFlow's variables (FastGen wraps EDM networks the same
    way). For a ``Preconditioner`` the division is done on the float64 scalings, not on ``D``:
    ``F = (cos^2 t - c_skip) / (sigma_d sin t cos t) x_t - c_out / (sigma_d sin t) F_net``, which
    is exactly ``F_net`` for ``TrigFlowPrecond`` and ``EDMPrecond`` (their ``c_skip = cos^2 t``,
    ``c_out = -/+ sigma_d sin t``), so no precision is lost at small ``t``. ``x_t`` is
    ``[N, ...]``, ``t`` is ``[N]`` in ``(0, pi/2)``; the result has ``x_t``'s dtype (at least
    float32). Differentiable in ``(x_t, t)`` by forward-mode AD (``torch.func.jvp``).
    """
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    x_t = x_t.to(dtype)
    t = t.to(torch.float64).reshape(-1, *[1] * (x_t.ndim - 1))
    cos_t, sin_t = torch.cos(t), torch.sin(t)
    sigma = sigma_data * torch.tan(t)  # float64 [N, 1, 1, 1]
    if isinstance(denoiser, Preconditioner):
        c_skip, c_out, c_in, c_noise = denoiser.scalings(sigma)
        a = (cos_t**2 - c_skip) / (sigma_data * sin_t * cos_t)
        b = -c_out / (sigma_data * sin_t)
        F_x = denoiser.net((c_in / cos_t).to(dtype) * x_t, c_noise.flatten().to(dtype), labels)
        return a.to(dtype) * x_t + b.to(dtype) * F_x.to(dtype)
    D_x = denoiser((x_t / cos_t.to(dtype)), sigma.flatten().to(dtype), labels).to(dtype)
    return (cos_t.to(dtype) * x_t - D_x) / (sigma_data * sin_t).to(dtype)


class VPPrecond(LatentSpace, nn.Module):
    """Ho et al. 2020: a discrete ``eps``-prediction DDPM over T timesteps as an EDM denoiser.

    ``sigma`` maps to the nearest trained timestep ``t`` (in ``ln sigma``) of the table
    ``sigma_t = sqrt((1 - abar_t) / abar_t)``; then ``D(x; sigma) = x - sigma eps(c_in x, t)``
    with ``c_in = 1 / sqrt(1 + sigma^2)`` (Karras et al. 2022, Table 1, VP), so ``c_in x`` is the
    DDPM state ``x_t``. The network gets ``c_noise = t``, the integer timestep as in
    openai/improved-diffusion. Computed in float32 whatever the network's autocast dtype.

    Args:
        net: the raw network ``eps(x_t, t, labels)`` with ``out_channels = in_channels``.
        schedule: ``"linear"`` (Ho et al. 2020) or ``"cosine"`` (Nichol & Dhariwal 2021) betas.
        num_timesteps: T, the number of trained timesteps.
        vae: the VAE of a latent model (``cm.vae.VAE``, e.g. DiT's); None: a pixel-space model.
    """

    learned_variance = False

    def __init__(
        self,
        net: nn.Module,
        schedule: Literal["linear", "cosine"] = "linear",
        num_timesteps: int = 1000,
        vae: VAE | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.set_vae(vae)
        self.schedule, self.num_timesteps = schedule, num_timesteps
        betas = vp_betas(schedule, num_timesteps)
        # Derived from the config, so not saved: imported checkpoints carry only the network.
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("sigmas", vp_sigmas(betas), persistent=False)

    def timestep(self, sigma: Tensor) -> Tensor:
        """Nearest trained timestep index ``[N]`` (long) to ``sigma`` in log space."""
        log_table = self.sigmas.log().to(sigma.device)
        log_sigma = sigma.to(torch.float64).clamp(min=1e-20).log().reshape(-1, 1)
        return (log_sigma - log_table).abs().argmin(dim=1)

    def round_sigma(self, sigma: Tensor) -> Tensor:
        """The trained ``sigma_t`` nearest to each ``sigma`` (zeros stay 0), as EDM's iDDPMPrecond.

        Samplers round their grids with it, so that every step of a discrete model is taken
        between trained noise levels and ``c_in``/``D`` use the sigma the network was trained at.
        """
        table = self.sigmas.to(sigma.device, torch.float64)
        rounded = table[self.timestep(sigma)].to(sigma.dtype).reshape(sigma.shape)
        return torch.where(sigma > 0, rounded, sigma)

    def predict(
        self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``(eps, v)``: the predicted noise and, for learned variances, ``v`` in [0, 1]."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # float32, or float64 in tests
        sigma = _sigma_column(sigma, x)
        t = self.timestep(sigma.flatten())
        out = self.net(x / (1 + sigma**2).sqrt(), t.to(torch.float32), labels).to(x.dtype)
        if not self.learned_variance:
            return out, None
        eps, v = out.chunk(2, dim=1)
        return eps, (v + 1) / 2  # improved-diffusion's "learned range": v_raw in [-1, 1]

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """``D(x; sigma) = x - sigma eps`` (Karras et al. 2022, Table 1, VP)."""
        eps, _ = self.predict(x, sigma, labels)
        return x.to(eps.dtype) - _sigma_column(sigma, x).to(eps.dtype) * eps


class IDDPMPrecond(VPPrecond):
    """Nichol & Dhariwal 2021, Eq. 15: a DDPM with learned variance from ``2C`` output channels.

    The first ``C`` channels are ``eps``, the last ``C`` the interpolation ``v`` (mapped from
    ``[-1, 1]`` to ``[0, 1]``) of ``Sigma = exp(v ln beta_t + (1 - v) ln beta~_t)``; the denoiser
    ``D`` uses ``eps`` only, ``cm.solvers.ddpm`` and the hybrid loss use ``v`` via ``predict``.

    Args:
        net: the raw network with ``out_channels = 2 * in_channels``.
        schedule: ``"linear"`` or ``"cosine"`` (the iDDPM default) betas.
        num_timesteps: T, the number of trained timesteps.
        vae: the VAE of a latent model (``cm.vae.VAE``, e.g. DiT's); None: a pixel-space model.
    """

    learned_variance = True

    def __init__(
        self,
        net: nn.Module,
        schedule: Literal["linear", "cosine"] = "cosine",
        num_timesteps: int = 1000,
        vae: VAE | None = None,
    ) -> None:
        super().__init__(net, schedule, num_timesteps, vae)
