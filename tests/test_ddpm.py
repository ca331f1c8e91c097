import math

import pytest
import torch
from torch import nn

from cm.objectives import DDPMLoss
from cm.precond import IDDPMPrecond, VPPrecond
from cm.schedules import cosine_sigmas, vp_betas, vp_sigmas, vp_timestep_sigmas
from cm.solvers import ddim, ddpm, euler
from cm.solvers.ancestral import ancestral_sigmas


class LinearEps(nn.Module):
    """A smooth fake eps-network ``eps(x_t, t)``; ``2C`` outputs give a learned variance too."""

    def __init__(self, channels: int = 1, learned: bool = False) -> None:
        super().__init__()
        self.learned = learned
        self.a = nn.Parameter(torch.tensor(0.7))
        self.b = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, c_noise, labels=None):
        eps = self.a * x + self.b * torch.tanh(c_noise / 500).view(-1, 1, 1, 1)
        if not self.learned:
            return eps
        return torch.cat([eps, torch.tanh(x + c_noise.view(-1, 1, 1, 1) / 1000)], dim=1)


def test_vp_schedules():
    lin = vp_betas("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    cos = vp_betas("cosine", 1000)
    assert cos.max().item() == pytest.approx(0.999)
    s = 0.008
    abar = torch.cumprod(1 - cos, 0)
    expected = (
        math.cos((1 / 1000 + s) / (1 + s) * math.pi / 2) ** 2
        / math.cos(s / (1 + s) * math.pi / 2) ** 2
    )
    assert abar[0].item() == pytest.approx(expected, rel=1e-12)
    sig = vp_sigmas(lin)
    assert torch.allclose(1 / (1 + sig**2), torch.cumprod(1 - lin, 0), rtol=1e-12)
    grid = vp_timestep_sigmas(sig, 10)
    assert grid[0] == sig[-1] and grid[-2] == sig[0] and grid[-1] == 0 and len(grid) == 11
    # Progressive distillation: the 2n grid contains the n grid.
    assert torch.allclose(cosine_sigmas(8)[::2], cosine_sigmas(4), rtol=1e-12)
    assert cosine_sigmas(4)[0].item() == pytest.approx(80.0)


def test_vp_precond_conversions_exact():
    """eps <-> x0 <-> D: D = x - sigma eps, and c_in x is the DDPM state x_t."""
    den = VPPrecond(LinearEps(), "linear", 1000).double()
    torch.manual_seed(0)
    x0, n = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    t = torch.tensor([0, 10, 500, 998, 999])
    sigma = den.sigmas[t].float()
    assert torch.equal(den.timestep(sigma), t)
    x = x0 + sigma.view(-1, 1, 1, 1) * n
    abar = torch.cumprod(1 - den.betas, 0)[t].view(-1, 1, 1, 1).float()
    x_vp = abar.sqrt() * x0 + (1 - abar).sqrt() * n
    assert torch.allclose(x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt(), x_vp, atol=1e-5)
    eps, v = den.predict(x, sigma)
    assert v is None
    D_x = den(x, sigma)
    assert torch.allclose(D_x, x - sigma.view(-1, 1, 1, 1) * eps, atol=0, rtol=0)
    # The network sees the integer timestep.
    seen = {}
    den.net.register_forward_hook(lambda m, a, o: seen.update(c_noise=a[1]))
    den(x, sigma)
    assert torch.equal(seen["c_noise"], t.float())
    # With a perfect eps, D recovers x0 (up to float rounding).
    perfect = VPPrecond(LinearEps(), "linear", 1000)
    perfect.predict = lambda x_, s_, labels=None: (n, None)
    assert torch.allclose(perfect(x, sigma), x0, atol=1e-3)


def _vp_ddim_reference(den, x_T_vp, timesteps, eta=0.0, noises=None):
    """DDIM (Song et al. 2021a, Eq. 12) in VP coordinates, straight from the paper."""
    abar = torch.cumprod(1 - den.betas, 0)
    x = x_T_vp
    for i, t in enumerate(timesteps):
        a_t = abar[t]
        a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0).double()
        sigma = den.sigmas[t]
        eps, _ = den.predict(x / a_t.sqrt(), sigma.expand(x.shape[0]))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        s_t = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - s_t**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(timesteps):
            x = x + s_t * noises[i]
    return x


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_eta0_is_euler_and_matches_vp_form(schedule):
    den = VPPrecond(LinearEps(), schedule, 1000).double()
    grid = vp_timestep_sigmas(den.sigmas, 25)
    timesteps = torch.linspace(999, 0, 25).round().long().tolist()
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64) * grid[0]
    out = ddim(den, x, grid)
    assert torch.equal(out, ddim(den, x, grid))  # deterministic
    assert torch.allclose(out, euler(den, x, grid), rtol=1e-12, atol=1e-12)
    abar_T = 1 / (1 + grid[0] ** 2)
    ref = _vp_ddim_reference(den, x * abar_T.sqrt(), timesteps)
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9)


