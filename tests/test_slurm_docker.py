"""slurm/*.sbatch run under a fake ``srun`` build valid ``cm`` command lines; docker/ lints."""

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cm.cli import main

ROOT = Path(__file__).parents[1]
TRAIN, SAMPLE = ROOT / "slurm" / "train.sbatch", ROOT / "slurm" / "sample.sbatch"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def fake_bin(directory: Path) -> Path:
    """``srun``/``cm`` that record their arguments (NUL-separated) and ``scontrol`` for hosts."""
    directory.mkdir()
    scripts = {
        "srun": 'printf "%s\\0" "$@" > "$FAKE_LOG"\n'
        'echo "$WANDB_RUN_ID $WANDB_RESUME" > "$FAKE_ENV"',
        "cm": 'printf "%s\\0" "$@" > "$FAKE_LOG"',
        "scontrol": 'printf "node1\\nnode2\\n"',
    }
    for name, body in scripts.items():
        (directory / name).write_text(f"#!/bin/bash\n{body}\n")
        (directory / name).chmod(stat.S_IRWXU)
    return directory


def run_script(script: Path, tmp_path: Path, args: list[str], **env: str) -> list[str]:
    """Run ``script`` in ``tmp_path`` with the fake binaries; the recorded arguments."""
    bin_dir = fake_bin(tmp_path / "bin")
    log = tmp_path / "args"
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
        + os.environ["PATH"],
        "FAKE_LOG": str(log),
        "FAKE_ENV": str(tmp_path / "env"),
        "PYTHONPATH": str(ROOT),
        **env,
    }
    subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=full_env, check=True)
    return log.read_bytes().decode().split("\0")[:-1]


@pytest.mark.parametrize("script", [TRAIN, SAMPLE], ids=["train", "sample"])
def test_sbatch_syntax_and_directives(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    directives = dict(
        re.fullmatch(r"#SBATCH --([\w-]+)(?:=(.*))?", line).groups()
        for line in text.splitlines()
        if line.startswith("#SBATCH")
    )
    assert text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text
    if script == TRAIN:
        assert directives["signal"] == "SIGUSR1@90"
        assert "requeue" in directives and directives["open-mode"] == "append"
        assert directives["ntasks-per-node"] == directives["gpus-per-node"]
        assert re.search(r"srun .*\$CM \"\$\{ARGS\[@\]\}\"", text)
    else:
        assert "array" in directives and directives["gpus"] == "1"


SLURM_ENV = {
    "SLURM_JOB_NAME": "cm-train",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_JOB_NODELIST": "node[1-2]",
    "SLURM_CPUS_PER_TASK": "8",
}


def test_train_sbatch_command_parses(tmp_path, capsys):
    """The ``cm fit`` line of train.sbatch, with a real paper config, passes --print_config."""
    config = str(ROOT / "configs" / "ct_imagenet64.yaml")
    argv = run_script(TRAIN, tmp_path, [config, "--trainer.max_steps=10"], **SLURM_ENV)
    assert argv[:3] == ["--kill-on-bad-exit=1", "cm", "fit"]
    run_dir = "runs/cm-train-4242"
    assert (tmp_path / run_dir).is_dir()
    assert (tmp_path / "env").read_text().split() == ["cm-train-4242", "allow"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[2:], "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    trainer = printed["trainer"]
    # devices stays the string "4" (its type is int | str | list); Lightning reads it as 4 GPUs
    assert (trainer["num_nodes"], str(trainer["devices"]), trainer["strategy"]) == (2, "4", "ddp")
    assert trainer["default_root_dir"] == run_dir and trainer["max_steps"] == 10
    assert trainer["logger"]["init_args"]["save_dir"] == run_dir
    assert printed["ckpt_path"] is None  # a first start: `last` with nothing there is an error
    # A requeued job finds its run's last.ckpt (Preemption's, at a step boundary) and resumes it.
    checkpoints = tmp_path / run_dir / "cm" / "cm-train-4242" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").touch()
    (tmp_path / "requeued").mkdir()
    run = str(tmp_path / run_dir)
    argv = run_script(TRAIN, tmp_path / "requeued", [config], CM_RUN_DIR=run, **SLURM_ENV)
    assert argv[-1] == "--ckpt_path=last"


def test_sample_sbatch_shards_and_eval(tmp_path):
    """Array task 2 of 3 samples seeds 8..9 of 10; the eval stage merges shards in seed order."""
    argv = run_script(
        SAMPLE, tmp_path, ["model.ckpt", "out", "--batch_size", "5"],
        NUM="10", SLURM_ARRAY_TASK_COUNT="3", SLURM_ARRAY_TASK_ID="2",
    )  # fmt: skip
    assert argv == [
        "cm", "sample", "--ckpt_path", "model.ckpt", "--seed", "8", "--num", "2",
        "--out", "out/shard-00008.npz", "--batch_size", "5",
    ]  # fmt: skip
    for first, count in [(0, 4), (4, 4), (8, 2)]:
        seeds = np.arange(first, first + count, dtype=np.uint8)
        np.savez(tmp_path / "out" / f"shard-{first:05d}.npz", arr_0=np.broadcast_to(
            seeds[:, None, None, None], (count, 4, 4, 3)))  # fmt: skip
    shutil.rmtree(tmp_path / "bin")
    argv = run_script(
        SAMPLE, tmp_path, ["model.ckpt", "out", "--ref", "ref.npz"],
        NUM="10", SLURM_ARRAY_TASK_COUNT="1", SLURM_ARRAY_TASK_ID="0", STAGE="eval",
    )  # fmt: skip
    assert argv == ["eval", "out/samples.npz", "--ref", "ref.npz"]
    merged = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert merged[:, 0, 0, 0].tolist() == list(range(10))


KNOWN = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    lines = (line.strip() for line in joined.splitlines())
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_parses():
    """Every instruction known, FROM first (ARGs aside), non-root USER before the entrypoint."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    names = [name.upper() for name, _ in instructions]
    assert set(names) <= KNOWN, set(names) - KNOWN
    assert [n for n in names if n != "ARG"][0] == "FROM"
    users = [i for i, (name, _) in enumerate(instructions) if name == "USER"]
    assert users and users[-1] < names.index("ENTRYPOINT")
    assert instructions[users[-1]][1].split(":")[0] not in ("root", "0")
    assert dict(instructions)["ENTRYPOINT"] == '["cm"]' and "WORKDIR" in names
    assert "pip install --no-cache-dir ." in dict(instructions)["RUN"] or any(
        "pip install --no-cache-dir ." in args for name, args in instructions if name == "RUN"
    )
    assert not re.search(r"(API_KEY|TOKEN|PASSWORD|SECRET)\s*=", DOCKERFILE.read_text())


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not on PATH")
def test_dockerfile_hadolint():
    result = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
