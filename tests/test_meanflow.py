"""MeanFlow (Geng et al. 2025) and flow maps against closed forms: the exact average velocity of
one Gaussian (``cm.oracle``) satisfies the MeanFlow identity, so the objective's target equals it
to float64 round-off; the exact flow map composes; guidance's target; the JVP of the two-time
networks against a central difference; the flow-map sampler."""

import math

import pytest
import torch
from helpers import tiny_adm
from test_jvp import adm, central_difference, labels_for, ncsnpp, rel_error
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cm.errors import UserError
from cm.flowmap import MeanFlowPrecond, fm_sigma, fm_time
from cm.objectives import MeanFlow
from cm.oracle import GaussianMixture
from cm.precond import FlowMatchingPrecond
from cm.schedules import flow_uniform_sigmas
from cm.solvers import Sampler, flowmap

M, S = 0.3, 0.2  # the data: N(M, S^2 I) per pixel
F64 = torch.float64


class ExactAverageVelocity(nn.Module):
    """``u(z_t, r, t)`` of the data ``N(m, s^2 I)``: along a PF-ODE trajectory
    ``z(t) = (1 - t) m + C sqrt(s^2 (1 - t)^2 + t^2)`` (EDM's ``m + (x - m) sqrt((s^2 + sigma^2) /
    (s^2 + sigma_0^2))`` times ``1 - t``), so ``u = (z_t - z_r) / (t - r)`` and, at ``r = t``,
    ``v = dz/dt``. Called as a network with ``c_noise = t`` and ``c_noise_to = t - r``."""

    def __init__(self, m: float = M, s: float = S, bias: float = 0.0) -> None:
        super().__init__()
        self.m, self.s, self.bias = m, s, bias
        self.img_resolution, self.in_channels, self.label_dim = 4, 1, 0

    def root(self, t: Tensor) -> Tensor:
        return (self.s**2 * (1 - t) ** 2 + t**2).sqrt()

    def forward(self, z: Tensor, c_noise: Tensor, labels=None, c_noise_to=None) -> Tensor:
        t = c_noise.reshape(-1, 1, 1, 1)
        h = c_noise_to.reshape(-1, 1, 1, 1)  # t - r
        r = t - h
        C = (z - (1 - t) * self.m) / self.root(t)
        v = -self.m + C * (t - self.s**2 * (1 - t)) / self.root(t)
        z_r = (1 - r) * self.m + C * self.root(r)
        h_safe = torch.where(h > 0, h, torch.ones_like(h))
        u = torch.where(h > 0, (z - z_r) / h_safe, v)
        return u + self.bias * z.square()  # a perturbed model for bias != 0


def gaussian_teacher() -> GaussianMixture:
    return GaussianMixture(torch.full((1, 1, 4, 4), M, dtype=F64), torch.tensor([S], dtype=F64))


