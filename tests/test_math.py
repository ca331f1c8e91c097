"""Reference values and identities: schedules, preconditioners, oracle, solvers."""

import math

import pytest
import torch

from cm.oracle import GaussianMixture, PointSetDenoiser
from cm.precond import ConsistencyPrecond, EDMPrecond
from cm.schedules import (
    ct_boundaries,
    ct_ema_decay,
    ct_num_scales,
    ict_num_scales,
    karras_sigmas,
    lognormal_index_probs,
)
from cm.solvers import euler, euler_step, heun
from cm.solvers.consistency import multistep, onestep
from cm.solvers.sampling import Sampler


class RandomNet(torch.nn.Module):
    """A raw network with nonzero, input-dependent output."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, c_noise, labels=None):
        return self.conv(x) + c_noise.view(-1, 1, 1, 1)


def test_karras_sigmas_reference():
    sigmas = karras_sigmas(40)
    assert len(sigmas) == 41 and sigmas[-1] == 0
    assert sigmas[0] == pytest.approx(80.0) and sigmas[39] == pytest.approx(0.002)
    assert float(sigmas[22]) == pytest.approx(1.3824, abs=1e-4)
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert karras_sigmas(1).tolist() == [80.0, 0.0]
    assert karras_sigmas(18, dtype=torch.float32).dtype == torch.float32


def test_ict_curriculum_reference():
    values = {ict_num_scales(k, 400_000, 10, 1280) for k in range(0, 400_001, 500)}
    assert sorted(values) == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict_num_scales(0, 400_000) == 11
    assert ict_num_scales(49_999, 400_000) == 11 and ict_num_scales(50_000, 400_000) == 21


def test_ct_curriculum_reference():
    got = [ct_num_scales(k, 800_000, 2, 200) for k in (0, 200_000, 400_000, 800_000)]
    assert got == [2, 101, 143, 201]
    # mu(k) = exp(s0 log mu0 / N(k)); OpenAI's code divides by N(k) - 1.
    assert ct_ema_decay(0, 800_000, 2, 200, 0.95) == pytest.approx(0.95)
    assert ct_ema_decay(0, 800_000, 2, 200, 0.95, openai_compat=True) == pytest.approx(0.95**2)


def test_lognormal_index_probs():
    t = ct_boundaries(11)
    assert torch.all(t[1:] > t[:-1]) and t[0] == pytest.approx(0.002) and t[-1] == pytest.approx(80)
    p = lognormal_index_probs(t)
    assert p.shape == (10,) and p.sum() == pytest.approx(1.0)
    cdf = lambda s: 0.5 * (1 + math.erf((math.log(s) + 1.1) / (2.0 * math.sqrt(2))))  # noqa: E731
    expected = [cdf(t[i + 1]) - cdf(t[i]) for i in range(10)]
    total = sum(expected)
    assert p.tolist() == pytest.approx([e / total for e in expected])


def test_consistency_boundary_condition_exact():
    torch.manual_seed(0)
    D = ConsistencyPrecond(RandomNet(), sigma_min=0.002)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(D(x, torch.full((4,), 0.002)), x)
    assert not torch.allclose(D(x, torch.full((4,), 1.0)), x)


def test_edm_precond_scalings():
    D = EDMPrecond(RandomNet())
    sigma = torch.tensor([0.5]).view(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = D.scalings(sigma)
    assert float(c_skip) == pytest.approx(0.5) and float(c_out) == pytest.approx(0.25 / 0.5**0.5)
    assert float(c_in) == pytest.approx(1 / 0.5**0.5) and float(c_noise) == pytest.approx(
        math.log(0.5) / 4
    )


def test_oracle_denoisers():
    gm = GaussianMixture.random(3, (1, 4, 4), std=0.1, seed=1)
    y, k = gm.sample(64, torch.Generator().manual_seed(0))
    assert torch.allclose(gm(y, 1e-6), y, atol=1e-9)  # no noise: identity
    far = gm(torch.zeros(2, 1, 4, 4, dtype=torch.float64), 1e6)  # huge noise: the mean
    assert torch.allclose(far[0], (gm.weights.view(-1, 1, 1, 1) * gm.means).sum(0), atol=1e-6)
    # Tweedie: D(x) = x + sigma^2 grad log p(x); check against autograd on the log density.
    x = (y[:4] + 0.3 * torch.randn_like(y[:4])).requires_grad_(True)
    var = gm.stds.pow(2) + 0.09
    sq = torch.cdist(x.flatten(1), gm.means.flatten(1)).pow(2)
    logp = (gm.weights.log() - 0.5 * sq / var - 8 * torch.log(2 * math.pi * var)).logsumexp(1)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    assert torch.allclose(gm(x.detach(), 0.3), x.detach() + 0.09 * grad, atol=1e-10)
    points = PointSetDenoiser(y)
    assert torch.allclose(points(y, 1e-4), y)


def test_heun_matches_exact_ode_solution():
    gm = GaussianMixture(torch.full((1, 1, 4, 4), 0.3), torch.tensor([0.2]))
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64) * 80
    exact = gm.flow(x, 80.0, 0.01)

    def error(fn, n):  # stop at sigma_min = 0.01 (drop the trailing 0)
        return (fn(gm, x, karras_sigmas(n, sigma_min=0.01)[:-1]) - exact).abs().max().item()

    # Convergence orders: Euler halves its error per doubling, Heun quarters it.
    assert error(euler, 32) / error(euler, 64) == pytest.approx(2.0, rel=0.15)
    assert error(heun, 32) / error(heun, 64) > 3.5
    assert error(heun, 64) < 3e-3


def test_ct_euler_target_is_closed_form():
    x0 = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    z = torch.randn_like(x0)
    s_next, s = 2.5, 1.3
    oracle = lambda x, sigma, labels=None: x0  # noqa: E731 - the one-sample estimate D = x0
    stepped = euler_step(oracle, x0 + s_next * z, s_next, s)
    assert torch.allclose(stepped, x0 + s * z, atol=1e-12)


def test_consistency_samplers_and_seeds():
    gm = GaussianMixture.random(2, (1, 4, 4), std=0.05)
    sigmas = torch.tensor([80.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64) * 80
    assert torch.allclose(onestep(gm, x, sigmas), gm(x, 80.0))
    out = multistep(gm, x, sigmas, noise=lambda t: torch.zeros_like(t))
    assert torch.allclose(out, gm(gm(x, 80.0), 1.0))
    sampler = Sampler(solver=multistep, sigmas=[80.0, 1.0])
    big = sampler(gm, list(range(8)), (1, 4, 4))
    small = sampler(gm, [5, 6], (1, 4, 4))
    assert torch.allclose(big[5:7], small)
