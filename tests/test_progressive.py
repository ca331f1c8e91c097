"""Progressive distillation (Salimans & Ho 2022): the target, the weighting, rounds via the CLI."""

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, ROOT, TINY_YAML, fit_args, tiny_adm

from cm.objectives import ProgressiveDistillation
from cm.objectives.progressive import pd_target
from cm.oracle import GaussianMixture
from cm.precond import EDMPrecond
from cm.solvers import ddim, euler_step


def tiny_edm(seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    return EDMPrecond(tiny_adm(label_dim=0, attention_resolutions=[]))


def per_sample_ddim(teacher, x, grid, labels=None):
    """Reference: run ``ddim`` sample by sample on its own float grid."""
    return torch.cat([ddim(teacher, x[k : k + 1], grid[k]) for k in range(len(x))])


def test_target_matches_two_teacher_steps_exactly():
    # one student DDIM step with D = x0~ lands where two teacher DDIM steps land, for every i
    teacher = GaussianMixture.random(num_components=1, std=0.3, seed=1)
    n_steps = 4
    pd = ProgressiveDistillation(teacher, student_steps=n_steps, init_from_teacher=False)
    grid, student_grid = pd.grids()
    assert torch.equal(student_grid, grid[::2]) and len(student_grid) == n_steps + 1
    i = torch.arange(n_steps).repeat(3)  # every student interval, 3 samples each
    sigma, sigma_mid, sigma_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    x0, _ = teacher.sample(len(i), torch.Generator().manual_seed(0))
    x = (x0 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x0)).float()
    x0_tilde = pd.target(x, sigma, sigma_mid, sigma_next)
    student_step = euler_step(lambda *_: x0_tilde, x, sigma, sigma_next)
    reference = per_sample_ddim(teacher, x, torch.stack([sigma, sigma_mid, sigma_next], 1))
    torch.testing.assert_close(student_step, reference, rtol=1e-4, atol=1e-4)
    # the last interval ends at 0, where the target is the teacher's result itself
    last = i == n_steps - 1
    torch.testing.assert_close(x0_tilde[last], reference[last])


def test_pd_target_formula():
    x, x_teacher = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    sigma, sigma_next = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0])
    x0_tilde = pd_target(x, x_teacher, sigma, sigma_next)
    torch.testing.assert_close(x0_tilde[0], 2 * x_teacher[0] - x[0])  # r = 1/2
    torch.testing.assert_close(x0_tilde[1], x_teacher[1])  # sigma' = 0


def test_student_from_teacher_one_step_target_is_two_teacher_steps():
    teacher, student = tiny_edm(0), tiny_edm(1)
    pd = ProgressiveDistillation(teacher, student_steps=1)
    pd.bind(student)  # init_from_teacher: the student starts as the teacher
    for p, q in zip(student.parameters(), teacher.parameters(), strict=True):
        assert torch.equal(p, q)
    grid, _ = pd.grids()
    x = 80.0 * torch.randn(3, 1, 8, 8)
    sigma, sigma_mid, sigma_next = (grid[k].expand(3) for k in range(3))
    x0_tilde = pd.target(x, sigma, sigma_mid, sigma_next)
    torch.testing.assert_close(x0_tilde, ddim(teacher, x, grid), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0_tilde, ddim(student, x, grid), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_student():
    teacher, student = tiny_edm(0), tiny_edm(1)
    pd = ProgressiveDistillation(teacher, student_steps=2, init_from_teacher=False)
    pd.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.manual_seed(0)
    loss = pd(student, torch.rand(4, 1, 8, 8) * 2 - 1, None, 0, 10)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert pd.metrics() == {"student_steps": 2.0}


def test_weighting_values():
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    truncated = ProgressiveDistillation(tiny_edm(), weighting="truncated_snr")
    snr1 = ProgressiveDistillation(tiny_edm(), weighting="snr+1")
    torch.testing.assert_close(truncated.weight(sigma), torch.tensor([4.0, 1.0, 1.0]).double())
    torch.testing.assert_close(snr1.weight(sigma), torch.tensor([5.0, 2.0, 1.25]).double())


def test_bad_student_steps_is_clear():
    with pytest.raises(ValueError, match="student_steps must be at least 1"):
        ProgressiveDistillation(tiny_edm(), student_steps=0)


def load_script():
    spec = importlib.util.spec_from_file_location(
        "progressive_distillation", ROOT / "scripts" / "progressive_distillation.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_round_schedule():
    script = load_script()
    assert script.student_steps(1024, 1) == [2**k for k in range(9, -1, -1)]
    assert script.student_steps(12, 3) == [6, 3]
    with pytest.raises(ValueError, match="power of two"):
        script.student_steps(12, 1)


def test_rounds_chain_exports_and_resume(tmp_path):
    from cm.cli import main

    teacher_root = tmp_path / "teacher"
    main(fit_args(teacher_root, steps=2, config=CONFIGS / "edm_digits.yaml"))
    ckpt = next(teacher_root.glob("**/checkpoints/*.ckpt"))
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "teacher_export")])

    script = load_script()
    argv = [
        "--config",
        str(CONFIGS / "pd_digits.yaml"),
        "--config",
        TINY_YAML,
        "--teacher",
        str(tmp_path / "teacher_export"),
        "--start_steps",
        "4",
        "--end_steps",
        "1",
        "--root",
        str(tmp_path / "pd"),
        "--trainer.max_steps=2",  # passed through to cm fit
    ]
    rows = script.main(argv)
    assert [(r["student_steps"], r["status"]) for r in rows] == [(2, "trained"), (1, "trained")]
    exports = [tmp_path / "pd" / f"steps_{n}" / "export" for n in (2, 1)]
    for export in exports:
        assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    # round 2 was configured with round 1's export as its teacher, and N = 1
    second = script.last_checkpoint(tmp_path / "pd" / "steps_1")
    state = torch.load(second, weights_only=True)
    assert not any(k.startswith("objective.teacher") for k in state["state_dict"])  # not saved
    hparams = state["hyper_parameters"]
    objective = hparams["objective"]["init_args"]
    assert objective["student_steps"] == 1
    assert Path(objective["teacher"]["init_args"]["path"]) == exports[0]
    assert hparams["sampler"]["init_args"]["num_steps"] == 1
    # a rerun trains nothing
    stamps = [(e / "model.safetensors").stat().st_mtime_ns for e in exports]
    rows = script.main(argv)
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert [(e / "model.safetensors").stat().st_mtime_ns for e in exports] == stamps
