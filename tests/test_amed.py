"""AMED-Solver / AMED-Plugin: limits, NFE, exactness, bottleneck hook, training via the CLI."""

import copy
import math
from contextlib import contextmanager

import pytest
import torch
import yaml
from helpers import amed_yaml, cpu_trainer, fit, last_ckpt, tiny_adm, tiny_ncsnpp

from cm.bench import CountingDenoiser
from cm.cli import main, run
from cm.io import load_predictor
from cm.networks import AMEDPredictor
from cm.objectives import AMEDDistillation
from cm.oracle import GaussianMixture, RandomGaussianMixture
from cm.precond import EDMPrecond
from cm.solvers import amed, amed_plugin, dpm2, dpmpp_3m, euler, heun, ipndm
from cm.solvers.amed import positive_grid

F64 = torch.float64


class FixedPredictor:
    """A stand-in predictor with constant ``r, c, a`` and no features (the solvers' protocol)."""

    def __init__(
        self, solver: str, r=0.5, c=1.0, a=1.0, afs=False, max_order=4, afs_history=True
    ) -> None:
        self.solver, self.afs, self.max_order = solver, afs, max_order
        self.afs_history = afs_history
        self.r, self.c, self.a = r, c, a

    def __call__(self, features, sigma, sigma_next):
        n = features.shape[0]
        return tuple(torch.full((n,), v) for v in (self.r, self.c, self.a))

    @contextmanager
    def watch(self, denoiser):
        from cm.networks.amed import FeatureTap

        yield FeatureTap(8)


def refined(grid: list[float], r: float = 0.5) -> torch.Tensor:
    """``t_0, s_0, t_1, s_1, ..., t_{N-1}`` with ``s_n = t_{n+1}^r t_n^(1-r)``."""
    out = []
    for a, b in zip(grid[:-1], grid[1:], strict=True):
        out += [a, b**r * a ** (1 - r)]
    return torch.tensor([*out, grid[-1]], dtype=F64)


def mixture() -> GaussianMixture:
    return GaussianMixture.random(4, (1, 2, 2), std=0.3, seed=1)


def test_predictor_size_and_ranges():
    p = AMEDPredictor(scale_dir=0.01, scale_time=0.2)
    assert 8_000 < sum(q.numel() for q in p.parameters()) < 10_000  # the paper's ~9k
    with torch.no_grad():
        for layer in (p.fc_r, p.fc_scale_dir, p.fc_scale_time):
            layer.bias.fill_(50.0)  # saturate: every output at its upper bound
        r, c, a = p(torch.randn(3, 64), 80.0, 10.0)
    assert r.shape == (3,) and torch.all(r <= 1) and torch.all(r > 0.99)
    assert torch.allclose(c, torch.full((3,), 1.01)) and torch.allclose(a, torch.full((3,), 1.2))
    assert p.nfe == 5 and p.grid()[-1] == 0 and len(p.grid()) == 5
    with pytest.raises(ValueError, match="max_order"):
        AMEDPredictor(solver="dpmpp", max_order=4)


