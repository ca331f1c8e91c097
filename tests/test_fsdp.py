"""Sharded training (``cm.training.FSDP``, FSDP2 on gloo): DDP's weights, bitwise resume, one file.

FSDP2's collectives (``all_gather_into_tensor``, ``reduce_scatter_tensor``) run on gloo in
torch 2.14, so these are real 2-process CPU runs. ``ModelParallelStrategy`` launches its ranks by
re-running the command (no spawn variant), so each run is a ``python -m cm fit`` subprocess.
"""

import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, ICT_DIGITS, ROOT, fails, fit_args
from test_ddp import SGD, STEPS, assert_same_training_state
from test_ddp import fit as ddp_fit
from test_diffusion2gan import CONFIG as D2G_CONFIG
from test_diffusion2gan import OPTIMIZERS as D2G_OPTIMIZERS
from test_diffusion2gan import write_pairs
from test_resilience import assert_identical, cm_fit

from cm.checkpoint import load_checkpoint
from cm.cli import main
from cm.sharded import is_sharded, read_meta, read_sharded

FSDP_YAML = str(CONFIGS / "strategies" / "fsdp.yaml")
OBJECTIVE = "--model.init_args.objective.init_args"
TWO_RANKS = ["--trainer.accelerator=cpu", "--trainer.devices=2"]
FSDP_ARGS = ["--config", FSDP_YAML, *TWO_RANKS]