def data(n: int = 64, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return M + S * torch.randn(n, 1, 4, 4, generator=g, dtype=F64)


@pytest.mark.parametrize("time_pairs", ["sorted", "clipped"])
def test_exact_average_velocity_is_its_own_meanflow_target(time_pairs):
    # With the marginal velocity of the exact teacher, u_tgt = v - (t - r) du/dt is the exact
    # u (the MeanFlow identity, Eq. 6): the loss is 0 to round-off, and positive when perturbed.
    torch.manual_seed(0)
    objective = MeanFlow(
        p_mean_t=-0.4, p_std_t=1.0, p_mean_r=-1.0, ratio=0.75, time_pairs=time_pairs,
        norm_p=0.0, teacher=gaussian_teacher(),
    )  # fmt: skip
    exact = MeanFlowPrecond(ExactAverageVelocity())
    loss = objective(exact, data(), None, 0, 1)
    assert loss.shape == (64,) and loss.max() < 1e-24
    perturbed = MeanFlowPrecond(ExactAverageVelocity(bias=0.05))
    assert objective(perturbed, data(), None, 0, 1).min() > 1e-8


def test_finite_difference_tangent_agrees_with_the_jvp():
    objective = MeanFlow(ratio=1.0, norm_p=0.0, teacher=gaussian_teacher())
    perturbed = MeanFlowPrecond(ExactAverageVelocity(bias=0.05))
    torch.manual_seed(1)
    jvp = objective(perturbed, data(), None, 0, 1)
    objective.tangent, objective.epsilon = "finite_difference", 1e-5
    torch.manual_seed(1)
    fd = objective(perturbed, data(), None, 0, 1)
    torch.testing.assert_close(fd, jvp, rtol=1e-6, atol=1e-12)


class PointMass(nn.Module):
    """``u = (z - m) / t`` for data ``delta(m)``: every path is straight, ``u = eps - m``."""

    def __init__(self, m: float = M) -> None:
        super().__init__()
        self.m = m

    def forward(self, z: Tensor, c_noise: Tensor, labels=None, c_noise_to=None) -> Tensor:
        return (z - self.m) / c_noise.reshape(-1, 1, 1, 1)


def test_conditional_velocity_target_is_exact_for_a_point_mass():
    # From data (the paper's eps - x0): for a point mass the conditional velocity is the marginal
    # one, du/dt = 0 along the path, and the loss of the exact model vanishes.
    objective = MeanFlow(ratio=0.5, norm_p=0.0)
    x0 = torch.full((32, 1, 4, 4), M, dtype=F64)
    assert objective(MeanFlowPrecond(PointMass()), x0, None, 0, 1).max() < 1e-24
    assert objective(MeanFlowPrecond(PointMass(M + 0.1)), x0, None, 0, 1).min() > 1e-4


def test_exact_flow_map_composes_and_is_the_oracle_flow():
    phi = MeanFlowPrecond(ExactAverageVelocity())
    oracle = gaussian_teacher()
    x = 80.0 * torch.randn(5, 1, 4, 4, dtype=F64) + M
    one = phi.flow_map(x, 80.0, 0.0)
    two = phi.flow_map(phi.flow_map(x, 80.0, 1.5), 1.5, 0.0)
    torch.testing.assert_close(two, one, rtol=0, atol=1e-12)
    torch.testing.assert_close(one, oracle.flow(x, 80.0, 0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(phi.flow_map(x, 80.0, 2.0), oracle.flow(x, 80.0, 2.0))
    assert torch.equal(phi.flow_map(x, 3.0, 3.0), x)  # Phi(x, sigma, sigma) = x
    torch.testing.assert_close(phi(x, torch.full((5,), 80.0, dtype=F64)), one)  # D = Phi(., 0)
    for steps in (1, 2, 4):  # any number of jumps of the exact map lands on the same point
        sigmas = flow_uniform_sigmas(steps, 80.0)
        torch.testing.assert_close(flowmap(phi, x, sigmas), one, rtol=0, atol=1e-12)


def test_flow_matching_coordinates():
    t = torch.tensor([0.0, 0.25, 0.5, 0.9], dtype=F64)
    torch.testing.assert_close(fm_time(fm_sigma(t)), t)
    assert fm_time(torch.tensor(float("inf"))) == 1
    sigmas = flow_uniform_sigmas(2)
    torch.testing.assert_close(
        fm_time(sigmas), torch.tensor([1 - 1e-6, (1 - 1e-6) / 2, 0], dtype=F64)
    )


def test_time_pairs_follow_the_papers_laws():
    objective = MeanFlow(p_mean_t=-0.4, p_std_t=1.0, ratio=0.25)
    torch.manual_seed(0)
    t, r = objective.sample_tr(20000, torch.device("cpu"))
    assert bool((r <= t).all()) and t.dtype == F64
    assert abs((r == t).double().mean().item() - 0.75) < 0.01
    clipped = MeanFlow(p_mean_t=-0.6, p_std_t=1.6, p_mean_r=-4.0, ratio=0.75, time_pairs="clipped")
    t, r = clipped.sample_tr(20000, torch.device("cpu"))
    assert bool((r <= t).all())
    assert abs(torch.logit(t).mean().item() + 0.6) < 0.05  # t keeps its own law
    # r = t w.p. 0.25, and where the drawn r exceeds t: P(N(-4, 1.6^2) > N(-0.6, 1.6^2)).
    p_above = 0.5 * math.erfc(3.4 / (1.6 * 2**0.5) / 2**0.5)
    assert abs((r == t).double().mean().item() - (0.25 + 0.75 * p_above)) < 0.01


class LabelVelocity(nn.Module):
    """``u = k + 1`` for class ``k``, 0.5 for the null label, whatever ``z, t, r``."""

    def forward(self, z: Tensor, c_noise: Tensor, labels=None, c_noise_to=None) -> Tensor:
        k = (labels * torch.arange(1, labels.shape[1] + 1, dtype=z.dtype)).sum(1)
        value = torch.where(labels.sum(1) > 0, k, torch.full_like(k, 0.5))
        return value.reshape(-1, 1, 1, 1).expand_as(z)


def test_guidance_is_folded_into_the_target():
    # r = t: the target is v~ = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | 0)
    # inside the interval, v outside (Eq. 13-21 with kappa).
    omega, kappa = 0.2, 0.5
    objective = MeanFlow(
        ratio=0.0, norm_p=0.0, guidance_scale=omega, guidance_mixing=kappa,
        guidance_interval=(0.0, 0.75),
    )  # fmt: skip
    x0 = torch.zeros(64, 1, 2, 2, dtype=F64)
    labels = torch.eye(3, dtype=F64)[torch.arange(64) % 3]
    torch.manual_seed(3)
    loss = objective(MeanFlowPrecond(LabelVelocity()), x0, labels, 0, 1)
    torch.manual_seed(3)
    t, _ = objective.sample_tr(64, torch.device("cpu"))
    eps = objective.draws.randn_like(x0)
    u_c = (torch.arange(64) % 3 + 1).to(F64).reshape(-1, 1, 1, 1)
    guided = omega * eps + kappa * u_c + (1 - omega - kappa) * 0.5
    v_tilde = torch.where((t <= 0.75).reshape(-1, 1, 1, 1), guided, eps)
    torch.testing.assert_close(loss, (u_c - v_tilde).square().flatten(1).sum(1))


TWO_TIME = {
    "adm": lambda: adm(label_dim=10, second_time=True),
    "ddpmpp": lambda: ncsnpp(label_dim=10, encoder_type="skip", second_time=True),
}


@pytest.mark.parametrize("name", TWO_TIME)
def test_two_time_network_jvp_equals_central_difference(name):
    # MeanFlow's tangent (v, 1, 0) on (z, t, r) through the precond and a two-time network.
    torch.manual_seed(0)
    net = TWO_TIME[name]().double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    phi = MeanFlowPrecond(net)
    labels = labels_for(net)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 1, 8, 8, generator=g, dtype=F64)
    t, r = torch.tensor([0.3, 0.6, 0.95], dtype=F64), torch.tensor([0.1, 0.6, 0.2], dtype=F64)
    v = torch.randn(3, 1, 8, 8, generator=g, dtype=F64)

    def f(z_: Tensor, t_: Tensor, r_: Tensor) -> Tensor:
        return phi.average_velocity(z_, t_, r_, labels)

    tangents = (v, torch.ones_like(t), torch.zeros_like(r))
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        _, du = torch.func.jvp(f, (z, t, r), tangents)
        fd = central_difference(f, (z, t, r), tangents)
    assert rel_error(du, fd) < 1e-6


def test_second_time_is_zero_at_init_and_refused_without_it():
    torch.manual_seed(0)
    plain = tiny_adm().eval()
    two = tiny_adm(second_time=True).eval()
    two.load_state_dict(plain.state_dict(), strict=False)
    x, c, labels = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7]), torch.eye(10)[:2]
    torch.testing.assert_close(two(x, c, labels, torch.tensor([0.1, 0.5])), plain(x, c, labels))
    with pytest.raises(UserError, match="second_time: true"):
        plain(x, c, labels, torch.tensor([0.1, 0.5]))


