"""Flow maps ``Phi(x, sigma, sigma_to, labels)`` in EDM's coordinates, and flow matching's time.

Flow matching's ``z_t = (1 - t) x0 + t eps`` (Lipman et al. 2023; Liu et al. 2023) is EDM's
``x = x0 + sigma n`` with ``sigma = t / (1 - t)``, scaled by ``1 - t = 1 / (1 + sigma)``: the
conversion is written once (``cm.schedules.fm_time``, ``fm_sigma``, re-exported here; a velocity
model is ``cm.precond.FlowMatchingPrecond``). A flow map moves a point at ``sigma`` to the
PF-ODE's point at ``sigma_to``; every flow map is also a denoiser,
``D(x, sigma) = Phi(x, sigma, 0)``, so every solver, ``cm sample``, ``cm edit`` and the metrics
take it unchanged, and ``cm.solvers.flowmap.flowmap`` steps ``sigma_0 -> sigma_1 -> ... -> 0``
through ``Phi`` without re-noising.
"""

from typing import Literal

import torch
from torch import Tensor, nn

from cm.schedules import fm_sigma, fm_time
from cm.vae import VAE, LatentSpace

__all__ = ["MeanFlowPrecond", "SecondTime", "fm_sigma", "fm_time"]

SecondTime = Literal["t_minus_r", "r"]


class MeanFlowPrecond(LatentSpace, nn.Module):
    """Geng et al. 2025 (MeanFlow), Eq. 1-3: ``z_r = z_t - (t - r) u(z_t, r, t)`` as a flow map.

    The network predicts the average velocity ``u`` over ``[r, t]`` in flow matching's variables
    (``v = eps - x0`` is the instantaneous one), fed ``z_t`` unscaled and two times:
    ``c_noise = noise_scale t`` and ``c_noise_to = noise_scale (t - r)`` (py-meanflow's
    ``(t, h)``, the paper's best pair) or ``noise_scale r``. In EDM's variables
    ``Phi(x, sigma, sigma_to) = (1 + sigma_to) / (1 + sigma) x - (t - r)(1 + sigma_to) u`` with
    float64 scalings, so ``Phi(x, sigma, sigma) == x`` bit for bit, and
    ``D(x, sigma) = Phi(x, sigma, 0)``. The network must take the second time
    (``second_time: true`` on ``ADMUNet``, ``NCSNpp`` and ``DiT``).

    Args:
        net: the raw network ``u(z, c_noise, labels, c_noise_to)``.
        sigma_data: standard deviation of the data (kept for the samplers and metrics).
        noise_scale: ``c_noise = noise_scale t`` with ``t`` in ``[0, 1]``: 1 as py-meanflow's
            positional embedding of the raw ``t`` and FastGen's MeanFlow DiT (``scale_t`` off:
            small time derivatives keep the JVP tame); 1000 is DiT's diffusion timestep scale.
        second_time: what the network's second time input is, ``t - r`` or ``r``.
        vae: the VAE of a latent model (``cm.vae.VAE``: samples decode through it); None: pixels.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        noise_scale: float = 1.0,
        second_time: SecondTime = "t_minus_r",
        vae: VAE | None = None,
    ) -> None:
        super().__init__()
        self.net, self.sigma_data = net, sigma_data
        self.noise_scale, self.second_time = noise_scale, second_time
        self.set_vae(vae)

    def average_velocity(self, z: Tensor, t: Tensor, r: Tensor, labels: Tensor | None) -> Tensor:
        """Geng et al. 2025, Eq. 3: ``u_theta(z_t, r, t)`` ``[N, ...]``; ``t >= r`` ``[N]``.

        Differentiable in ``(z, t, r)`` by forward-mode AD (MeanFlow's JVP with ``(v, 0, 1)``).
        """
        dtype = torch.promote_types(z.dtype, torch.float32)
        match self.second_time:
            case "t_minus_r":
                second = t - r
            case "r":
                second = r
        c_noise = (self.noise_scale * t).to(dtype).reshape(-1)
        c_noise_to = (self.noise_scale * second).to(dtype).reshape(-1)
        return self.net(z.to(dtype), c_noise, labels, c_noise_to).to(dtype)

    def flow_map(
        self,
        x: Tensor,
        sigma: Tensor | float,
        sigma_to: Tensor | float,
        labels: Tensor | None = None,
    ) -> Tensor:
        """``Phi(x, sigma, sigma_to)``: the PF-ODE point at ``sigma_to`` of ``x`` at ``sigma``."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1).expand(n)
        sigma_to = torch.as_tensor(sigma_to, device=x.device).to(torch.float64)
        sigma_to = sigma_to.reshape(-1).expand(n)
        t, r = fm_time(sigma), fm_time(sigma_to)
        shape = (-1, *[1] * (x.ndim - 1))
        a = ((1 + sigma_to) / (1 + sigma)).reshape(shape)  # float64
        b = ((t - r) * (1 + sigma_to)).reshape(shape)
        z = x * (1 / (1 + sigma)).reshape(shape).to(dtype)  # z_t = (1 - t) x
        u = self.average_velocity(z, t, r, labels)
        return a.to(dtype) * x - b.to(dtype) * u

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """``D(x, sigma) = Phi(x, sigma, 0)``: one step of the flow map to the data."""
        return self.flow_map(x, sigma, 0.0, labels)
