"""ECT (Geng et al. 2024): exactness on Gaussians, the r(t, stage) schedule, draws, the CLI."""

import csv
import math

import pytest
import torch
import yaml
from helpers import CONFIGS, fit_args

from cm.cli import main
from cm.objectives import ConsistencyTuning, SquaredL2
from cm.objectives.base import SampleDraws
from cm.oracle import GaussianMixture
from cm.precond import ConsistencyPrecond, EDMPrecond
from cm.solvers import Sampler
from cm.solvers.consistency import multistep


class TinyNet(torch.nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.out = torch.nn.Conv2d(4, 1, 1)
        self.drop = torch.nn.Dropout(p)

    def forward(self, x, c_noise, labels=None):
        return self.out(self.drop(self.conv(x) * c_noise.view(-1, 1, 1, 1).tanh()))


def consistency_function(gm: GaussianMixture):
    """``f*(x, sigma)``: one Gaussian's exact PF-ODE map to sigma = 0 (``gm.flow(x, s, 0)``)."""
    m, s = gm.means[0], gm.stds[0]

    def f(x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).view(-1, 1, 1, 1)
        return m + (x - m) * s / (s**2 + sigma**2).sqrt()

    return f


def seeded(objective: ConsistencyTuning, n: int, seed: int = 3) -> ConsistencyTuning:
    """``objective`` drawing a fixed global batch of ``n`` (as the module sets it every step)."""
    objective.draws.set(seed, 0, n)
    return objective


def test_r_follows_the_reference_mapping():
    """locuslab/ect training/loss.py t_to_r_sigmoid / t_to_r_const, values worked out by hand."""
    obj = ConsistencyTuning()  # q 2, k 8, b 1: r = max(t (1 - (1 + 8 sigmoid(-t)) / 2^(s+1)), 0)
    t = torch.tensor([1.0, 3.0, 80.0, math.log(7) - 1e-9], dtype=torch.float64)
    r = obj.r(t, 0).tolist()
    assert r[0] == 0 and r[3] == 0  # n(t) >= 2 below t = ln 7: r clamps to 0 (denoising)
    assert r[1] == pytest.approx(0.9308895218691987, rel=1e-12)
    assert r[2] == pytest.approx(40.0, rel=1e-12)  # n(80) = 1: r = t / 2
    assert obj.r(torch.tensor([1.0, 3.0]), 2).tolist() == pytest.approx([0.60605858, 2.4827224])
    assert obj.r(torch.tensor([3.0]), 1).item() == pytest.approx(1.9654447609345995, rel=1e-6)
    assert obj.r(torch.tensor([1.0]), 0).item() == 0
    hour = ConsistencyTuning(q=256)  # run_ecm_1hour.sh
    assert hour.r(torch.tensor([1.0]), 0).item() == pytest.approx(0.9876893305821877)
    const = ConsistencyTuning(mapping="const", q=4)
    assert const.r(torch.tensor([2.0]), 1).item() == pytest.approx(2 * (1 - 1 / 16))


def test_stage_doubles_at_the_boundaries_and_shrinks_t_minus_r_by_q():
    obj = ConsistencyTuning(double=100)
    assert [obj.stage(s) for s in (0, 99, 100, 199, 200, 25_000)] == [0, 0, 1, 1, 2, 250]
    t = torch.logspace(-2, 2, 50, dtype=torch.float64)
    for stage in range(6):
        r0, r1 = obj.r(t, stage), obj.r(t, stage + 1)
        both = (r0 > 0) & (r1 > 0)
        assert both.any() and torch.all(r1 >= r0)
        torch.testing.assert_close((t - r0)[both] / (t - r1)[both], torch.full_like(t[both], 2.0))
    f = consistency_function(GaussianMixture(torch.zeros(1, 1, 4, 4), torch.tensor([0.5])))
    x0 = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    for step, stage in ((99, 0), (100, 1), (250, 2)):
        seeded(obj, 8)(f, x0, None, step, 1000)
        assert obj.metrics()["stage"] == stage
    with pytest.raises(ValueError, match="q must be greater than 1"):
        ConsistencyTuning(q=1.0)
    with pytest.raises(ValueError, match="double must be a positive"):
        ConsistencyTuning(double=0)


@pytest.mark.parametrize("step", [0, 3, 8, 20])
def test_loss_vanishes_for_the_exact_consistency_function(step):
    """A point mass: the PF-ODE maps every x_t to m, so f* = m, and x_t, x_r share a trajectory.

    For a Gaussian of std s > 0, x0 + t n and x0 + r n lie on different trajectories; the loss
    of f* is then the closed form of the next test, not 0.
    """
    m = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    f = consistency_function(GaussianMixture(m, torch.tensor([0.0])))  # f*(x, 0) = NaN, unused
    x0 = m.expand(64, -1, -1, -1).clone()
    obj = seeded(ConsistencyTuning(double=1), 64)
    loss = obj(f, x0, None, step, 1)
    assert loss.dtype == torch.float64 and torch.all(loss.abs() < 1e-12)
    perturbed = lambda x, sigma, labels=None: f(x, sigma) + 1e-3 * x  # noqa: E731
    assert torch.all(seeded(obj, 64)(perturbed, x0, None, step, 1) > 0)


def test_loss_is_the_closed_form_on_a_gaussian():
    """One Gaussian N(m, s^2): with f* = m + (x - m) g(sigma), g = s / sqrt(s^2 + sigma^2), the ECT
    loss is ``||(x0 - m)(g(t) - g(r)) + n (t g(t) - r g(r))|| / (t - r)`` with one noise n."""
    gm = GaussianMixture(torch.full((1, 1, 4, 4), 0.3), torch.tensor([0.5]))
    x0 = gm.sample(256, torch.Generator().manual_seed(0))[0]
    obj = ConsistencyTuning(double=10)
    loss = seeded(obj, 256, seed=11)(consistency_function(gm), x0, None, 15, 1)
    draws = SampleDraws()  # the same draws, in the objective's order: ln t, then the noise n
    draws.set(11, 0, 256)
    t = (draws.randn(256).double() * 2.0 - 1.1).exp()
    n = draws.randn_like(x0)
    sig = 1 / (1 + torch.exp(t))
    r = (t * (1 - (1 + 8 * sig) / 2**2)).clamp(min=0)  # stage 15 // 10 = 1
    assert (r == 0).any() and (r > 0).any()
    g = lambda sigma: 0.5 / (0.25 + sigma**2).sqrt()  # noqa: E731
    col = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    delta = (x0 - gm.means[0]) * col(g(t) - g(r)) + n * col(t * g(t) - r * g(r))
    expected = delta.flatten(1).norm(dim=1) / (t - r)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert obj.metrics()["dt"] == pytest.approx((t - r).mean().item())


def test_target_is_x0_where_r_is_zero_and_no_second_call_when_all_are():
    calls = []

    def zeros(x, sigma, labels=None):
        calls.append(sigma.clone())
        return torch.zeros_like(x)

    x0 = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    obj = seeded(ConsistencyTuning(distance=SquaredL2(), double=1), 64)
    loss = obj(zeros, x0, None, 1, 1)
    t, r = calls
    assert (r == 0).any() and (r > 0).any()
    torch.testing.assert_close(r.double(), obj.r(t.double(), 1))
    # f_r = 0 where r > 0 (the network) and x0 where r = 0: loss = mean(x0^2) / t there.
    expected = torch.where(r == 0, x0.pow(2).flatten(1).mean(1) / t, torch.zeros_like(t))
    torch.testing.assert_close(loss, expected)
    calls.clear()
    early = seeded(ConsistencyTuning(p_mean=-5.0, p_std=0.1), 64)  # t ~ 0.007: every r = 0
    loss = early(zeros, x0, None, 0, 1)
    assert len(calls) == 1 and early.metrics()["stage"] == 0.0
    torch.testing.assert_close(loss, x0.pow(2).flatten(1).sum(1).sqrt() / calls[0])


def test_dropout_mask_shared_between_online_and_target():
    torch.manual_seed(0)
    D = ConsistencyPrecond(TinyNet(0.5), sigma_min=0.0).train()
    seen = []
    original = D.net.drop.forward
    D.net.drop.forward = lambda h: seen.append(original(torch.ones_like(h))) or seen[-1] * h
    ConsistencyTuning(double=1)(D, torch.randn(8, 1, 8, 8), None, 5, 1)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


def test_draws_are_world_size_invariant():
    """Two ranks (SampleDraws offsets 0 and 4 of 8) compute the single process's per-sample loss."""
    torch.manual_seed(0)
    D = ConsistencyPrecond(TinyNet(), sigma_min=0.0, noise_scale=0.25)
    x0 = torch.randn(8, 1, 8, 8)
    whole = seeded(ConsistencyTuning(double=1), 8, seed=5)(D, x0, None, 4, 1)
    parts = []
    for offset in (0, 4):
        rank = ConsistencyTuning(double=1)
        rank.draws.set(5, offset, 8)
        parts.append(rank(D, x0[offset : offset + 4], None, 4, 1))
    torch.testing.assert_close(torch.cat(parts), whole)


def test_init_from_starts_at_the_diffusion_model_once_and_stays_out_of_checkpoints():
    torch.manual_seed(0)
    teacher = EDMPrecond(TinyNet())
    student = ConsistencyPrecond(TinyNet(), sigma_min=0.0, noise_scale=0.25)
    obj = ConsistencyTuning(init_from=teacher)
    obj.bind(student)
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.5, 2.0, 80.0])
    assert torch.equal(student(x, sigma), teacher(x, sigma))  # sigma_min 0: EDM's precond
    assert obj.target is None and not obj._init_from and list(obj.state_dict()) == []
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    obj.bind(student)  # a second bind copies nothing
    assert not torch.equal(student(x, sigma), teacher(x, sigma))
    with pytest.raises(ValueError, match="set the student's noise_scale to 0.25"):
        ConsistencyTuning(init_from=teacher).bind(ConsistencyPrecond(TinyNet()))