def test_limits_equal_known_solvers():
    """With ``r = 1/2, c = a = 1`` AMED is DPM-Solver-2 and the plugins run on the refined grid."""
    gm = mixture()
    x = torch.randn(6, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 20
    sigmas = torch.tensor([20.0, 5.0, 1.0, 0.2, 0.0], dtype=F64)
    grid = positive_grid(sigmas)
    fine = refined(grid)
    out = amed(gm, x, sigmas, predictor=FixedPredictor("amed"))
    assert torch.allclose(out, dpm2(gm, x, torch.tensor(grid, dtype=F64)), atol=1e-12)
    cases = [
        ("euler", euler, {}),
        ("ipndm", ipndm, {"afs": False}),
        ("ipndm", ipndm, {"afs": True}),
    ]
    cases += [("dpmpp", dpmpp_3m, {"afs": False}), ("dpmpp", dpmpp_3m, {"afs": True})]
    for base, reference, options in cases:
        p = FixedPredictor(base, max_order=3 if base == "dpmpp" else 4, **options)
        out = amed_plugin(gm, x, sigmas, predictor=p)
        assert torch.allclose(out, reference(gm, x, fine, **options), atol=1e-12), base


@pytest.mark.parametrize("base", ["amed", "euler", "ipndm", "dpmpp"])
def test_exact_on_point_mass_and_nfe(base):
    """Point-mass data: straight trajectories ``x = y + sigma n``, any r, exact with c = a = 1."""
    y = torch.randn(1, 1, 2, 2, dtype=F64)
    point = GaussianMixture(y, torch.zeros(1, dtype=F64))
    n = torch.randn(5, 1, 2, 2, dtype=F64)
    sigmas = torch.tensor([80.0, 10.0, 2.0, 0.5, 0.0], dtype=F64)
    fn = amed if base == "amed" else amed_plugin
    for afs, r in ((False, 0.3), (False, 0.8), (True, 0.6)):
        p = FixedPredictor(base, r=r, afs=afs, max_order=3 if base == "dpmpp" else 4)
        counter = CountingDenoiser(point)
        out = fn(counter, y + 80.0 * n, sigmas, predictor=p)
        assert counter.calls == 2 * 3 - int(afs)  # 2 NFE per interval, AFS saves one
        if not afs:  # AFS assumes unit-variance data at sigma_max: exact only for that
            assert torch.allclose(out, y + 0.5 * n, atol=1e-10), (base, r)


def test_gaussian_data_converges():
    """N(0, s^2 I) data: the exact solution ``x_T sqrt(s^2 + t^2) / sqrt(s^2 + T^2)``."""
    s = 0.5
    gauss = GaussianMixture(torch.zeros(1, 1, 2, 2, dtype=F64), torch.full((1,), s, dtype=F64))
    x = torch.randn(5, 1, 2, 2, dtype=F64) * 80
    errors = []
    for k in (8, 16, 32):
        sigmas = torch.cat(
            [
                torch.logspace(math.log10(80), math.log10(0.01), k, dtype=F64),
                torch.zeros(1, dtype=F64),
            ]
        )
        exact = x * math.sqrt(s**2 + 0.01**2) / math.sqrt(s**2 + 80**2)
        out = amed(gauss, x, sigmas, predictor=FixedPredictor("amed"))
        errors.append((out - exact).abs().max().item())
    assert errors[0] > 3 * errors[1] > 9 * errors[2]  # second order, like DPM-Solver-2


def tiny_edm(label_dim: int = 0) -> EDMPrecond:
    torch.manual_seed(0)
    net = tiny_ncsnpp(label_dim=label_dim, attn_resolutions=[])
    return EDMPrecond(net, sigma_data=0.5).eval()


def test_bottleneck_hook_through_wrappers(tmp_path):
    from cm.guidance import cfg

    edm = tiny_edm(label_dim=3)
    p = AMEDPredictor(num_steps=3, solver="ipndm", schedule="karras")
    labels = torch.eye(3)[[0, 1]]
    x = torch.randn(2, 1, 8, 8) * 80
    seen = []
    p.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    counter = CountingDenoiser(cfg(edm, 2.0))
    amed_plugin(counter, x, p.grid(), labels, predictor=p)
    assert int(p.uses_features) == 1 and counter.calls == p.nfe
    # AFS step: zeros; the next interval reads the conditional half of the CFG batch.
    assert seen[0].abs().sum() == 0 and seen[1].shape == (2, 64) and seen[1].abs().sum() > 0
    with pytest.raises(ValueError, match="trained on bottleneck features"):
        amed_plugin(mixture(), torch.randn(2, 1, 2, 2), p.grid(), predictor=p)
    adm = tiny_adm(label_dim=0, attention_resolutions=[], num_groups=8)
    from cm.networks.amed import bottleneck_module

    assert bottleneck_module(EDMPrecond(adm)) is adm.middle
    assert bottleneck_module(mixture()) is None
    with pytest.raises(ValueError, match="not a submodule"):
        with AMEDPredictor(feature_module="enc.9").watch(edm):
            pass


def test_loss_reaches_every_head():
    gm = RandomGaussianMixture(4, 4, 1, 0.5, 0)
    p = AMEDPredictor(num_steps=3, solver="ipndm", schedule="karras", scale_time=0.2)
    objective = AMEDDistillation(heun, teacher_substeps=3)
    x = torch.randn(8, 1, 4, 4) * 80
    targets = objective.targets(gm, p, x, None)
    with p.watch(gm) as tap:
        loss, *_ = objective(gm, p, tap, targets[0], 1, targets[1], None, [])
    loss.mean().backward()
    for head in (p.fc_r, p.fc_scale_dir, p.fc_scale_time):
        assert head.weight.grad.abs().sum() > 0


@torch.no_grad()
def heldout_loss(predictor: AMEDPredictor) -> float:
    """The training objective, summed over intervals, on seeds the training never saw."""
    gm = RandomGaussianMixture(10, 8, 1, 0.5, 0)
    objective = AMEDDistillation(heun, teacher_substeps=3)
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(7)) * 80
    hist, total = [], 0.0
    with predictor.watch(gm) as tap:
        for n, target in enumerate(objective.targets(gm, predictor, x, None)):
            loss, x_next, hist, _ = objective(gm, predictor, tap, x, n, target, None, hist)
            total += loss.mean().item()
            x = target if objective.forcing(predictor) else x_next
    return total


