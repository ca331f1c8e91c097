"""sCT/sCD (Lu & Song 2024) against closed forms: TrigFlow's parameterization, the tangent of the
exact consistency function of one Gaussian (``cm.oracle``), the JVP against a finite difference,
and the loss's pieces (warm-up, normalisation, adaptive weighting, draws, dropout mask)."""

import math

import pytest
import torch
from helpers import tiny_adm
from torch import Tensor, nn

from cm.objectives import ContinuousConsistencyDistillation, ContinuousConsistencyTraining
from cm.objectives.base import SampleDraws
from cm.oracle import GaussianMixture
from cm.precond import EDMPrecond, TrigFlowPrecond, trigflow_flow

SIGMA_D = 0.5
M, S = 0.3, 0.2  # the data: N(M, S^2 I) per pixel


class ExactConsistency(nn.Module):
    """The consistency function of ``N(m, s^2 I)``: ``f(x, sigma) = m + (x - m) s / sqrt(s^2 +
    sigma^2)``, the exact PF-ODE endpoint at sigma = 0 (``GaussianMixture.flow``), in float64."""

    def __init__(self, m: float = M, s: float = S) -> None:
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return self.m + (x - self.m) * self.s / (self.s**2 + sigma**2).sqrt()


def gaussian_teacher() -> GaussianMixture:
    """The exact denoiser of ``N(M, S^2 I)`` on 1x4x4 images."""
    f64 = torch.float64
    return GaussianMixture(torch.full((1, 1, 4, 4), M, dtype=f64), torch.tensor([S], dtype=f64))


def trajectory(n: int = 6, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x0, z, t, x_t)`` in float64 with ``t`` spanning ``(0, pi/2)``."""
    g = torch.Generator().manual_seed(seed)
    x0 = M + S * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    z = SIGMA_D * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.linspace(0.02, 1.55, n, dtype=torch.float64)
    c = t.view(-1, 1, 1, 1)
    return x0, z, t, torch.cos(c) * x0 + torch.sin(c) * z


def scd(**kwargs) -> ContinuousConsistencyDistillation:
    return ContinuousConsistencyDistillation(gaussian_teacher(), init_from_teacher=False, **kwargs)


def tangent(objective, model: nn.Module, tangent_kind: str = "jvp") -> tuple[Tensor, Tensor]:
    """Unnormalised ``g = cos t df/dt`` (r = 1) of ``model`` along the teacher's ODE, and ``F``."""
    objective.tangent = tangent_kind
    x0, z, t, x_t = trajectory()
    dxt_dt = objective.velocity(x0, z, x_t, t, None)
    F = objective.flow(model, x_t, t, None)
    dF = objective.flow_tangent(model, x_t, t, dxt_dt, None)
    return objective.tangent_target(F, dF, x_t, t, dxt_dt, 1.0), F


def test_trigflow_precond_is_sCM_parameterization_and_exact_at_the_boundary():
    torch.manual_seed(0)
    net = tiny_adm(label_dim=0).double().eval()
    precond = TrigFlowPrecond(net, SIGMA_D)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert torch.equal(precond(x, torch.zeros(3, dtype=torch.float64)), x)  # f(x, 0) = x
    t = torch.tensor([0.1, 0.8, 1.5], dtype=torch.float64)
    c = t.view(-1, 1, 1, 1)
    x_t = torch.cos(c) * x
    F = net(x_t / SIGMA_D, t, None)
    f = torch.cos(c) * x_t - torch.sin(c) * SIGMA_D * F  # sCM, Eq. 4
    torch.testing.assert_close(precond(x_t / torch.cos(c), SIGMA_D * torch.tan(t)), f)
    torch.testing.assert_close(trigflow_flow(precond, x_t, t, None, SIGMA_D), F)


def test_edm_network_reads_as_its_own_trigflow_F():
    # EDM's c_skip = cos^2 t and c_out = sigma_d sin t: F_trig is the raw network's output.
    torch.manual_seed(0)
    net = tiny_adm(label_dim=0).double().eval()
    x_t = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([1e-3, 1.2], dtype=torch.float64)
    F = trigflow_flow(EDMPrecond(net, SIGMA_D), x_t, t, None, SIGMA_D)
    c_noise = 0.25 * torch.log(SIGMA_D * torch.tan(t))
    torch.testing.assert_close(F, net(x_t / SIGMA_D, c_noise, None))


def test_exact_consistency_function_has_zero_sCD_tangent():
    objective = scd()
    g, F = tangent(objective, ExactConsistency())
    assert g.abs().max() < 1e-12 * (1 + F.abs().max())
    g_fd, _ = tangent(objective, ExactConsistency(), "finite_difference")
    assert g_fd.abs().max() < 1e-6
    g_bad, _ = tangent(objective, ExactConsistency(s=S * 1.05))
    assert g_bad.abs().max() > 1e-3


