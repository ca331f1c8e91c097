"""Consistency distillation: teacher steps, exactness on the oracle, target, configs, LPIPS."""

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, ROOT, fit_args, register_weights

from cm.cli import main
from cm.data import MixtureDataset
from cm.objectives import (
    LPIPS,
    ConsistencyDistillation,
    ConsistencyTraining,
    SquaredL2,
)
from cm.oracle import GaussianMixture, RandomGaussianMixture
from cm.precond import ConsistencyPrecond, EDMPrecond
from cm.solvers import euler_step, heun_step


class TinyNet(torch.nn.Module):
    def __init__(self, channels: int = 1, p: float = 0.0) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, channels, 3, padding=1)
        self.out = torch.nn.Conv2d(channels, 1, 1)
        self.drop = torch.nn.Dropout(p)

    def forward(self, x, c_noise, labels=None):
        return self.out(self.drop(self.conv(x) * c_noise.view(-1, 1, 1, 1).tanh()))


def flow_map(gm: GaussianMixture, sigma_min: float = 0.002):
    """The exact consistency function of a one-component Gaussian (``GaussianMixture.flow``)."""
    m, s2 = gm.means[0], gm.stds[0] ** 2

    def f(x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).view(-1, 1, 1, 1)
        return m + (x - m) * ((s2 + sigma_min**2) / (s2 + sigma**2)).sqrt()

    return f