def test_fit_then_bench_on_the_oracle(tmp_path, capsys):
    """``cm fit`` trains the shipped config's predictor: its loss on held-out noise drops."""
    main(["fit", "--config", str(amed_yaml(tmp_path))])
    ckpt = next(tmp_path.glob("**/checkpoints/*.ckpt"))
    trained = load_predictor(ckpt)
    assert trained.solver == "ipndm" and trained.nfe == 5 and int(trained.uses_features) == 0
    fresh = copy.deepcopy(trained)
    torch.manual_seed(0)
    fresh.reset_parameters()
    assert heldout_loss(trained) < 0.5 * heldout_loss(fresh)
    main(
        [
            "bench",
            "solvers",
            "--oracle",
            "mixture",
            "--std",
            "0.5",
            "--num",
            "8",
            "--ref_steps",
            "32",
            "--nfe",
            "5",
            "--solvers",
            "ipndm",
            "--predictor",
            str(ckpt),
            "--out",
            str(tmp_path / "bench"),
        ]
    )
    assert "amed_plugin(ipndm)" in (tmp_path / "bench" / "solvers.md").read_text()


def test_sample_with_predictor(tmp_path, capsys):
    """A frozen cm checkpoint as the denoiser: hooked bottleneck, then ``cm sample --predictor``."""
    denoiser_ckpt = last_ckpt(fit(tmp_path / "cm", 2))
    path = amed_yaml(tmp_path / "amed", num_steps=3, solver="amed", scale_time=0.0)
    config = yaml.safe_load(path.read_text())
    config["model"]["init_args"]["denoiser"] = {
        "class_path": "cm.io.PretrainedDenoiser",
        "init_args": {"path": str(denoiser_ckpt)},
    }
    config["data"]["init_args"].update(num=8, batch_size=4)
    config["model"]["init_args"]["objective"]["init_args"]["teacher_substeps"] = 1
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    ckpt = next((tmp_path / "amed").glob("**/checkpoints/*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k.startswith("denoiser.") for k in state)  # the frozen teacher stays out
    assert int(load_predictor(ckpt).uses_features) == 1
    out = tmp_path / "s.npz"
    main(
        [
            "sample",
            "--ckpt_path",
            str(denoiser_ckpt),
            "--solver",
            "amed",
            "--predictor",
            str(ckpt),
            "--num",
            "4",
            "--out",
            str(out),
        ]
    )
    assert "3 NFE" in capsys.readouterr().out and out.is_file()
    with pytest.raises(ValueError, match="needs --predictor"):
        run(["sample", "--ckpt_path", str(denoiser_ckpt), "--solver", "amed"])
    with pytest.raises(ValueError, match="drop --steps"):
        run(["sample", "--ckpt_path", str(denoiser_ckpt), "--predictor", str(ckpt), "--steps", "4"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_predictor(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="holds no AMED predictor"):
        load_predictor(denoiser_ckpt)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_interval_step_is_skipped_or_stops(tmp_path, policy):
    """An Inf gradient at step 1: "skip" leaves the predictor and Adam untouched; "stop" raises."""
    import lightning as L

    from cm.training import AMEDModule, SeedDataModule

    seen = {}

    class PoisonAndSnapshot(L.Callback):
        def on_after_backward(self, trainer, pl_module) -> None:
            """Weights and Adam moments before step ``global_step``; poison step 1's gradient."""
            state = trainer.optimizers[0].state.values()
            seen[trainer.global_step] = (
                [p.detach().clone() for p in pl_module.predictor.parameters()],
                [s["exp_avg"].clone() for s in state],
            )
            if trainer.global_step == 1:
                next(pl_module.predictor.parameters()).grad.view(-1)[0] = float("inf")

    torch.manual_seed(0)
    module = AMEDModule(
        RandomGaussianMixture(10, 8, 1, 0.5, 0),
        AMEDPredictor(num_steps=4, solver="ipndm"),
        AMEDDistillation(heun, teacher_substeps=3),
        nonfinite=policy,
    )
    trainer = cpu_trainer(tmp_path, PoisonAndSnapshot(), max_epochs=1)
    data = SeedDataModule(num=16, batch_size=8)
    if policy == "stop":
        with pytest.raises(ValueError, match="Non-finite loss or gradients at step 1"):
            trainer.fit(module, data)
        return
    trainer.fit(module, data)
    assert trainer.global_step == 6 and module.skipped_steps == 1  # 3 intervals, 2 batches
    for before, after in zip(seen[1], seen[2], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(seen[2][0], seen[3][0], strict=True))


def test_normalized_features_ignore_scale_and_keep_zeros():
    """``normalize_features``: an affine change of the features leaves ``(r, c, a)`` unchanged."""
    torch.manual_seed(0)
    p = AMEDPredictor(scale_time=0.2, normalize_features=True)
    raw = copy.deepcopy(p)
    raw.normalize_features = False
    f = torch.randn(4, 64)
    with torch.no_grad():
        out, shifted = p(f, 9.7, 0.47), p(3 * f + 2, 9.7, 0.47)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, shifted, strict=True))
        assert not torch.allclose(raw(f, 9.7, 0.47)[0], raw(3 * f + 2, 9.7, 0.47)[0])
        zeros = torch.zeros(4, 64)  # the AFS step and the time-only predictor
        pairs = zip(p(zeros, 80, 9.7), raw(zeros, 80, 9.7), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)


def test_lr_scheduler_steps_once_per_interval(tmp_path):
    """``lr_scheduler`` under manual optimization: stepped after each of the ``N - 1`` updates."""
    from functools import partial

    from cm.training import AMEDModule, SeedDataModule

    torch.manual_seed(0)
    module = AMEDModule(
        RandomGaussianMixture(10, 8, 1, 0.5, 0),
        AMEDPredictor(num_steps=4, solver="ipndm"),
        AMEDDistillation(heun, teacher_substeps=1),
        optimizer=partial(torch.optim.Adam, lr=1e-2),
        lr_scheduler=partial(
            torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.0, total_iters=8
        ),
    )
    trainer = cpu_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, SeedDataModule(num=16, batch_size=8))
    assert trainer.global_step == 6  # 3 intervals, 2 batches
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-2 * (1 - 6 / 8))


def test_afs_slope_out_of_history_on_nonzero_mean_data():
    """``afs_history=False``: AFS's zero-mean slope does not leak into later multistep steps.

    Point-mass data at ``y`` far from 0: every trajectory is straight, so once the history holds
    only model slopes the plugin is exact up to the first substep's AFS error, which the straight
    flow shrinks by ``t_{N-1} / s_0``; with the AFS slope kept its error reaches every later step.
    """
    y = torch.full((1, 1, 2, 2), -0.8, dtype=F64)
    point = GaussianMixture(y, torch.zeros(1, dtype=F64))
    x = y + 80.0 * torch.randn(5, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([80.0, 10.0, 2.0, 0.5, 0.0], dtype=F64)
    errors = {}
    for keep in (True, False):
        p = FixedPredictor("ipndm", r=0.5, afs=True, afs_history=keep)
        counter = CountingDenoiser(point)
        out = amed_plugin(counter, x, sigmas, predictor=p)
        assert counter.calls == 5
        errors[keep] = (out - (y + 0.5 * (x - y) / 80.0)).abs().max().item()
    assert errors[False] < 0.1 * errors[True], errors
