"""The solver toolbox against exact ODE solutions (``cm.oracle``) and textbook updates."""

import math
from functools import partial

import pytest
import torch

from cm.oracle import GaussianMixture
from cm.schedules import (
    karras_sigmas,
    logsnr_sigmas,
    polynomial_sigmas,
    time_uniform_sigmas,
)
from cm.solvers import (
    Sampler,
    dpm2,
    dpmpp_2m,
    dpmpp_3m,
    edm_stochastic,
    euler,
    euler_ancestral,
    heun,
    ipndm,
    unipc,
)
from cm.solvers.multistep import afs_denoised, dpmpp_step, unipc_step

F64 = torch.float64

# name -> (solver, NFE on a grid of n steps ending in 0)
SOLVERS = {
    "euler": (euler, lambda n: n),
    "heun": (heun, lambda n: 2 * n - 1),
    "dpm2": (dpm2, lambda n: 2 * n - 1),
    "dpmpp_2m": (dpmpp_2m, lambda n: n),
    "dpmpp_3m": (dpmpp_3m, lambda n: n),
    "ipndm": (ipndm, lambda n: n),
    "ipndm_2": (partial(ipndm, max_order=2), lambda n: n),
    "unipc": (unipc, lambda n: n),
    "unipc_3": (partial(unipc, order=3), lambda n: n),
    "edm_stochastic": (partial(edm_stochastic, s_churn=10.0), lambda n: 2 * n - 1),
    "euler_ancestral": (euler_ancestral, lambda n: n),
}
AFS = {"dpmpp_2m": dpmpp_2m, "dpmpp_3m": dpmpp_3m, "ipndm": ipndm, "unipc": unipc}


def mixture() -> GaussianMixture:
    """A smooth 2-component problem in 2 dimensions."""
    means = torch.tensor([[[[-0.5, 0.3]]], [[[0.4, -0.2]]]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.3, 0.4]))


class Counter:
    """Wraps a denoiser and counts its evaluations (NFE)."""

    def __init__(self, denoiser) -> None:
        self.denoiser, self.nfe = denoiser, 0

    def __call__(self, x, sigma, labels=None):
        self.nfe += 1
        return self.denoiser(x, sigma, labels)


@pytest.mark.parametrize("name", SOLVERS)
def test_exact_on_point_mass(name):
    y = torch.randn(3, 1, 2, 2, dtype=F64)
    point = lambda x, sigma, labels=None: y  # noqa: E731 - D = y: straight-line trajectories
    x = y + 80 * torch.randn_like(y)
    for sigmas in (karras_sigmas(7), logsnr_sigmas(5), torch.tensor([80.0, 0.0], dtype=F64)):
        assert torch.allclose(SOLVERS[name][0](point, x, sigmas), y, atol=1e-10)


ODE_SOLVERS = [k for k in SOLVERS if k not in ("edm_stochastic", "euler_ancestral")]