class Recorder:
    """A denoiser that records its inputs ``(x, sigma)``."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, x, sigma, labels=None):
        self.calls.append((x.clone(), sigma.clone()))
        return self.fn(x, sigma, labels)


def test_step_functions_take_per_sample_sigmas():
    gm = GaussianMixture.random(3, (1, 4, 4), seed=1)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    s = torch.tensor([80.0, 3.0, 0.5, 0.01], dtype=torch.float64)
    s_next = torch.tensor([0.0, 2.0, 0.0, 0.002], dtype=torch.float64)
    for step in (euler_step, heun_step):
        batched = step(gm, x, s, s_next)
        rows = [step(gm, x[i : i + 1], s[i].item(), s_next[i].item()) for i in range(4)]
        assert torch.allclose(batched, torch.cat(rows), rtol=1e-13, atol=1e-13), step.__name__
    # a float sigma keeps the scalar path, and a sigma_next of 0 is Euler
    assert torch.equal(heun_step(gm, x, 1.0, 0.0), euler_step(gm, x, 1.0, 0.0))


def test_teacher_step_is_heun_step():
    gm = GaussianMixture.random(3, (1, 4, 4), seed=2)
    x0, k = gm.sample(16, torch.Generator().manual_seed(0))
    labels = torch.nn.functional.one_hot(k, 3).double()
    student = Recorder(flow_map(GaussianMixture(gm.means[:1], gm.stds[:1])))
    obj = ConsistencyDistillation(gm, SquaredL2(), num_scales=10, init_from_teacher=False)
    obj.bind(student)
    obj(student, x0, labels, 0, 1)
    (x_next, t_next), (x_cur, t_cur) = student.calls
    assert torch.all(t_next > t_cur) and x_cur.dtype == torch.float64
    assert torch.equal(x_cur, heun_step(gm, x_next, t_next, t_cur, labels))
    assert obj.metrics() == {"num_scales": 10.0, "target_ema": 0.0}


def test_cd_loss_vanishes_for_the_exact_flow_map():
    gm = GaussianMixture(torch.full((1, 1, 4, 4), 0.3), torch.tensor([0.5]))
    x0 = gm.sample(2048, torch.Generator().manual_seed(0))[0]
    f = flow_map(gm)
    losses = {}
    for solver in ("euler", "heun"):
        for n in (10, 20, 40):
            obj = ConsistencyDistillation(gm, num_scales=n, solver=solver, init_from_teacher=False)
            torch.manual_seed(0)
            losses[solver, n] = obj(f, x0, None, 0, 1).mean().item()
    for solver in ("euler", "heun"):
        assert losses[solver, 10] > losses[solver, 20] > losses[solver, 40] >= 0
        assert losses["heun", 10] < losses["euler", 10]
    assert losses["heun", 40] < 1e-6 and losses["euler", 40] < 1e-3


def test_only_the_student_gets_gradients_and_target_follows():
    torch.manual_seed(0)
    teacher = EDMPrecond(TinyNet(4))
    student = ConsistencyPrecond(TinyNet(4), noise_scale=0.25)
    obj = ConsistencyDistillation(teacher, SquaredL2(), num_scales=18, mu=0.95)
    obj.bind(student)
    for a, b in zip(student.net.parameters(), teacher.net.parameters(), strict=True):
        assert torch.equal(a, b)  # init_from_teacher
    assert obj.target is not None and not any(p.requires_grad for p in obj.target.parameters())
    loss = obj(student, torch.randn(8, 1, 8, 8), None, 0, 10)
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in obj.target.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in obj.target.parameters()]
    obj.after_optimizer_step(student, 0, 10)
    for b, t, p in zip(before, obj.target.parameters(), student.parameters(), strict=True):
        assert torch.allclose(t, 0.95 * b + 0.05 * p)


def test_teacher_stays_eval_and_dropout_mask_is_shared():
    torch.manual_seed(0)
    teacher = EDMPrecond(TinyNet(4, p=0.5))
    student = ConsistencyPrecond(TinyNet(4, p=0.5), noise_scale=0.25)
    obj = ConsistencyDistillation(teacher, SquaredL2(), mu=0.95)
    obj.bind(student)
    obj.train()
    student.train()
    assert not teacher.training and obj.target.training
    seen = []
    for net in (student.net, obj.target.net):
        original = net.drop.forward
        net.drop.forward = lambda h, o=original: seen.append(o(torch.ones_like(h))) or seen[-1] * h
    obj(student, torch.randn(4, 1, 8, 8), None, 0, 10)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


def test_init_from_teacher_errors_are_clear():
    with pytest.raises(ValueError, match="networks differ"):
        ConsistencyDistillation(EDMPrecond(TinyNet(4))).bind(
            ConsistencyPrecond(TinyNet(8), noise_scale=0.25)
        )
    with pytest.raises(ValueError, match="set the student's noise_scale to 0.25"):
        ConsistencyDistillation(EDMPrecond(TinyNet(4))).bind(ConsistencyPrecond(TinyNet(4)))
    from cm.precond import VPPrecond

    with pytest.raises(ValueError, match="another c_noise than the teacher's"):
        ConsistencyDistillation(VPPrecond(TinyNet(4))).bind(ConsistencyPrecond(TinyNet(4)))


def test_ct_init_from_copies_the_teacher_once_and_stays_out_of_checkpoints():
    """launch.sh's CT runs start from the teacher (cm_train.py); the paper's default: scratch."""
    torch.manual_seed(0)
    teacher = EDMPrecond(TinyNet(4))
    student = ConsistencyPrecond(TinyNet(4), noise_scale=0.25)
    scratch = [p.clone() for p in student.parameters()]
    ConsistencyTraining(curriculum="ct", s0=2, s1=10, mu0=0.95).bind(student)
    assert all(torch.equal(a, b) for a, b in zip(scratch, student.parameters(), strict=True))
    obj = ConsistencyTraining(curriculum="ct", s0=2, s1=10, mu0=0.95, init_from=teacher)
    obj.bind(student)
    for a, b, t in zip(student.net.parameters(), teacher.net.parameters(),
                       obj.target.net.parameters(), strict=True):  # fmt: skip
        assert torch.equal(a, b) and torch.equal(t, b)  # theta and theta- both start at the teacher
    assert not any(k.startswith("_init_from") or "teacher" in k for k in obj.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    obj.bind(student)  # a second bind (theta- exists, e.g. after a resume) copies nothing
    assert not torch.equal(next(student.net.parameters()), next(teacher.net.parameters()))
    with pytest.raises(ValueError, match="set the student's noise_scale to 0.25"):
        ConsistencyTraining(init_from=teacher).bind(ConsistencyPrecond(TinyNet(4)))


def test_random_gaussian_mixture_is_the_dataset_mixture():
    a = RandomGaussianMixture(num_components=4, resolution=4, channels=3, std=0.2, seed=3)
    b = MixtureDataset(8, num_components=4, resolution=4, channels=3, std=0.2, seed=3).mixture
    for key, value in b.state_dict().items():
        assert torch.equal(a.state_dict()[key], value), key
    x, labels = torch.randn(2, 3, 4, 4), torch.eye(4)[:2]
    assert torch.equal(a(x, 1.0, labels), b(x, 1.0, labels))


def test_lpips_avg_pooling_matches_piq_recipe(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("CM_WEIGHTS", str(tmp_path))
    torch.manual_seed(0)
    feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # vgg16.features
    state = {f"features.{k}": v for k, v in feats.state_dict().items()}
    torch.save(state, tmp_path / "vgg16-397923af.pth")
    register_weights(monkeypatch, "vgg16", tmp_path / "vgg16-397923af.pth")
    d_max, d_avg = LPIPS(resize=0), LPIPS(resize=0, pooling="avg")
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in d_avg.modules())
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    assert not torch.allclose(d_max(x, y), d_avg(x, y))
    # piq's LPIPS(replace_pooling=True) on (x + 1) / 2, written out (openai/consistency_models)
    for i, m in enumerate(feats):
        if isinstance(m, torch.nn.MaxPool2d):
            feats[i] = torch.nn.AvgPool2d(2, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    heads = [lin.model[-1].weight.view(1, -1, 1, 1) for lin in d_avg.lpips.lins]

    def features(v):
        h, out = (((v + 1) / 2) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), []
        for i, m in enumerate(feats[:30]):
            h = m(h)
            if i in (3, 8, 15, 22, 29):  # relu1_2 ... relu5_3
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    with torch.no_grad():
        ref = sum(
            ((a - b) ** 2 * w).mean((2, 3)).sum(1)
            for a, b, w in zip(features(x), features(y), heads, strict=True)
        )
    assert torch.allclose(d_avg(x, y), ref, rtol=1e-4, atol=1e-6)
    # bf16 autocast (the paper configs' precision) must not reach the metric network
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = d_avg(x.bfloat16(), y.bfloat16())
    assert in_bf16.dtype == torch.float32
    assert torch.equal(in_bf16, d_avg(x.bfloat16().float(), y.bfloat16().float()))


def _fit(config: str, root: Path, steps: int, *extra: str) -> Path:
    log_every = "--trainer.log_every_n_steps=1"
    main(fit_args(root, log_every, *extra, steps=steps, config=CONFIGS / config))
    return root


def _first_loss(root: Path) -> float:
    rows = csv.DictReader(next(root.glob("**/metrics.csv")).open())
    return next(float(r["train/loss"]) for r in rows if r.get("train/loss"))


def test_cd_mixture_distance_reaches_loss_and_rmse_script(tmp_path, capsys):
    # the YAML distance choice must reach the logged loss (openai's code ignores it)
    small = ["--data.init_args.dataset.init_args.num_samples=64"]
    l2 = _fit("cd_mixture.yaml", tmp_path / "l2", 2, *small)
    l1 = _fit(
        "cd_mixture.yaml",
        tmp_path / "l1",
        1,
        *small,
        "--model.init_args.objective.init_args.distance=cm.objectives.L1",
    )
    assert _first_loss(l2) != _first_loss(l1)
    ckpt = next(l2.glob("**/checkpoints/*.ckpt"))
    spec = importlib.util.spec_from_file_location("rmse", ROOT / "scripts" / "cd_mixture_rmse.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--ckpt_path", str(ckpt), "--num", "6", "--steps", "8"])
    assert 0 < result["baseline"] and 0 < result["rmse"] < float("inf")
    assert "one-step RMSE" in capsys.readouterr().out


def test_cd_digits_from_an_exported_edm_teacher(tmp_path):
    teacher = _fit("edm_digits.yaml", tmp_path / "edm", 1)
    export = tmp_path / "export"
    main(["export", "--ckpt_path", str(next(teacher.glob("**/*.ckpt"))), "--out", str(export)])
    root = _fit(
        "cd_digits.yaml",
        tmp_path / "cd",
        1,
        f"--model.init_args.objective.init_args.teacher.init_args.path={export}",
    )
    state = torch.load(next(root.glob("**/*.ckpt")), weights_only=True)["state_dict"]
    assert not any(k.startswith("objective.teacher") for k in state)  # never checkpointed