def test_ddim_eta1_is_ddpm_posterior():
    """eta = 1 equals the VP form with sigma_t^2 = beta~ (and ddpm(fixed="small"))."""
    den = VPPrecond(LinearEps(), "linear", 1000).double()
    grid = vp_timestep_sigmas(den.sigmas, 10)
    timesteps = torch.linspace(999, 0, 10).round().long().tolist()
    torch.manual_seed(1)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64) * grid[0]
    noises = [torch.randn_like(x) for _ in range(10)]
    it = iter(noises)
    out = ddim(den, x, grid, eta=1.0, noise=lambda _: next(it))
    it = iter(noises)
    out2 = ddpm(den, x, grid, fixed="small", noise=lambda _: next(it), clip_denoised=False)
    # sigma_up = s_t / sqrt(abar'): the VP form adds s_t z with the same z.
    ref = _vp_ddim_reference(den, x * (1 / (1 + grid[0] ** 2)).sqrt(), timesteps, 1.0, noises)
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9)
    assert torch.allclose(out2, out, rtol=1e-9, atol=1e-9)
    assert ancestral_sigmas(2.0, 1.0, 0.0) == (1.0, 0.0)


def _gaussian_kl(m1, v1, m2, v2):
    return 0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)


def test_vlb_terms_against_hand_computed_kl():
    den = IDDPMPrecond(LinearEps(learned=True), "cosine", 1000).double()
    obj = DDPMLoss("hybrid")
    obj.bind(den)
    torch.manual_seed(2)
    x0 = torch.rand(4, 1, 4, 4, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 7, 400, 999])
    n = torch.randn_like(x0)
    sigma = den.sigmas[t].view(-1, 1, 1, 1)
    x = x0 + sigma * n
    got = obj.vlb_term(den, x0, x, t, None)
    # Ho et al. 2020, Eq. 6-7 and Nichol & Dhariwal 2021, Eq. 15, in VP coordinates.
    betas = den.betas
    abar = torch.cumprod(1 - betas, 0)
    a_t, a_prev, b_t = abar[t], abar[t - 1], betas[t]
    a_t, a_prev, b_t = (v.view(-1, 1, 1, 1) for v in (a_t, a_prev, b_t))
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * n
    coef_x0 = a_prev.sqrt() * b_t / (1 - a_t)
    coef_xt = (1 - b_t).sqrt() * (1 - a_prev) / (1 - a_t)
    mean_q = coef_x0 * x0 + coef_xt * x_t
    var_q = b_t * (1 - a_prev) / (1 - a_t)
    eps, v = den.predict(x, sigma.flatten())
    mean_p = (x_t - b_t / (1 - a_t).sqrt() * eps) / (1 - b_t).sqrt()
    var_p = torch.exp(v * b_t.log() + (1 - v) * var_q.log())
    want = _gaussian_kl(mean_q, var_q, mean_p, var_p).flatten(1).mean(1) / math.log(2)
    assert torch.allclose(got, want, rtol=1e-6)


def test_decoder_nll_at_t0():
    den = IDDPMPrecond(LinearEps(learned=True), "linear", 1000).double()
    obj = DDPMLoss("vlb")
    obj.bind(den)
    x0 = torch.tensor([-1.0, -1 + 2 / 255 * 100, 1.0]).view(1, 1, 1, 3).double()
    t = torch.tensor([0])
    x = x0 + den.sigmas[0] * 0.3
    got = obj.vlb_term(den, x0, x, t, None)
    eps, v = den.predict(x, den.sigmas[:1])
    mean = x - den.sigmas[0] * eps
    b = den.betas
    beta_tilde1 = b[1] * (1 - (1 - b[0])) / (1 - (1 - b[0]) * (1 - b[1]))
    std = torch.exp(0.5 * (v * b[0].log() + (1 - v) * beta_tilde1.log()))
    normal = torch.distributions.Normal(mean, std)
    hi = torch.where(x0 > 0.999, torch.ones_like(x0), normal.cdf(x0 + 1 / 255))
    lo = torch.where(x0 < -0.999, torch.zeros_like(x0), normal.cdf(x0 - 1 / 255))
    want = -(hi - lo).log().mean() / math.log(2)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_hybrid_stop_grad_and_importance_sampling():
    den = IDDPMPrecond(LinearEps(learned=True), "cosine", 20)
    obj = DDPMLoss("hybrid", importance_sampling=True, history=2)
    obj.bind(den)
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    # L_vlb in the hybrid loss does not train the mean.
    x, t = x0 + den.sigmas[5] * torch.randn_like(x0), torch.full((8,), 5)
    L = obj.vlb_term(den, x0, x, t, None, *den.predict(x, den.sigmas[t].float()), detach_mean=True)
    eps_grad = torch.autograd.grad(L.sum(), den.net.b, allow_unused=True)[0]
    L_free = obj.vlb_term(den, x0, x, t, None)
    free_grad = torch.autograd.grad(L_free.sum(), den.net.b)[0]
    # net.b only moves eps; with the mean detached its only path is through v (none here).
    assert eps_grad is None or eps_grad.abs().item() < 1e-12
    assert free_grad.abs().item() > 0
    # Uniform until each t has `history` values, then p_t ~ sqrt(E[L_t^2]).
    assert torch.equal(obj.sample_timesteps(4, 20, x0.device)[1], torch.ones(4))
    obj.loss_history.copy_(torch.arange(1, 21).double().view(-1, 1).expand(20, 2))
    obj.history_count.fill_(2)
    torch.manual_seed(0)
    t, w = obj.sample_timesteps(4000, 20, x0.device)
    assert t.float().mean() > 12  # biased towards large L_t
    p = torch.arange(1, 21).double() / 210 * (1 - 0.001) + 0.001 / 20
    assert torch.allclose(w, (1 / (20 * p[t])).float())
    loss = obj(den, x0, None, 0, 1)
    assert loss.shape == (8,) and set(obj.metrics()) == {"mse", "vlb_t"}


