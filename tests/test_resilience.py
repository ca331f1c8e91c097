"""Resilience: preemption (SIGTERM/SIGUSR1, kill -9) and resume, non-finite steps, safe loading."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import ROOT, amed_yaml, cpu_trainer, fit_args, tiny_adm

STEPS = 12


class Signal(L.Callback):
    """Test helper: rank ``rank`` (all if None) sends itself ``signum`` as step ``step`` starts."""

    def __init__(self, step: int, signum: int, rank: int | None = None) -> None:
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Mid-step on purpose: the checkpoint must wait for the step boundary."""
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


def cm_fit(root: Path, *extra: str, signal_at: tuple[int, ...] | None = None):
    """``python -m cm fit`` of the tiny digits quickstart, ``STEPS`` steps, checkpoints every 4."""
    callbacks = [
        {"class_path": "cm.training.SampleGrid", "init_args": {"every_n_steps": 0, "num": 2}},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            # no dirpath: cm puts checkpoints in this run's own version_N/checkpoints, where
            # `cm fit --ckpt_path last` finds them (and the resumed run writes on).
            "init_args": {
                "every_n_train_steps": 4,
                "save_last": True,
            },
        },
        {"class_path": "cm.training.resilience.Preemption"},
    ]
    if signal_at is not None:
        step, signum, *rank = signal_at
        init = {"step": step, "signum": int(signum), "rank": rank[0] if rank else None}
        callbacks.insert(0, {"class_path": "test_resilience.Signal", "init_args": init})
    root.mkdir(parents=True, exist_ok=True)
    overlay = root / "callbacks.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    args = fit_args(
        root, "--config", str(overlay), "--trainer.accelerator=cpu", *extra, steps=STEPS
    )
    command = [sys.executable, "-m", "cm", *args]
    # Resuming must work with torch.load(weights_only=True) forced (Lightning passes None).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"),
           "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}  # fmt: skip
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def last(root: Path) -> dict:
    """The (only) run's ``last.ckpt``, loaded the safe way."""
    return torch.load(root / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The reference: ``STEPS`` steps in one go."""
    root = tmp_path_factory.mktemp("uninterrupted")
    result = cm_fit(root)
    assert result.returncode == 0, result.stderr[-3000:]
    return last(root)


def assert_identical(a: dict, b: dict) -> None:
    """Bitwise-equal step, weights, EMA, target network and optimizer state (CPU, 1 thread)."""
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("ema_denoiser.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for index, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][index][key]), (index, key)


def assert_resumes_identically(uninterrupted: dict, root: Path) -> None:
    """``cm fit --ckpt_path last`` restores (not restarts) and ends as the uninterrupted run."""
    result = cm_fit(root, "--ckpt_path=last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {root / 'version_0'}" in (
        result.stderr
    )  # resumed, not restarted (a restart would also end identical: everything is seeded)
    assert_identical(uninterrupted, last(root))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_at_step_boundary_and_resumes(uninterrupted, tmp_path, signum):
    result = cm_fit(tmp_path, signal_at=(6, signum))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Preempted by {signum.name}: checkpoint of step 7" in result.stderr
    # the signal came while step 6 ran: the checkpoint holds the finished step 7
    assert last(tmp_path)["global_step"] == 7
    assert_resumes_identically(uninterrupted, tmp_path)


def test_sigterm_to_one_ddp_rank_stops_all_ranks_at_the_same_step(tmp_path):
    # Only rank 1 is signalled: the all-reduced flag stops rank 0 at the same step boundary.
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp"]
    result = cm_fit(tmp_path, *ddp, signal_at=(6, signal.SIGTERM, 1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Preempted by a signal: checkpoint of step 7" in result.stderr  # rank 0's words
    assert last(tmp_path)["global_step"] == 7


def test_slurm_requeue_still_works_and_resume_is_exact(uninterrupted, tmp_path, monkeypatch):
    # A one-task SLURM job: Lightning's SIGUSR1 handler writes hpc_ckpt and calls a stand-in
    # `scontrol requeue`; Preemption then checkpoints at the step boundary.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "requeued"}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "cm", "SLURM_JOB_ID": "4242",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost", "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    result = cm_fit(tmp_path / "run", signal_at=(6, signal.SIGUSR1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    assert list((tmp_path / "run").glob("hpc_ckpt_*.ckpt"))
    assert last(tmp_path / "run")["global_step"] == 7
    result = cm_fit(tmp_path / "run", "--ckpt_path=last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_identical(uninterrupted, last(tmp_path / "run"))


def test_kill_9_resumes_from_periodic_checkpoint(uninterrupted, tmp_path):
    result = cm_fit(tmp_path, signal_at=(6, signal.SIGKILL))
    assert result.returncode == -signal.SIGKILL
    assert last(tmp_path)["global_step"] == 4  # the last periodic checkpoint
    assert_resumes_identically(uninterrupted, tmp_path)


class Poison(L.Callback):
    """Test helper: a NaN data batch (``"loss"``) or an Inf gradient (``"grad"``) at ``step``."""

    def __init__(self, step: int, where: str = "loss") -> None:
        self.step, self.where = step, where

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """NaN images make the loss NaN."""
        if trainer.global_step == self.step and self.where == "loss":
            batch[0].fill_(float("nan"))

    def on_after_backward(self, trainer, pl_module) -> None:
        """An Inf in one gradient coordinate, with a finite loss."""
        if trainer.global_step == self.step and self.where == "grad":
            next(pl_module.denoiser.parameters()).grad.view(-1)[0] = float("inf")


class Snapshot(L.Callback):
    """Test helper: weights, EMA, Adam state and skip counter after each optimizer step."""

    def __init__(self) -> None:
        self.states: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Deep copies, keyed by the number of finished steps."""
        optimizer = trainer.optimizers[0].state_dict()["state"]
        self.states[trainer.global_step] = {
            "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "optimizer": {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.items()},
            "skipped": pl_module.skipped_steps,
            "logged": trainer.callback_metrics.get("train/skipped_steps"),
        }


def tiny_fit(
    steps: int,
    *callbacks: L.Callback,
    nonfinite: str = "skip",
    max_consecutive_skips: int = 10,
    ckpt_path=None,
    **trainer,
) -> None:
    """EDM steps of a tiny UNet on digits, in process."""
    from cm.ema import EMA
    from cm.objectives import DenoisingScoreMatching
    from cm.precond import EDMPrecond
    from cm.training import DenoiserModule, ImageDataModule

    L.seed_everything(0)
    net = tiny_adm(channel_mult=[1], attention_resolutions=[])
    module = DenoiserModule(
        EDMPrecond(net),
        DenoisingScoreMatching(),
        ema=EMA(halflife_kimg=0.01),
        nonfinite=nonfinite,
        max_consecutive_skips=max_consecutive_skips,
    )
    trainer = cpu_trainer(None, *callbacks, max_steps=steps, **trainer)
    data = ImageDataModule("digits", resolution=8, batch_size=8, flip=True)
    trainer.fit(module, data, ckpt_path=ckpt_path)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_skip_leaves_state_untouched_and_continues(where):
    clean, poisoned = Snapshot(), Snapshot()
    tiny_fit(4, clean)
    tiny_fit(4, poisoned, Poison(2, where))
    before, skipped = clean.states[2], poisoned.states[3]
    assert poisoned.states[2]["skipped"] == 0 and skipped["skipped"] == 1
    assert float(skipped["logged"]) == 1.0
    for key, value in before["weights"].items():  # weights, EMA weights: bitwise unchanged
        assert torch.equal(value, skipped["weights"][key]), key
    for index, state in before["optimizer"].items():  # Adam moments and step count too
        for key, value in state.items():
            assert torch.equal(value, skipped["optimizer"][index][key]), (index, key)
    after = poisoned.states[4]  # training went on, finite
    changed = [not torch.equal(v, after["weights"][k]) for k, v in skipped["weights"].items()]
    assert any(changed) and all(torch.isfinite(v).all() for v in after["weights"].values())


def test_skip_streak_survives_a_resume(tmp_path):
    """A resumed run keeps counting the streak: skips at steps 1 and 2 make 2 in a row."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    tiny_fit(2, Poison(1), checkpoint, max_consecutive_skips=2, enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["nonfinite_skipped_steps"] == 1 and saved["nonfinite_skip_streaks"] == {0: 1}
    with pytest.raises(ValueError, match="in 2 steps in a row"):
        tiny_fit(3, Poison(2), max_consecutive_skips=2, ckpt_path=tmp_path / "last.ckpt")


def test_nonfinite_stop_ends_the_cli_run_with_one_line(tmp_path, capsys):
    from cm.cli import main

    overlay = tmp_path / "poison.yaml"
    callbacks = [{"class_path": "test_resilience.Poison", "init_args": {"step": 1}}]
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, "--config", str(overlay), "--trainer.accelerator=cpu", steps=3))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: Non-finite loss or gradients at step 1: the run diverged;")
    assert "model.init_args.nonfinite=skip" in err


def test_amed_checkpoint_resumes_weights_only(tmp_path, monkeypatch):
    from cm.cli import main

    path = amed_yaml(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["data"]["init_args"].update(num=16, batch_size=8)
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    (ckpt,) = tmp_path.glob("**/checkpoints/epoch=*.ckpt")  # the end-of-epoch checkpoint
    first = torch.load(ckpt, weights_only=True)["global_step"]
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    main(["fit", "--config", str(path), f"--ckpt_path={ckpt}", "--trainer.max_epochs=2"])
    resumed = max(tmp_path.glob("**/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert torch.load(resumed, weights_only=True)["global_step"] == 2 * first > 0


def test_sigterm_inside_accumulation_waits_for_the_optimizer_step(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cm.training.resilience import Preemption

    def run(steps: int, *callbacks: L.Callback, ckpt_path=None) -> None:
        checkpoint = ModelCheckpoint(dirpath=tmp_path / callbacks[0].name, save_last=True)
        tiny_fit(steps, *callbacks[1:], checkpoint, Preemption(), ckpt_path=ckpt_path,
                 enable_checkpointing=True, accumulate_grad_batches=2)  # fmt: skip

    run(4, Named("full"))
    original = signal.getsignal(signal.SIGTERM)
    # SIGTERM on the first of step 2's two micro-batches: the checkpoint holds finished step 3
    with pytest.raises(SystemExit):
        run(4, Named("cut"), Signal(2, signal.SIGTERM))
    assert signal.getsignal(signal.SIGTERM) == original  # handlers were given back
    ckpt = tmp_path / "cut" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    run(4, Named("cut"), ckpt_path=ckpt)
    a, b = (torch.load(tmp_path / n / "last.ckpt", weights_only=True) for n in ("full", "cut"))
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


class Named(L.Callback):
    """Test helper: names a run's checkpoint directory."""

    def __init__(self, name: str) -> None:
        self.name = name