def test_teacher_velocity_is_the_exact_pf_ode():
    # d/dt of the exact trajectory through x_t, by central difference of the closed-form flow.
    objective = scd()
    mixture = gaussian_teacher()
    x0, z, t, x_t = trajectory()
    v = objective.velocity(x0, z, x_t, t, None)
    h = 1e-6
    for i in range(len(t)):
        sigma = SIGMA_D * math.tan(t[i])
        ends = []
        for s in (h, -h):
            ti = float(t[i]) + s
            x_edm = mixture.flow(x_t[i : i + 1] / math.cos(t[i]), sigma, SIGMA_D * math.tan(ti))
            ends.append(math.cos(ti) * x_edm)
        torch.testing.assert_close(
            v[i : i + 1], (ends[0] - ends[1]) / (2 * h), rtol=1e-6, atol=1e-7
        )


def test_exact_model_has_zero_loss_and_perturbed_model_positive():
    for model, zero in ((ExactConsistency(), True), (ExactConsistency(s=S * 1.05), False)):
        objective = scd(tangent_warmup_steps=0, adaptive_weighting=False)
        objective.draws.set(0, 0, 8)
        x0 = M + S * torch.randn(8, 1, 4, 4, dtype=torch.float64)
        loss = objective(model, x0, None, step=0, total_steps=1)
        assert loss.shape == (8,) and loss.dtype == torch.float64
        assert (loss.max() < 1e-24) if zero else (loss.min() > 1e-9)


def randomized(net: nn.Module) -> nn.Module:
    """``net`` in float64 eval mode with every parameter random (no zero-initialised output)."""
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.double().eval()


def test_jvp_tangent_matches_finite_difference_on_a_network():
    torch.manual_seed(0)
    model = TrigFlowPrecond(randomized(tiny_adm(label_dim=0)), SIGMA_D)
    objective = ContinuousConsistencyTraining(tangent_warmup_steps=0)
    x0, z, t, x_t = trajectory()
    x_t = torch.nn.functional.interpolate(x_t, size=8)
    x0, z = (torch.nn.functional.interpolate(v, size=8) for v in (x0, z))
    dxt_dt = objective.velocity(x0, z, x_t, t, None)
    dF = objective.flow_tangent(model, x_t, t, dxt_dt, None)
    objective.tangent, objective.epsilon = "finite_difference", 1e-5
    dF_fd = objective.flow_tangent(model, x_t, t, dxt_dt, None)
    assert (dF - dF_fd).norm() / dF.norm() < 1e-6


def test_sct_velocity_is_conditional_velocity():
    objective = ContinuousConsistencyTraining()
    x0, z, t, x_t = trajectory()
    v = objective.velocity(x0, z, x_t, t, None)
    c = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(v, torch.cos(c) * z - torch.sin(c) * x0)  # d/dt of x_t


def test_warmup_normalisation_and_weighting():
    objective = ContinuousConsistencyTraining(tangent_warmup_steps=100)
    assert [objective.warmup(s) for s in (0, 50, 100, 500)] == [0, 0.5, 1, 1]
    g = torch.randn(4, 3, 8, 8) * 10
    gn = objective.normalize(g)
    rms = g.flatten(1).norm(dim=1) / math.sqrt(g[0].numel())
    torch.testing.assert_close(gn, g / (rms + 0.1).view(-1, 1, 1, 1))
    objective.tangent_norm = "l2"
    torch.testing.assert_close(
        objective.normalize(g), g / (g.flatten(1).norm(dim=1) + 0.1).view(-1, 1, 1, 1)
    )
    head = objective.weight_head
    assert head(torch.rand(5)).abs().max() == 0  # zero-initialised: uniform weighting at first
    assert objective.trainable_parameters() == list(head.parameters())


def test_loss_gradient_reaches_model_and_weighting_head():
    torch.manual_seed(0)
    model = TrigFlowPrecond(tiny_adm(label_dim=10), SIGMA_D)
    objective = ContinuousConsistencyTraining(tangent_warmup_steps=0)
    x0, labels = torch.randn(4, 1, 8, 8) * 0.5, torch.eye(10)[:4]
    loss = objective(model, x0, labels, step=10, total_steps=100).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in objective.trainable_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_draws_are_world_size_invariant():
    # Two half batches at offsets 0 and 2 of a global batch of 4 give the whole batch's losses.
    torch.manual_seed(0)
    model = TrigFlowPrecond(tiny_adm(label_dim=0).double().eval(), SIGMA_D)
    x0 = torch.randn(4, 1, 8, 8, dtype=torch.float64) * 0.5
    objective = ContinuousConsistencyTraining(adaptive_weighting=False).double()

    def loss(offset: int, n: int) -> Tensor:
        objective.draws.set(123, offset, 4)
        return objective(model, x0[offset : offset + n], None, step=5, total_steps=10)

    whole = loss(0, 4)
    torch.testing.assert_close(torch.cat([loss(0, 2), loss(2, 2)]), whole)
    assert isinstance(objective.draws, SampleDraws)