def test_bits_per_dim_exact_and_stratified():
    den = IDDPMPrecond(LinearEps(learned=True), "cosine", 50).double()
    obj = DDPMLoss("hybrid")
    obj.bind(den)
    x0 = torch.rand(16, 1, 4, 4, dtype=torch.float64) * 2 - 1
    torch.manual_seed(0)
    exact = obj.bits_per_dim(den, x0, None)
    obj.bpd_timesteps = 10
    estimates = torch.stack([obj.bits_per_dim(den, x0, None).mean() for _ in range(20)])
    assert torch.isfinite(exact).all() and (exact > 0).all()
    assert estimates.mean().item() == pytest.approx(exact.mean().item(), rel=0.1)


def test_ddpm_sampler_learned_variance_and_errors():
    den = IDDPMPrecond(LinearEps(learned=True), "cosine", 100)
    grid = vp_timestep_sigmas(den.sigmas, 100)
    x = torch.randn(2, 1, 4, 4) * grid[0]
    g = torch.Generator().manual_seed(0)
    out = ddpm(den, x, grid, noise=lambda y: torch.randn(y.shape, generator=g))
    assert torch.isfinite(out).all() and out.abs().max() <= 1  # x0_hat clipped (Ho et al.)
    g.manual_seed(0)
    raw = ddpm(den, x, grid, noise=lambda y: torch.randn(y.shape, generator=g), clip_denoised=False)
    assert raw.abs().max() > 1  # this fake network overshoots the data range
    clipped = ddim(den, x, grid, clip_denoised=True)
    assert clipped.abs().max() <= 1 and not torch.equal(clipped, ddim(den, x, grid))
    with pytest.raises(ValueError, match="IDDPMPrecond"):
        DDPMLoss("hybrid").bind(VPPrecond(LinearEps()))
    with pytest.raises(ValueError, match="VPPrecond"):
        DDPMLoss().bind(nn.Identity())


def _history_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    obj = DDPMLoss("hybrid", importance_sampling=True, history=2)
    obj.bind(IDDPMPrecond(LinearEps(learned=True), "linear", 4))
    obj._update_history(torch.tensor([rank]), torch.tensor([float(rank + 1)]))
    torch.save((obj.loss_history, obj.history_count), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_importance_history_gathers_all_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_history_worker, args=(2, port, str(tmp_path)), nprocs=2)
    hist0, count0 = torch.load(tmp_path / "0.pt", weights_only=True)
    hist1, count1 = torch.load(tmp_path / "1.pt", weights_only=True)
    assert torch.equal(hist0, hist1) and torch.equal(count0, count1)  # one sampler on all ranks
    assert count0.tolist() == [1, 1, 0, 0]  # t = 0 from rank 0 and t = 1 from rank 1
    assert hist0[0, -1] == 1 and hist0[1, -1] == 2


def test_sampler_rounds_grids_of_discrete_models():
    from cm.solvers import Sampler

    den = VPPrecond(LinearEps(), "linear", 1000)
    grid = Sampler(num_steps=10, sigma_max=80.0).grid(den)  # a Karras grid, rounded
    assert grid[-1] == 0 and torch.isin(grid[:-1], den.sigmas).all()
    table = Sampler(num_steps=50, schedule="vp").grid(den)
    assert torch.equal(table, vp_timestep_sigmas(den.sigmas, 50))  # trained levels stay put
    assert torch.equal(Sampler(num_steps=10).grid(None), Sampler(num_steps=10).grid(nn.Identity()))