def test_flowmap_sampler_needs_a_flow_map_and_the_sampler_grid():
    with pytest.raises(UserError, match="needs a flow map"):
        flowmap(gaussian_teacher(), torch.zeros(1, 1, 4, 4, dtype=F64), flow_uniform_sigmas(1))
    phi = MeanFlowPrecond(ExactAverageVelocity()).double()
    sampler = Sampler(flowmap, num_steps=2, sigma_max=1e6, schedule="flow")
    grid = sampler.grid(phi)
    assert len(grid) == 3 and grid[-1] == 0


class ExactVelocity(ExactAverageVelocity):
    """The instantaneous velocity ``v(z_t, t)`` of ``N(m, s^2 I)``: ``u`` at ``r = t``."""

    def forward(self, z: Tensor, c_noise: Tensor, labels=None, c_noise_to=None) -> Tensor:
        return super().forward(z, c_noise, labels, torch.zeros_like(c_noise))


def test_flow_matching_velocity_model_is_the_exact_denoiser():
    # D(x; sigma) = z_t - t v with z_t = x / (1 + sigma): the exact velocity gives the exact D.
    precond = FlowMatchingPrecond(ExactVelocity(), noise_scale=1.0)
    x = M + torch.randn(4, 1, 4, 4, dtype=F64) * 3.0
    sigma = torch.tensor([0.1, 1.0, 5.0, 80.0], dtype=F64)
    torch.testing.assert_close(precond(x, sigma), gaussian_teacher()(x, sigma))
    assert torch.equal(precond(x, torch.zeros(4, dtype=F64)), x)  # D(x, 0) = x
    # and it equals the flow map of the same velocity at sigma_to = 0 along a straight step
    phi = MeanFlowPrecond(ExactVelocity())
    torch.testing.assert_close(phi.flow_map(x, sigma, 0.0), precond(x, sigma))


def test_classifier_free_guidance_guides_the_jump():
    # Phi is affine in u, so guiding u is guiding Phi: Phi_u + s (Phi_c - Phi_u), one batch.
    from cm.guidance import ClassifierGuidance, cfg

    phi = MeanFlowPrecond(LabelVelocity())
    x = torch.randn(3, 1, 2, 2, dtype=F64)
    labels = torch.eye(3, dtype=F64)
    guided = cfg(phi, 2.0).flow_map(x, 5.0, 1.0, labels)
    cond, uncond = phi.flow_map(x, 5.0, 1.0, labels), phi.flow_map(x, 5.0, 1.0, labels * 0)
    torch.testing.assert_close(guided, uncond + 2.0 * (cond - uncond))
    sigmas = flow_uniform_sigmas(2, 80.0)  # the sampler makes the same guided jumps
    g = cfg(phi, 2.0)
    two = g.flow_map(g.flow_map(x * 80, sigmas[0], sigmas[1], labels), sigmas[1], 0.0, labels)
    torch.testing.assert_close(flowmap(g, x * 80, sigmas, labels), two)
    # A gradient-guided wrapper must not fall through to the unguided jump.
    assert getattr(ClassifierGuidance(phi, lambda x, s: x.sum(), 1.0), "flow_map", None) is None
