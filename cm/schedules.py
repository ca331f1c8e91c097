"""Noise-level grids and training curricula (EDM, CT and iCT), as pure functions of the step."""

import math
from typing import Literal

import torch
from torch import Tensor

from cm.errors import UserError


def karras_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Karras et al. 2022, Eq. 5: ``num_steps`` decreasing sigmas from ``sigma_max``, then a 0.

    Matches k-diffusion's ``get_sigmas_karras``: ``sigma_i = (sigma_max^(1/rho) + i / (n - 1)
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` for ``i < n``; with ``n = 1`` only ``sigma_max``.
    """
    if num_steps < 1:
        raise UserError(f"karras_sigmas needs num_steps >= 1, got {num_steps}.")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    if num_steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def ct_boundaries(
    num_scales: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """Song et al. 2023, Sec. 5: the ``N`` increasing CT/CD points ``t_1 = sigma_min ... t_N``."""
    return karras_sigmas(num_scales, sigma_min, sigma_max, rho)[:-1].flip(0)


def ct_num_scales(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """CT (Song et al. 2023, App. C): ``N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1)+1``."""
    k = min(step, total_steps) / total_steps
    return max(math.ceil(math.sqrt(k * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1), 1) + 1


def ct_ema_decay(
    step: int,
    total_steps: int,
    s0: int = 2,
    s1: int = 150,
    mu0: float = 0.9,
    openai_compat: bool = False,
) -> float:
    """Song et al. 2023, Appendix C (CT): target EMA ``mu(k) = exp(s0 log(mu0) / N(k))``.

    ``openai_compat`` divides by ``N(k) - 1`` instead, as openai/consistency_models does
    (``cm/script_util.py``, ``create_ema_and_scales_fn``); the paper's formula is the default.
    """
    n = ct_num_scales(step, total_steps, s0, s1) - (1 if openai_compat else 0)
    return math.exp(s0 * math.log(mu0) / n)


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """Song & Dhariwal 2023, Eq. 8 (iCT): ``N(k) = min(s0 2^floor(k/K'), s1) + 1``.

    ``K' = floor(K / (log2 floor(s1/s0) + 1))``: the number of doublings is spread evenly over K.
    """
    k_prime = math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** math.floor(step / max(k_prime, 1)), s1) + 1


def lognormal_index_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """Song & Dhariwal 2023, Eq. 9 (iCT): lognormal probabilities of the ``N - 1`` intervals.

    ``p(i) ∝ erf((log s_{i+1} - P_mean) / (sqrt2 P_std)) - erf((log s_i - P_mean) / (sqrt2 P_std))``
    for increasing ``sigmas``.
    """
    cdf = torch.erf((sigmas.to(torch.float64).log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def edm_lognormal_sigmas(
    n: int,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Karras et al. 2022, Table 1 (training): ``ln(sigma) ~ N(P_mean, P_std^2)``, ``[n]``."""
    z = torch.randn(n, generator=generator, device=device)
    return (z * p_std + p_mean).exp()


def vp_betas(schedule: str = "linear", num_timesteps: int = 1000) -> Tensor:
    """DDPM betas ``[T]`` (float64): Ho et al. 2020 linear or Nichol & Dhariwal 2021, Eq. 17 cosine.

    ``linear`` runs from 1e-4 to 0.02 for T = 1000, scaled by ``1000 / T`` for other T as
    openai/improved-diffusion does; ``cosine`` uses ``alpha_bar(t) = cos^2((t/T + s)/(1 + s) pi/2)``
    with ``s = 0.008`` and clips ``beta`` at 0.999.
    """
    T = num_timesteps
    match schedule:
        case "linear":
            scale = 1000 / T
            return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
        case "cosine":
            s = 0.008
            t = torch.arange(T + 1, dtype=torch.float64) / T
            alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
            return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        case _:
            raise UserError(f"Unknown beta schedule '{schedule}': use 'linear' or 'cosine'.")


def vp_sigmas(betas: Tensor) -> Tensor:
    """EDM noise levels ``sigma_t = sqrt((1 - abar_t) / abar_t)`` of DDPM timesteps (increasing).

    With ``x_edm = x_vp / sqrt(abar_t)`` the VP forward process ``x_vp = sqrt(abar) y +
    sqrt(1 - abar) n`` is ``x_edm = y + sigma_t n`` (Karras et al. 2022, Table 1, VP).
    """
    alpha_bar = torch.cumprod(1 - betas.to(torch.float64), dim=0)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def vp_timestep_sigmas(sigmas: Tensor, num_steps: int) -> Tensor:
    """``num_steps`` evenly spaced trained timesteps from T-1 down to 0 as a grid ending in 0.

    ``sigmas`` is a DDPM model's ``[T]`` table; ``num_steps = T`` gives ancestral DDPM's full
    chain, fewer the DDIM subsequence (Song et al. 2021a, Sec. 4.2), endpoints included.
    """
    T = len(sigmas)
    if not 1 <= num_steps <= T:
        raise UserError(f"num_steps must be in [1, {T}] for a {T}-step model, got {num_steps}.")
    t = torch.linspace(T - 1, 0, num_steps, dtype=torch.float64).round().long()
    grid = sigmas.to(torch.float64).cpu()[t]
    return torch.cat([grid, grid.new_zeros(1)])


def cosine_sigmas(num_steps: int, sigma_max: float = 80.0) -> Tensor:
    """Time-uniform grid of the cosine schedule truncated at ``sigma_max``, ``[num_steps + 1]``.

    ``alpha_t = cos(pi t / 2)`` (Salimans & Ho 2022) is ``sigma(t) = tan(pi t / 2)`` in EDM
    coordinates; ``t`` runs over ``i / num_steps`` scaled so ``sigma(1) = sigma_max``. The grid of
    ``2n`` steps contains the grid of ``n`` steps, as progressive distillation needs.
    """
    if num_steps < 1:
        raise UserError(f"cosine_sigmas needs num_steps >= 1, got {num_steps}.")
    i = torch.arange(num_steps, -1, -1, dtype=torch.float64)
    return torch.tan(i / num_steps * math.atan(sigma_max))


Schedule = Literal["karras", "logsnr", "time_uniform", "flow"]


def schedule_sigmas(
    schedule: Schedule,
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> Tensor:
    """The grid of ``num_steps`` sigmas then 0 by name; ``rho`` is the Karras exponent only."""
    match schedule:
        case "karras":
            return karras_sigmas(num_steps, sigma_min, sigma_max, rho)
        case "logsnr":
            return logsnr_sigmas(num_steps, sigma_min, sigma_max)
        case "time_uniform":
            return time_uniform_sigmas(num_steps, sigma_min, sigma_max)
        case "flow":
            return flow_uniform_sigmas(num_steps, sigma_max)
    raise UserError(f"Unknown schedule {schedule!r}: use karras, logsnr, time_uniform or flow.")


def fm_time(sigma: Tensor) -> Tensor:
    """Flow matching's ``t = sigma / (1 + sigma)`` of EDM's ``sigma`` (``sigma = inf`` is 1)."""
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def fm_sigma(t: Tensor) -> Tensor:
    """EDM's ``sigma = t / (1 - t)`` of flow matching's ``t`` in ``[0, 1)``."""
    return t / (1 - t)


def flow_uniform_sigmas(num_steps: int, sigma_max: float = 1e6) -> Tensor:
    """Geng et al. 2025, Sec. 4: ``num_steps`` flow-matching times uniform in ``[0, t_max]``.

    ``t_i = t_max (1 - i / num_steps)`` with ``t_max = sigma_max / (1 + sigma_max)`` (MeanFlow's
    1-NFE ``t = 1 -> 0`` and 2-NFE ``1 -> 0.5 -> 0``; ``t = 1`` itself is ``sigma = inf``, so the
    default ``sigma_max = 1e6`` is ``t = 1 - 1e-6``), mapped to ``sigma = t / (1 - t)``; the last
    value is 0.
    """
    if num_steps < 1:
        raise UserError(f"flow_uniform_sigmas needs num_steps >= 1, got {num_steps}.")
    i = torch.arange(num_steps + 1, dtype=torch.float64)
    # sigma = t / (1 - t) with 1 - t = 1 - t_max + t_max i / n, written without cancellation.
    one_minus_t_max = 1 / (1 + sigma_max)
    t = (1 - one_minus_t_max) * (1 - i / num_steps)
    return t / (one_minus_t_max + (1 - one_minus_t_max) * i / num_steps)


# diff-sampler's name for EDM's grid (``schedule_type="polynomial"``): the same function.
polynomial_sigmas = karras_sigmas


def logsnr_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Lu et al. 2022a, Sec. 3.3 (logSNR-uniform): ``num_steps`` sigmas uniform in log sigma, 0.

    ``lambda = -log sigma`` in EDM coordinates, so uniform logSNR is geometric in sigma.
    """
    if num_steps < 1:
        raise UserError(f"logsnr_sigmas needs num_steps >= 1, got {num_steps}.")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    if num_steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64)
    sigmas = torch.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max)))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def time_uniform_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 1.0,
    eps_s: float = 1e-3,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Lu et al. 2022a, Sec. 3.3 (time-uniform): VP-SDE times from 1 to ``eps_s``, then a 0.

    As diff-sampler's ``time_uniform``: a linear-beta VP-SDE ``sigma(t) = sqrt(exp(beta_d t^2 / 2
    + beta_min t) - 1)`` fitted so ``sigma(1) = sigma_max`` and ``sigma(eps_s) = sigma_min``; the
    times are ``(1 + i / (n - 1) (eps_s^(1/rho) - 1))^rho`` (uniform for ``rho = 1``).
    """
    if num_steps < 1:
        raise UserError(f"time_uniform_sigmas needs num_steps >= 1, got {num_steps}.")
    log_max, log_min = math.log1p(sigma_max**2), math.log1p(sigma_min**2)
    beta_d = 2 * (log_min / eps_s - log_max) / (eps_s - 1)
    beta_min = log_max - beta_d / 2
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    if num_steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64)
    t = (1 + ramp * (eps_s ** (1 / rho) - 1)) ** rho
    sigmas = torch.expm1(beta_d * t**2 / 2 + beta_min * t).sqrt()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


class InverseSqrtLR(torch.optim.lr_scheduler.LRScheduler):
    """Karras et al. 2024 (EDM2), Eq. 67: ``lr = lr_ref / sqrt(max(k / t_ref, 1))``, optional ramp.

    sCM trains with it (Lu & Song 2024, ImageNet settings: ``t_ref`` 35000; FastGen's
    ``LambdaInverseSquareRootScheduler``); step it every optimizer step (``DenoiserModule`` does).

    Args:
        optimizer: the optimizer whose ``lr`` is ``lr_ref``.
        decay_steps: ``t_ref``, the step after which the rate decays as ``1 / sqrt(k)``.
        warmup_steps: linear ramp-up from 0 over this many steps (EDM2's ``rampup``); 0: none.
        last_epoch: the step to resume from (-1: start); Lightning restores it from checkpoints.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        decay_steps: int = 35000,
        warmup_steps: int = 0,
        last_epoch: int = -1,
    ) -> None:
        if decay_steps < 0 or warmup_steps < 0:
            raise UserError("InverseSqrtLR needs decay_steps >= 0 and warmup_steps >= 0.")
        self.decay_steps, self.warmup_steps = decay_steps, warmup_steps
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """``lr / lr_ref`` at optimizer step ``step``."""
        factor = 1.0
        if self.decay_steps > 0:
            factor /= math.sqrt(max(step / self.decay_steps, 1.0))
        if self.warmup_steps > 0:
            factor *= min(step / self.warmup_steps, 1.0)
        return factor

    def get_lr(self) -> list[float]:  # noqa: D102 - torch's hook
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
