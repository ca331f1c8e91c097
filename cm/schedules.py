"""Noise-level grids and training curricula (EDM, CT and iCT), as pure functions of the step."""

import math

import torch
from torch import Tensor


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
        raise ValueError(f"karras_sigmas needs num_steps >= 1, got {num_steps}.")
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
