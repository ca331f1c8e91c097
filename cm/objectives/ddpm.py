"""DDPM's ``L_simple`` (Ho et al. 2020) and iDDPM's ``L_hybrid``/``L_vlb`` (Nichol & Dhariwal 2021).

The denoiser is a ``cm.precond.VPPrecond`` (or ``IDDPMPrecond``): its ``betas``/``sigmas`` tables
define the discrete timesteps, its ``predict`` gives ``(eps, v)``. States live in EDM coordinates
``x = y + sigma_t n``; the Gaussian KLs are unchanged by the common ``1 / sqrt(abar_{t-1})``
scaling, so ``L_t`` equals the VP-space term. Variational terms are in bits per dimension.
"""

import math
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cm.errors import UserError
from cm.objectives.base import Objective, drop_labels


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` elementwise, in nats."""
    return 0.5 * (
        logvar2 - logvar1 - 1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp()
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Ho et al. 2020, Eq. 13: ``log p(x)`` of 8-bit data in [-1, 1] binned in widths 2/255."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    # The edge bins extend to -inf and +inf.
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def _mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension, ``[N]``."""
    return x.flatten(1).mean(1)


class DDPMLoss(Objective):
    """Ho et al. 2020, Eq. 14 (``L_simple``) and Nichol & Dhariwal 2021, Eq. 16 (``L_hybrid``).

    ``loss="simple"``: ``||eps - eps_theta(x_t, t)||^2`` with ``t ~ U{0..T-1}``.
    ``loss="hybrid"``: ``L_simple + vlb_weight * T * L_t`` where ``L_t`` is the variational term
    of the sampled ``t`` (``L_vlb = sum_t L_t``) with a stop-gradient on the mean, so it trains
    only the variance ``v``. ``loss="vlb"``: ``T * L_t`` through mean and variance. ``L_0`` is the
    discretised Gaussian decoder NLL (Eq. 13 of Ho et al.). With ``importance_sampling``, ``t`` is
    drawn with ``p_t ~ sqrt(E[L_t^2])`` over the last ``history`` values of each ``t`` (Eq. 18)
    and the loss reweighted by ``1 / (T p_t)``: a uniform draw until every ``t`` has its history.

    Args:
        loss: ``"simple"`` (DDPM), ``"hybrid"`` (iDDPM) or ``"vlb"``.
        vlb_weight: ``lambda`` of the hybrid loss (0.001 in the paper).
        importance_sampling: draw ``t`` by the loss-second-moment sampler of iDDPM.
        history: values of ``L_t`` kept per timestep for importance sampling.
        uniform_prob: probability mass mixed in uniformly by the importance sampler.
        bpd_timesteps: timesteps per image in the validation bits/dim estimate: None evaluates
            all T terms (exact, as iDDPM's ``calc_bpd_loop``); K < T draws one ``t`` in each of
            K equal strata (unbiased, K network calls per image).
        p_uncond: probability of dropping a sample's label (classifier-free guidance training).
    """

    def __init__(
        self,
        loss: Literal["simple", "hybrid", "vlb"] = "simple",
        vlb_weight: float = 0.001,
        importance_sampling: bool = False,
        history: int = 10,
        uniform_prob: float = 0.001,
        bpd_timesteps: int | None = None,
        p_uncond: float = 0.0,
    ) -> None:
        super().__init__()
        self.p_uncond = p_uncond
        self.loss, self.vlb_weight = loss, vlb_weight
        self.importance_sampling, self.history = importance_sampling, history
        self.uniform_prob, self.bpd_timesteps = uniform_prob, bpd_timesteps
        self._last: dict[str, float] = {}

    def bind(self, denoiser: nn.Module) -> None:
        """Check the denoiser is a DDPM and allocate the importance sampler's history."""
        if not hasattr(denoiser, "betas") or not hasattr(denoiser, "predict"):
            raise UserError(
                "DDPMLoss trains a discrete DDPM: use cm.precond.VPPrecond or IDDPMPrecond as "
                "the denoiser (DenoisingScoreMatching trains EDM denoisers)."
            )
        if self.loss != "simple" and not denoiser.learned_variance:
            raise UserError(
                f"loss '{self.loss}' learns the variance: use cm.precond.IDDPMPrecond with "
                "out_channels = 2 * in_channels, or loss 'simple'."
            )
        T = denoiser.num_timesteps
        self.register_buffer("loss_history", torch.zeros(T, self.history, dtype=torch.float64))
        self.register_buffer("history_count", torch.zeros(T, dtype=torch.long))

    def sample_timesteps(self, n: int, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Timesteps ``[n]`` and their loss weights ``1 / (T p_t)`` ``[n]``."""
        ready = self.importance_sampling and bool((self.history_count == self.history).all())
        if not ready:
            return self.draws.randint(0, T, n, device), torch.ones(n, device=device)
        p = self.loss_history.pow(2).mean(1).sqrt()
        p = (p / p.sum()) * (1 - self.uniform_prob) + self.uniform_prob / T
        t = self.draws.multinomial(p, n).to(device)
        return t, (1 / (T * p.to(device)[t])).to(torch.float32)

    @torch.no_grad()
    def _update_history(self, t: Tensor, L_t: Tensor) -> None:
        """Push the sampled ``L_t`` values of every rank into the history (oldest dropped).

        Under DDP the ``(t, L_t)`` pairs are all-gathered first, as improved-diffusion's
        ``update_with_local_losses``: every rank keeps the same sampler, built from all losses
        (DDP's buffer broadcast would otherwise keep only rank 0's).
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = []
            for v in (t, L_t.to(torch.float64)):
                parts = [torch.empty_like(v) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, v.contiguous())
                gathered.append(torch.cat(parts))
            t, L_t = gathered
        for ti, li in zip(t.tolist(), L_t.tolist(), strict=True):
            row = self.loss_history[ti]
            self.loss_history[ti] = torch.cat([row[1:], row.new_tensor([li])])
            self.history_count[ti] = min(self.history, int(self.history_count[ti]) + 1)

    def vlb_term(
        self,
        denoiser: nn.Module,
        x0: Tensor,
        x: Tensor,
        t: Tensor,
        labels: Tensor | None,
        eps: Tensor | None = None,
        v: Tensor | None = None,
        detach_mean: bool = False,
    ) -> Tensor:
        """``L_t`` in bits/dim ``[N]``: ``KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t))``, NLL at 0."""
        sigmas = denoiser.sigmas.to(x.device)
        sigma = sigmas[t].view(-1, 1, 1, 1)
        sigma_prev = torch.where(t > 0, sigmas[(t - 1).clamp(min=0)], 0).view(-1, 1, 1, 1)
        if eps is None:
            eps, v = denoiser.predict(x, sigma.flatten().float(), labels)
        eps = eps.to(torch.float64)
        x64, x0_64 = x.to(torch.float64), x0.to(torch.float64)
        x0_hat = x64 - sigma * (eps.detach() if detach_mean else eps)
        ratio = (sigma_prev / sigma) ** 2
        mean_p, mean_q = x0_hat + ratio * (x64 - x0_hat), x0_64 + ratio * (x64 - x0_64)
        # Fixed-variance DDPMs are scored with beta~ (v = 0), the tighter of Ho et al.'s two bounds.
        v = torch.zeros_like(x64) if v is None else v.to(torch.float64)
        logvar_p = self._model_logvar(denoiser, t, v) + (1 + sigma_prev**2).log()
        logvar_q = self._posterior_logvar(denoiser, t) + (1 + sigma_prev**2).log()
        kl = _mean_flat(normal_kl(mean_q, logvar_q, mean_p, logvar_p)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0_64, mean_p, 0.5 * logvar_p)
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    @staticmethod
    def _posterior_logvar(denoiser: nn.Module, t: Tensor) -> Tensor:
        """``ln beta~_t`` ``[N, 1, 1, 1]``; ``beta~_1`` at ``t = 0`` (improved-diffusion's clip)."""
        betas = denoiser.betas.to(t.device)
        abar = torch.cumprod(1 - betas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        beta_tilde = betas * (1 - abar_prev) / (1 - abar)
        beta_tilde = torch.cat([beta_tilde[1:2], beta_tilde[1:]])
        return beta_tilde.log()[t].view(-1, 1, 1, 1)

    def _model_logvar(self, denoiser: nn.Module, t: Tensor, v: Tensor) -> Tensor:
        """Nichol & Dhariwal 2021, Eq. 15: ``v ln beta_t + (1 - v) ln beta~_t``."""
        log_beta = denoiser.betas.to(t.device).log()[t].view(-1, 1, 1, 1)
        return v * log_beta + (1 - v) * self._posterior_logvar(denoiser, t)

    def forward(
        self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None, step: int, total_steps: int
    ) -> Tensor:
        """Per-sample loss ``[N]``: ``L_simple``, ``L_hybrid`` or ``L_vlb`` at random ``t``."""
        labels = drop_labels(labels, self.p_uncond, self.draws) if self.training else labels
        T = denoiser.num_timesteps
        t, weight = self.sample_timesteps(x0.shape[0], T, x0.device)
        sigma = denoiser.sigmas.to(x0.device)[t].to(x0.dtype)
        n = self.draws.randn_like(x0)
        x = x0 + sigma.view(-1, 1, 1, 1) * n
        eps, v = denoiser.predict(x, sigma, labels)
        mse = _mean_flat((eps - n) ** 2)
        self._last = {}
        if self.loss == "simple":
            return weight * mse
        detach = self.loss == "hybrid"
        L_t = self.vlb_term(denoiser, x0, x, t, labels, eps, v, detach_mean=detach).to(x0.dtype)
        if self.training and self.importance_sampling:
            self._update_history(t, L_t.detach())
        self._last = {"mse": float(mse.detach().mean()), "vlb_t": float(L_t.detach().mean())}
        if self.loss == "hybrid":
            return weight * (mse + self.vlb_weight * T * L_t)
        return weight * T * L_t

    @torch.no_grad()
    def bits_per_dim(self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None) -> Tensor:
        """Negative ELBO in bits/dim ``[N]``: prior KL + ``sum_t L_t`` (Ho et al. 2020, Eq. 5)."""
        T = denoiser.num_timesteps
        K = self.bpd_timesteps or T
        strata = torch.linspace(0, T, K + 1, device=x0.device).long()
        total = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        sigmas = denoiser.sigmas.to(x0.device)
        for lo, hi in zip(strata[:-1].tolist(), strata[1:].tolist(), strict=True):
            if K == T:
                t = torch.full((x0.shape[0],), lo, device=x0.device)
            else:
                t = self.draws.randint(lo, hi, x0.shape[0], x0.device)
            x = x0 + sigmas[t].view(-1, 1, 1, 1).to(x0.dtype) * self.draws.randn_like(x0)
            total += (hi - lo) * self.vlb_term(denoiser, x0, x, t, labels)
        # Prior L_T = KL(q(x_T | x0) || N(0, I)) in VP coordinates.
        abar_T = 1 / (1 + sigmas[-1].to(torch.float64) ** 2)
        mean = abar_T.sqrt() * x0.to(torch.float64)
        logvar = (1 - abar_T).log().expand_as(mean)
        prior = _mean_flat(normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean)))
        return total + prior / math.log(2.0)

    def evaluate(
        self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None, step: int, total_steps: int
    ) -> dict[str, Tensor]:
        """Held-out loss and bits/dim (Nichol & Dhariwal 2021, Table 1; beta~ if not learned)."""
        loss = self(denoiser, x0, labels, step, total_steps).mean()
        return {"loss": loss, "bpd": self.bits_per_dim(denoiser, x0, labels).mean()}

    def metrics(self) -> dict[str, float]:
        """The last batch's ``L_simple`` and ``L_t`` (bits/dim) for hybrid and vlb losses."""
        return dict(self._last)