@pytest.mark.parametrize("name", [*ODE_SOLVERS, *[f"{k}_afs" for k in AFS]])
def test_gaussian_data_follows_exact_flow(name):
    # N(0, sd^2 I): x(sigma) = x(sigma0) sqrt(sigma^2 + sd^2) / sqrt(sigma0^2 + sd^2) (gm.flow).
    gm = GaussianMixture(torch.zeros(1, 1, 2, 2, dtype=F64), torch.tensor([0.5]))
    x = torch.randn(8, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 80
    solver = partial(AFS[name[:-4]], afs=True) if name.endswith("_afs") else SOLVERS[name][0]

    def error(n):  # stop at sigma_min = 0.05 (drop the trailing 0)
        out = solver(gm, x, karras_sigmas(n, sigma_min=0.05)[:-1])
        return (out - gm.flow(x, 80.0, 0.05)).abs().max().item()

    assert error(64) < (5e-2 if name == "euler" else 5e-3)
    assert error(64) < error(16) / 3.5


def slope(errors: list[float], steps: list[int]) -> float:
    """Least-squares order ``p`` of ``error ~ C n^-p``."""
    lx = torch.tensor([math.log(n) for n in steps], dtype=F64)
    ly = torch.tensor([math.log(e) for e in errors], dtype=F64)
    lx = lx - lx.mean()
    return float(-(lx * (ly - ly.mean())).sum() / (lx * lx).sum())


@pytest.mark.parametrize(
    "name,low,high",
    [
        ("euler", 0.9, 1.2),
        ("heun", 1.8, 2.6),
        ("dpm2", 1.8, 2.6),
        ("dpmpp_2m", 1.8, 2.6),
        ("unipc", 2.7, 3.6),
        ("unipc_3", 3.5, 5.0),
        # A first-order first step caps the asymptotic global order of 3M and iPNDM at 2, as do
        # 3M's published D2 weight and iPNDM's fixed coefficients on a non-uniform grid (see
        # test_multistep_local_order); their higher-order terms still show before the asymptote.
        ("dpmpp_3m", 2.3, 3.6),
        ("ipndm", 2.1, 3.6),
    ],
)
def test_convergence_order(name, low, high):
    gm = mixture()
    x = torch.randn(16, 1, 1, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 5
    grid = lambda n: karras_sigmas(n, sigma_min=0.2, sigma_max=5.0)[:-1]  # noqa: E731
    reference = heun(gm, x, grid(2000))
    steps = [16, 32, 64]
    errors = [(SOLVERS[name][0](gm, x, grid(n)) - reference).abs().max().item() for n in steps]
    assert low < slope(errors, steps) < high


def _history(gm, x0, sigmas):
    """Exact states and denoised values along one Gaussian's PF-ODE trajectory."""
    xs = [gm.flow(x0, float(sigmas[0]), float(s)) for s in sigmas]
    return xs, [gm(x, float(s)) for x, s in zip(xs, sigmas, strict=True)]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_multistep_local_order(order):
    # From exact history, one step of order p errs O(h^(p+1)): halving h divides by 2^(p+1).
    gm = GaussianMixture(torch.full((1, 1, 2, 2), 0.2, dtype=F64), torch.tensor([0.5]))
    x0 = torch.randn(4, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(1)) * 2

    def local_error(h, step):
        sigmas = [2.0 * math.exp(-h * k) for k in range(order + 1)]  # uniform in lambda
        xs, Ds = _history(gm, x0, sigmas)
        out = step(xs[-2], sigmas[-2], sigmas[-1], Ds[:-1], sigmas[:-1])
        return (out - xs[-1]).abs().max().item()

    # DPM-Solver++(3M) as published (DPM-Solver code, k-diffusion) weights its second divided
    # difference D2 by phi_3 where a Taylor expansion asks for 2 phi_3: its step is O(h^3) locally,
    # like 2M's, only with a smaller constant. UniPC's predictor solves the order conditions.
    for step, p in ((dpmpp_step, min(order, 2)), (unipc_step, order)):
        ratio = local_error(0.05, step) / local_error(0.025, step)
        assert ratio == pytest.approx(2 ** (p + 1), rel=0.2)
    # UniC with the exact D at the new point raises the order by one.
    corrected = lambda x, s, sn, D, sh: unipc_step(x, s, sn, D, sh, gm(gm.flow(x, s, sn), sn))  # noqa: E731
    ratio = local_error(0.05, corrected) / local_error(0.025, corrected)
    assert ratio == pytest.approx(2 ** (order + 2), rel=0.25)


def test_textbook_updates():
    gm = mixture()
    x = torch.randn(5, 1, 1, 2, dtype=F64, generator=torch.Generator().manual_seed(2)) * 10
    sigmas = karras_sigmas(6, sigma_min=0.1, sigma_max=10.0)
    s = sigmas.tolist()
    D = lambda x, sigma: gm(x, sigma)  # noqa: E731
    d = lambda x, sigma: (x - gm(x, sigma)) / sigma  # noqa: E731

    xe, xh = x, x
    for a, b in zip(s[:-1], s[1:], strict=True):
        xe = xe + (b - a) * d(xe, a)
        x_euler = xh + (b - a) * d(xh, a)
        xh = x_euler if b == 0 else xh + (b - a) / 2 * (d(xh, a) + d(x_euler, b))
    assert torch.allclose(euler(gm, x, sigmas), xe, atol=1e-12)
    assert torch.allclose(heun(gm, x, sigmas), xh, atol=1e-12)

    # DPM-Solver++(2M), Lu et al. 2022b, Alg. 2 in VE form with t = sigma, lambda = -log sigma.
    xm, old = x, None
    for i, (a, b) in enumerate(zip(s[:-1], s[1:], strict=True)):
        den = D(xm, a)
        if old is None or b == 0:
            xm = (b / a) * xm - math.expm1(-(math.log(a) - math.log(b) if b else math.inf)) * den
        else:
            h = math.log(a) - math.log(b)
            r = (math.log(s[i - 1]) - math.log(a)) / h
            xm = (b / a) * xm - math.expm1(-h) * ((1 + 1 / (2 * r)) * den - old / (2 * r))
        old = den
    assert torch.allclose(dpmpp_2m(gm, x, sigmas), xm, atol=1e-12)

    # iPNDM (Zhang & Chen 2023): Adams-Bashforth 1, 2, 3, 4, 4, ... on d.
    xi, ds = x, []
    for a, b in zip(s[:-1], s[1:], strict=True):
        ds.insert(0, d(xi, a))
        k = min(len(ds), 4)
        if k == 1:
            slope_ = ds[0]
        elif k == 2:
            slope_ = (3 * ds[0] - ds[1]) / 2
        elif k == 3:
            slope_ = (23 * ds[0] - 16 * ds[1] + 5 * ds[2]) / 12
        else:
            slope_ = (55 * ds[0] - 59 * ds[1] + 37 * ds[2] - 9 * ds[3]) / 24
        xi = xi + (b - a) * slope_
    assert torch.allclose(ipndm(gm, x, sigmas), xi, atol=1e-12)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_nfe(name, n):
    solver, nfe = SOLVERS[name]
    counter = Counter(mixture())
    solver(counter, torch.randn(2, 1, 1, 2, dtype=F64) * 80, karras_sigmas(n))
    assert counter.nfe == nfe(n)
    if name in AFS:
        counter = Counter(mixture())
        AFS[name](counter, torch.randn(2, 1, 1, 2, dtype=F64) * 80, karras_sigmas(n), afs=True)
        assert counter.nfe == nfe(n) - 1


def test_afs_first_step():
    x = torch.randn(3, 1, 2, 2, dtype=F64)
    # d = x / sqrt(1 + sigma^2), as diff-sampler's AFS.
    assert torch.allclose((x - afs_denoised(x, 80.0)) / 80.0, x / math.sqrt(1 + 80.0**2))


def test_stochastic_samplers():
    gm = mixture()
    x = torch.randn(4, 1, 1, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 80
    sigmas = karras_sigmas(8)

    def seeded(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)

    for solver in (
        partial(edm_stochastic, s_churn=40.0, s_tmin=0.05, s_tmax=50.0),
        euler_ancestral,
    ):
        a, b = solver(gm, x, sigmas, noise=seeded(0)), solver(gm, x, sigmas, noise=seeded(0))
        assert torch.equal(a, b)
        assert not torch.allclose(a, solver(gm, x, sigmas, noise=seeded(1)))
    assert torch.equal(edm_stochastic(gm, x, sigmas), heun(gm, x, sigmas))
    assert torch.allclose(euler_ancestral(gm, x, sigmas, eta=0.0), euler(gm, x, sigmas))
    # The Sampler seeds them per sample: the same seeds give the same images at any batch size.
    sampler = Sampler(solver=partial(edm_stochastic, s_churn=40.0), num_steps=6)
    assert torch.allclose(sampler(gm, [0, 1, 2], (1, 1, 2))[1:], sampler(gm, [1, 2], (1, 1, 2)))


def test_schedules():
    assert torch.equal(polynomial_sigmas(10, 0.002, 80.0, 7.0), karras_sigmas(10, 0.002, 80.0, 7.0))
    s = logsnr_sigmas(5, 0.1, 10.0)
    assert s.tolist() == pytest.approx([10.0, 10**0.5, 1.0, 10**-0.5, 0.1, 0.0])
    t = time_uniform_sigmas(18, 0.002, 80.0)
    assert len(t) == 19 and t[-1] == 0 and torch.all(t[:-1] > t[1:])
    assert float(t[0]) == pytest.approx(80.0) and float(t[17]) == pytest.approx(0.002)
    for schedule, fn in (("logsnr", logsnr_sigmas), ("time_uniform", time_uniform_sigmas)):
        grid = Sampler(num_steps=7, schedule=schedule, sigma_min=0.01, sigma_max=20.0).grid()
        assert torch.equal(grid, fn(7, 0.01, 20.0))
        assert fn(1, 0.01, 20.0).tolist() == pytest.approx([20.0, 0.0])