def test_tangent_pass_shares_the_dropout_mask():
    # With dropout on, the JVP's primal equals the gradient pass's F only if the masks agree.
    torch.manual_seed(0)
    model = TrigFlowPrecond(tiny_adm(label_dim=0, dropout=0.5).double().train(), SIGMA_D)
    objective = ContinuousConsistencyTraining()
    x_t = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.3, 1.0], dtype=torch.float64)
    with torch.random.fork_rng():
        F = objective.flow(model, x_t, t, None)
    again = objective.flow(model, x_t, t, None)
    torch.testing.assert_close(F, again)


class LabelShift(nn.Module):
    """A denoiser whose class shifts its output; all-zero labels are "no class"."""

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        shift = 0 if labels is None else (labels * torch.arange(labels.shape[1])).sum(1)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return x / (1 + sigma**2) + 0.1 * torch.as_tensor(shift, dtype=x.dtype).reshape(-1, 1, 1, 1)


def test_guided_teacher_velocity():
    x0, z, t, x_t = trajectory(4)
    labels = torch.eye(3, dtype=torch.float64)[[1, 2, 1, 2]]
    guided = ContinuousConsistencyDistillation(LabelShift(), 2.0, init_from_teacher=False)
    plain = ContinuousConsistencyDistillation(LabelShift(), init_from_teacher=False)
    v_c = plain.velocity(x0, z, x_t, t, labels)
    v_u = plain.velocity(x0, z, x_t, t, torch.zeros_like(labels))
    assert (v_c - v_u).abs().min() > 1e-3
    torch.testing.assert_close(guided.velocity(x0, z, x_t, t, labels), v_u + 2 * (v_c - v_u))


@pytest.mark.parametrize("bad", [{"p_std": 0.0}, {"tangent_warmup_steps": -1}])
def test_bad_arguments_are_one_error(bad):
    from cm.errors import UserError

    with pytest.raises(UserError, match="init_args"):
        ContinuousConsistencyTraining(**bad)


def test_float32_tangent_under_bf16_autocast():
    # FastGen's precision_amp_jvp: the tangent pass leaves autocast, the gradient pass keeps it.
    torch.manual_seed(0)
    model = TrigFlowPrecond(randomized(tiny_adm(label_dim=0)).float(), SIGMA_D)
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 1.0], dtype=torch.float64)
    v = torch.randn(2, 1, 8, 8)
    exact = ContinuousConsistencyTraining().flow_tangent(model, x_t, t, v, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = ContinuousConsistencyTraining(tangent_precision="float32")
        low = ContinuousConsistencyTraining().flow_tangent(model, x_t, t, v, None)
        torch.testing.assert_close(full.flow_tangent(model, x_t, t, v, None), exact)
    assert (low - exact).abs().max() > 1e-4  # bf16 really was used otherwise


def test_inverse_sqrt_lr_is_edm2_schedule():
    from cm.schedules import InverseSqrtLR

    p = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=7e-5)
    schedule = InverseSqrtLR(optimizer, decay_steps=4, warmup_steps=2)
    lrs = []
    for _ in range(17):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [7e-5 * min(k / 2, 1) / math.sqrt(max(k / 4, 1)) for k in range(17)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[16] == pytest.approx(7e-5 / 2)  # k = 4 t_ref: half the rate


def test_dsm_on_trigflow_is_the_v_prediction_loss():
    # EDM's lambda(sigma) = 1 / c_out^2: DSM on TrigFlowPrecond is ||F - (dx_t/dt) / sigma_d||^2.
    from cm.objectives import DenoisingScoreMatching

    torch.manual_seed(0)
    model = TrigFlowPrecond(randomized(tiny_adm(label_dim=0)), SIGMA_D)
    x0 = torch.randn(4, 1, 8, 8, dtype=torch.float64) * SIGMA_D
    dsm = DenoisingScoreMatching(sigma_data=SIGMA_D)
    dsm.draws.set(7, 0, 4)
    loss = dsm(model, x0, None, step=0, total_steps=1)
    draws = SampleDraws()
    draws.set(7, 0, 4)
    sigma = (draws.randn(4) * dsm.p_std + dsm.p_mean).exp().double()
    z = SIGMA_D * draws.randn_like(x0)
    t = torch.atan(sigma / SIGMA_D)
    c = t.view(-1, 1, 1, 1)
    x_t, v = torch.cos(c) * x0 + torch.sin(c) * z, torch.cos(c) * z - torch.sin(c) * x0
    F = trigflow_flow(model, x_t, t, None, SIGMA_D)
    torch.testing.assert_close(loss, (F - v / SIGMA_D).pow(2).flatten(1).mean(1), rtol=1e-5, atol=0)