def cm(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m cm *args`` in ``root`` (one thread per rank; the tests' helpers importable)."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    command = [sys.executable, "-m", "cm", *args]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def fsdp_run(root: Path, *extra: str, config: str | Path = ICT_DIGITS) -> Path:
    """As ``test_ddp.fit`` (flips, global batch 16, SGD), 2 ranks under FSDP: its checkpoint."""
    args = [*FSDP_ARGS, "--data.init_args.flip=true"]
    args += ["--trainer.callbacks.init_args.final_num=0", *SGD]
    args += ["--model.init_args.optimizer.init_args.momentum=0.9", *extra]
    result = cm(root, *fit_args(root, *args, steps=STEPS, config=config))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "FSDP over 2 ranks: sharded denoiser" in result.stderr
    (ckpt,) = root.glob("**/checkpoints/*.ckpt")
    assert is_sharded(ckpt) and len(list(ckpt.glob("*.distcp"))) == 2  # one shard per rank
    return ckpt


def fsdp_fit(root: Path, *extra: str, config: str | Path = ICT_DIGITS) -> dict:
    """``fsdp_run``'s checkpoint as one dict (full tensors, optimizer states by index)."""
    return read_sharded(fsdp_run(root, *extra, config=config))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The tiny iCT run under FSDP on 2 ranks: its sharded checkpoint directory."""
    return fsdp_run(tmp_path_factory.mktemp("fsdp"))


def test_two_rank_fsdp_matches_two_rank_ddp(sharded, tmp_path):
    ddp = ddp_fit(tmp_path, "--trainer.devices=2", "--trainer.strategy=ddp_spawn")
    assert_same_training_state(ddp, read_sharded(sharded))


def test_consolidated_checkpoint_exports_and_samples(sharded, tmp_path):
    # `cm consolidate` writes the one-file .ckpt of a single-device run: the loaders of
    # cm export / cm sample read it (weights only), and it holds every full tensor.
    out = tmp_path / "model.ckpt"
    main(["consolidate", str(sharded), "--out", str(out)])
    whole = torch.load(out, weights_only=True)
    state = read_sharded(sharded)
    assert whole["global_step"] == STEPS
    assert whole["state_dict"].keys() == state["state_dict"].keys()
    for key, value in state["state_dict"].items():
        assert torch.equal(whole["state_dict"][key], value), key
    denoiser, _ = load_checkpoint(out)
    ema = {k.removeprefix("ema_denoiser."): v for k, v in state["state_dict"].items()}
    for key, value in denoiser.state_dict().items():
        assert torch.equal(value, ema[key]), key
    main(["export", "--ckpt_path", str(out), "--out", str(tmp_path / "export")])
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_sharded_checkpoint_errors_name_the_way_out(sharded, tmp_path, capsys):
    # A sharded directory under a strategy that cannot read it, and `cm consolidate` onto its
    # input or of something else: one line each saying what to do.
    args = fit_args(tmp_path, "--trainer.accelerator=cpu", *SGD, f"--ckpt_path={sharded}")
    fails(args, "is a sharded checkpoint .*cm consolidate", capsys)
    fails(["consolidate", str(sharded), "--out", str(sharded)], "one of this command's", capsys)
    (tmp_path / "empty").mkdir()
    elsewhere = ["consolidate", str(tmp_path / "empty"), "--out", str(tmp_path / "x.ckpt")]
    fails(elsewhere, "not a sharded checkpoint", capsys)


@pytest.mark.slow  # README's `pytest` skips it; .ci/run runs `pytest -m slow` too
@pytest.mark.parametrize(
    "config, extra",
    [
        # CD/CT's target network theta- (mu = 0.9): replicated, blended from the gathered weights
        (ICT_DIGITS, [f"{OBJECTIVE}.mu0=0.9"]),
        # sCT: no-grad JVP tangent through the sharded denoiser; the weighting head is sharded too
        (CONFIGS / "sct_digits.yaml", [f"{OBJECTIVE}.tangent_warmup_steps=2"]),
        # MeanFlow: the same tangent pass through the sharded flow map
        (CONFIGS / "meanflow_digits.yaml", []),
    ],
    ids=["target_network", "sct_jvp", "meanflow_jvp"],
)
def test_two_rank_fsdp_matches_one_process(tmp_path, config, extra):
    # test_ddp shows one process with the whole batch equals 2-rank DDP for these objectives.
    single = ddp_fit(tmp_path / "single", *extra, config=config)
    fsdp = fsdp_fit(tmp_path / "fsdp", *extra, config=config)
    assert_same_training_state(single, fsdp)


@pytest.mark.slow
def test_preempted_fsdp_run_resumes_bitwise(tmp_path):
    # SIGTERM to rank 0 mid-step 6: both ranks write last.ckpt/ at the step boundary (step 7);
    # `--ckpt_path last` finds the directory and ends bitwise as the uninterrupted run.
    fsdp = ["--config", FSDP_YAML, "--trainer.devices=2"]  # cm_fit sets the CPU accelerator
    whole, cut = tmp_path / "uninterrupted", tmp_path / "preempted"
    assert (result := cm_fit(whole, *fsdp)).returncode == 0, result.stderr[-4000:]
    result = cm_fit(cut, *fsdp, signal_at=(6, signal.SIGTERM, 0))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Preempted by SIGTERM: checkpoint of step 7" in result.stderr
    checkpoints = cut / "version_0" / "checkpoints"
    assert is_sharded(checkpoints / "last.ckpt")
    assert read_meta(checkpoints / "last.ckpt")["global_step"] == 7
    assert not list(checkpoints.glob(".*"))  # no partial directory left behind
    result = cm_fit(cut, *fsdp, "--ckpt_path=last")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Restored all states from the checkpoint at {checkpoints}" in result.stderr
    assert_identical(*(read_sharded(r / "version_0/checkpoints/last.ckpt") for r in (whole, cut)))


@pytest.mark.slow
def test_sharded_resume_applies_lr_override(sharded, tmp_path):
    # The shards restore the optimizers before the callbacks see the checkpoint: a new lr
    # beside --ckpt_path must still reach them (cm.training.overrides).
    ckpt = shutil.copytree(sharded, tmp_path / "run" / "checkpoints" / sharded.name)
    args = [*FSDP_ARGS, *SGD, f"--ckpt_path={ckpt}"]
    args += ["--model.init_args.optimizer.init_args.momentum=0.9"]
    args += ["--model.init_args.optimizer.init_args.lr=0.0123"]
    args += ["--trainer.callbacks.init_args.final_num=0"]
    result = cm(tmp_path, *fit_args(tmp_path, *args, steps=STEPS + 1))
    assert result.returncode == 0, result.stderr[-4000:]
    (resumed,) = tmp_path.glob(f"**/checkpoints/epoch=0-step={STEPS + 1}.ckpt")
    resumed = read_sharded(resumed)
    assert resumed["global_step"] == STEPS + 1
    assert [g["lr"] for g in resumed["optimizer_states"][0]["param_groups"]] == [0.0123]


def d2g_args(root: Path, pairs: Path, *extra: str) -> list[str]:
    """``test_diffusion2gan.d2g_fit``'s run (2 G+D iterations, random tiny G and D, SGD)."""
    net = ["model_channels=16", "num_res_blocks=1", "num_head_channels=16", "num_groups=8"]
    args = ["fit", "--config", str(D2G_CONFIG), "--trainer.max_steps=2"]
    args += [f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}"]
    args += ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
    args += ["--trainer.callbacks=[]", "--model.init_args.teacher=null"]
    for module in ("denoiser", "discriminator"):
        args += [f"--model.init_args.{module}.init_args.net.init_args.{a}" for a in net]
    args += ["--model.init_args.discriminator.init_args.num_groups=8"]
    args += [f"--model.init_args.{o}=torch.optim.SGD" for o in D2G_OPTIMIZERS]
    args += [f"--model.init_args.{o}.init_args.lr=0.01" for o in D2G_OPTIMIZERS]
    args += ["--model.init_args.mix_fraction=0.5", f"--data.init_args.root={pairs}"]
    return [*args, "--data.init_args.batch_size=8", *extra]


@pytest.mark.slow
def test_diffusion2gan_shards_generator_and_discriminator(tmp_path):
    # Manual optimization of G and D, mix-and-match over the gathered batch: 2 ranks under
    # FSDP equal one process (test_diffusion2gan: and 2-rank DDP), without and with R1.
    pairs = write_pairs(tmp_path / "pairs")
    no_r1 = "--model.init_args.r1_gamma=0"
    main(d2g_args(tmp_path / "one", pairs, no_r1))
    (single,) = (tmp_path / "one").glob("**/checkpoints/*.ckpt")
    no_r1_state = torch.load(single, weights_only=True)["state_dict"]
    result = cm(tmp_path / "two", *d2g_args(tmp_path / "two", pairs, no_r1, *FSDP_ARGS))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sharded denoiser, discriminator" in result.stderr
    (sharded,) = (tmp_path / "two").glob("**/checkpoints/*.ckpt")
    single, fsdp = torch.load(single, weights_only=True), read_sharded(sharded)
    assert single["global_step"] == fsdp["global_step"] == 2
    assert any(k.startswith("discriminator.") for k in single["state_dict"])
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(value, fsdp["state_dict"][key], msg=key)
    # R1 on every iteration: its double backward through the sharded D (kept gathered)
    with_r1 = "--model.init_args.r1_interval=1"
    main(d2g_args(tmp_path / "one_r1", pairs, with_r1))
    (single,) = (tmp_path / "one_r1").glob("**/checkpoints/*.ckpt")
    result = cm(tmp_path / "two_r1", *d2g_args(tmp_path / "two_r1", pairs, with_r1, *FSDP_ARGS))
    assert result.returncode == 0, result.stderr[-4000:]
    (sharded,) = (tmp_path / "two_r1").glob("**/checkpoints/*.ckpt")
    single, fsdp = torch.load(single, weights_only=True), read_sharded(sharded)
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(value, fsdp["state_dict"][key], msg=key)
    r1_moved = [k for k, v in no_r1_state.items() if not torch.equal(v, fsdp["state_dict"][k])]
    assert any(k.startswith("discriminator.") for k in r1_moved)  # R1 reached D's weights


def test_module_without_ema_is_refused_before_the_ranks_start(tmp_path, capsys):
    # The sharded online denoiser cannot sample on rank 0 alone: an EMA copy is required.
    args = fit_args(tmp_path, *FSDP_ARGS, "--model.init_args.ema=null")
    fails(args, "samples with the replicated EMA copy.*decay: 0.0", capsys)


class Gadget:
    """A pickle that runs ``touch path`` when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_shard_index_with_pickled_code_is_refused(sharded, tmp_path, capsys):
    # DCP unpickles its .metadata: cm reads it against an allowlist first, in every command.
    bad = shutil.copytree(sharded, tmp_path / "bad.ckpt")
    marker = tmp_path / "pwned"
    (bad / ".metadata").write_bytes(pickle.dumps(Gadget(marker)))
    out = ["--out", str(tmp_path / "x.ckpt")]
    fails(["consolidate", str(bad), *out], "sharded checkpoint's index .*posix.system", capsys)
    resume = fit_args(tmp_path / "run", *FSDP_ARGS, *SGD, f"--ckpt_path={bad}")
    fails(resume, "sharded checkpoint's index", capsys)
    assert not marker.exists()


def test_export_and_sample_read_the_sharded_directory(sharded, tmp_path):
    # cm.checkpoint reads cm.training.FSDP's checkpoint directory itself (weights only).
    main(["export", "--ckpt_path", str(sharded), "--out", str(tmp_path / "export")])
    assert (tmp_path / "export" / "model.safetensors").is_file()
    main(["sample", "--ckpt_path", str(sharded), "--num", "4", "--out", str(tmp_path / "s.npz")])
    denoiser, _ = load_checkpoint(sharded)
    state = read_sharded(sharded, optimizers=False)["state_dict"]
    for key, value in denoiser.state_dict().items():
        assert torch.equal(value, state[f"ema_denoiser.{key}"]), key