def test_two_step_sampler_of_the_configs_is_the_reference_grid():
    """ct_training_loop.py generator_fn: x = f(80 z, 80); x = f(x + 0.821 z', 0.821)."""
    for name in ("ect_cifar10.yaml", "ect_digits.yaml"):
        args = yaml.safe_load((CONFIGS / name).read_text())["model"]["init_args"]["sampler"]
        assert args["init_args"]["solver"] == "cm.solvers.consistency.multistep"
        sampler = Sampler(solver=multistep, sigmas=args["init_args"]["sigmas"])
        assert sampler.grid().tolist() == [80.0, 0.821, 0.0]
    calls = []

    def f(x, sigma, labels=None):
        calls.append(sigma[0].item())
        return torch.zeros_like(x)

    Sampler(solver=multistep, sigmas=[80.0, 0.821])(f, [0, 1], (1, 4, 4))
    assert calls == pytest.approx([80.0, 0.821])


def test_ect_digits_tunes_an_exported_edm_model(tmp_path):
    """configs/ect_digits.yaml through ``cm fit`` from ``cm export`` of configs/edm_digits.yaml."""
    main(fit_args(tmp_path / "edm", steps=1, config=CONFIGS / "edm_digits.yaml"))
    export = tmp_path / "export"
    main(["export", "--ckpt_path", str(next((tmp_path / "edm").glob("**/*.ckpt"))),
          "--out", str(export)])  # fmt: skip
    root = tmp_path / "ect"
    main(fit_args(
        root, "--trainer.log_every_n_steps=1",
        f"--model.init_args.objective.init_args.init_from.init_args.path={export}",
        "--model.init_args.objective.init_args.double=1", steps=3,
        config=CONFIGS / "ect_digits.yaml",
    ))  # fmt: skip
    rows = list(csv.DictReader(next(root.glob("**/metrics.csv")).open()))
    stages = [float(r["train/stage"]) for r in rows if r.get("train/stage")]
    assert stages == [0.0, 1.0, 2.0]
    assert all(float(r["train/dt"]) > 0 for r in rows if r.get("train/dt"))
    state = torch.load(next(root.glob("**/checkpoints/*.ckpt")), weights_only=True)["state_dict"]
    assert not any(k.startswith("objective.") for k in state)  # no teacher, no target network
    assert next(root.glob("**/samples/samples.npz")).is_file()
