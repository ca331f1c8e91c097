"""EDM denoising score matching (Karras et al. 2022, Eq. 2 and Table 1, "Ours")."""

from torch import Tensor, nn

from cm.objectives.base import Objective, drop_labels


class DenoisingScoreMatching(Objective):
    """Karras et al. 2022, Eq. 8: ``lambda(sigma) ||D(y + sigma n; sigma) - y||^2``.

    ``ln(sigma) ~ N(P_mean, P_std^2)`` (Table 1, as ``cm.schedules.edm_lognormal_sigmas``).

    ``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2`` makes the effective network target
    unit-variance. The squared error is averaged over dimensions (EDM sums; with Adam only the
    scale of ``eps`` differs).

    Args:
        p_mean: mean of ``ln(sigma)``.
        p_std: standard deviation of ``ln(sigma)``.
        sigma_data: standard deviation of the data, ``sigma_d``.
        p_uncond: probability of dropping a sample's label (classifier-free guidance training).
    """

    def __init__(
        self,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_data: float = 0.5,
        p_uncond: float = 0.0,
    ) -> None:
        super().__init__()
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data
        self.p_uncond = p_uncond

    def forward(
        self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None, step: int, total_steps: int
    ) -> Tensor:
        """Per-sample weighted denoising loss ``[N]``."""
        labels = drop_labels(labels, self.p_uncond, self.draws) if self.training else labels
        sigma = (self.draws.randn(x0.shape[0], x0.device) * self.p_std + self.p_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        n = self.draws.randn_like(x0)
        D_yn = denoiser(x0 + sigma.view(-1, 1, 1, 1) * n, sigma, labels)
        return weight * (D_yn - x0).pow(2).flatten(1).mean(1)
