"""Bad inputs end in one ``error: ...`` line, exit code 2, no traceback and no partial output.

Every case drives the real CLI (``cm.cli.main``) in-process; one case checks the same through a
``python -m cm`` subprocess, and that ``CM_DEBUG=1`` shows the traceback.
"""

import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cm.cli import main
from cm.errors import UserError

ROOT = Path(__file__).parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = str(Path(__file__).parent / "tiny.yaml")


def fit_args(root: Path, *extra: str) -> list[str]:
    """``cm fit`` of the tiny quickstart for one step, writing under ``root``."""
    return [
        "fit",
        "--config",
        QUICKSTART,
        "--config",
        TINY,
        "--trainer.max_steps=1",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        *extra,
    ]


def fails(args: list[str], match: str, capsys) -> str:
    """Run ``cm args``; assert exit code 2 and a last stderr line ``error: <match ...>``."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    assert re.search(match, line), line
    return line


def listing(path: Path) -> list[str]:
    """Every path under ``path``, relative (to compare before and after a failed command)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A one-step ``cm fit`` checkpoint of the tiny quickstart."""
    root = tmp_path_factory.mktemp("run")
    main(fit_args(root))
    return sorted(root.glob("**/checkpoints/*.ckpt"))[-1]


def png_folder(path: Path, num: int, size: int = 8, mode: str = "L") -> Path:
    """A folder of ``num`` random ``size`` px PNGs (``mode`` L or RGB)."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for i in range(num):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path / f"{i}.png")
    return path


FOLDER = ["--data.init_args.dataset=folder", "--data.init_args.use_labels=false"]
UNCOND = ["--model.init_args.denoiser.init_args.net.init_args.label_dim=0"]


# --- cm fit: data -------------------------------------------------------------------------------


def test_fit_missing_data_folder(tmp_path, capsys):
    root = tmp_path / "run"
    args = fit_args(root, *FOLDER, *UNCOND, f"--data.init_args.path={tmp_path / 'nope'}")
    fails(args, "nope", capsys)
    assert not root.exists()


def test_fit_corrupt_png_in_folder(tmp_path, capsys):
    data = png_folder(tmp_path / "data", 4)
    (data / "1.png").write_bytes((data / "1.png").read_bytes()[:30])  # truncated
    root = tmp_path / "run"
    args = fit_args(root, *FOLDER, *UNCOND, f"--data.init_args.path={data}")
    args += ["--data.init_args.batch_size=4"]
    fails(args, "1.png", capsys)
    assert not root.exists()


def test_fit_truncated_zip(tmp_path, capsys):
    data = png_folder(tmp_path / "data", 4)
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:
        for f in data.iterdir():
            z.write(f, f.name)
    blob = (tmp_path / "data.zip").read_bytes()
    (tmp_path / "data.zip").write_bytes(blob[: len(blob) // 2])
    root = tmp_path / "run"
    args = fit_args(root, *FOLDER, *UNCOND, f"--data.init_args.path={tmp_path / 'data.zip'}")
    fails(args, "data.zip", capsys)
    assert not root.exists()


def test_fit_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    root = tmp_path / "run"
    args = fit_args(root, *FOLDER, *UNCOND, f"--data.init_args.path={tmp_path / 'empty'}")
    fails(args, "empty", capsys)
    assert not root.exists()


def test_fit_wrong_resolution(tmp_path, capsys):
    root = tmp_path / "run"
    fails(fit_args(root, "--data.init_args.resolution=16"), "resolution 16", capsys)
    assert not root.exists()


def test_fit_wrong_channels(tmp_path, capsys):
    data = png_folder(tmp_path / "data", 4, mode="RGB")
    root = tmp_path / "run"
    args = fit_args(root, *FOLDER, *UNCOND, f"--data.init_args.path={data}")
    fails(args, "channels", capsys)
    assert not root.exists()


def test_fit_label_count_mismatch(tmp_path, capsys):
    root = tmp_path / "run"
    args = fit_args(root, "--data.init_args.dataset=mixture", "--data.init_args.num_components=4")
    fails(args, "label", capsys)
    assert not root.exists()


def test_fit_keeps_preexisting_run_dir(tmp_path, capsys):
    """A failure in setup removes what this command created, nothing that was there before."""
    root = tmp_path / "run"
    (root / "keep").mkdir(parents=True)
    (root / "keep" / "notes.txt").write_text("mine")
    fails(fit_args(root, "--data.init_args.resolution=16"), "resolution 16", capsys)
    assert listing(root) == ["keep", "keep/notes.txt"]


# --- cm fit: configuration and checkpoints ------------------------------------------------------


def test_fit_unknown_config_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    learning_rat: 0.1\n")
    fails(fit_args(tmp_path / "run", "--config", str(bad)), "learning_rat", capsys)
    assert not (tmp_path / "run").exists()


def test_fit_malformed_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n  init_args: {\n")
    fails(fit_args(tmp_path / "run", "--config", str(bad)), "Problems parsing config", capsys)


def test_fit_missing_config_file(tmp_path, capsys):
    fails(["fit", "--config", str(tmp_path / "nope.yaml")], "nope.yaml", capsys)


def test_fit_missing_resume_checkpoint(tmp_path, capsys):
    root = tmp_path / "run"
    fails(fit_args(root, f"--ckpt_path={tmp_path / 'nope.ckpt'}"), "nope.ckpt", capsys)
    assert not root.exists()


def test_fit_truncated_resume_checkpoint(tmp_path, ckpt, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(ckpt.read_bytes()[:1000])
    root = tmp_path / "run"
    fails(fit_args(root, f"--ckpt_path={bad}"), "truncated", capsys)
    assert not root.exists()


def test_fit_missing_lpips_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CM_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    distance = "--model.init_args.objective.init_args.distance=cm.objectives.LPIPS"
    fails(fit_args(tmp_path / "run", distance), "vgg16-397923af.pth", capsys)
    assert not (tmp_path / "run").exists()


# --- cm sample / export: checkpoints ------------------------------------------------------------


def sample(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--ckpt_path", str(ckpt), "--num", "2", "--out", str(out), *extra]


def test_sample_missing_checkpoint(tmp_path, capsys):
    fails(sample(tmp_path / "nope.ckpt", tmp_path / "s.npz"), "does not exist", capsys)
    assert listing(tmp_path) == []


def test_sample_truncated_checkpoint(tmp_path, ckpt, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(ckpt.read_bytes()[:1000])
    fails(sample(bad, tmp_path / "s.npz"), "bad.ckpt", capsys)
    assert listing(tmp_path) == ["bad.ckpt"]


class Payload:
    """An arbitrary object: ``weights_only`` loading must refuse to unpickle it."""


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_sample_foreign_pickle_refused(tmp_path, capsys):
    bad = tmp_path / "foreign.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": Payload()}))
    fails(sample(bad, tmp_path / "s.npz"), "foreign.ckpt.*weights_only.*pickled code", capsys)
    assert listing(tmp_path) == ["foreign.ckpt"]


def test_sample_random_state_dict(tmp_path, capsys):
    bad = tmp_path / "random.ckpt"
    torch.save({"weight": torch.zeros(3)}, bad)
    fails(sample(bad, tmp_path / "s.npz"), "no denoiser config", capsys)


def test_sample_wrong_architecture(tmp_path, capsys):
    state = tmp_path / "adm.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(4, 3, 3, 3)}, state)
    denoiser = ROOT / "configs" / "teachers" / "openai_edm_imagenet64.yaml"
    args = sample(state, tmp_path / "s.npz", "--format=openai", f"--denoiser={denoiser}")
    fails(args, "input_blocks.0.0.weight.*the network's is", capsys)
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--solver", "nope"], "not an importable function"),
        (["--steps", "-1"], "steps"),
        (["--steps", "0"], "steps"),
        (["--num", "0"], "num"),
        (["--sigmas", "[0.5, 80.0]"], "decreasing"),
        (["--class_label", "10"], "class_label"),
        (["--batch_size", "0"], "batch_size"),
        (["--stepz", "2"], "stepz"),
    ],
    ids=["solver", "steps-1", "steps0", "num0", "sigmas", "class_label", "batch0", "unknown-arg"],
)
def test_sample_bad_arguments(tmp_path, ckpt, capsys, extra, match):
    fails(sample(ckpt, tmp_path / "s.npz", *extra), match, capsys)
    assert listing(tmp_path) == []


def test_sample_out_is_a_directory(tmp_path, ckpt, capsys):
    (tmp_path / "out.npz").mkdir()
    fails(sample(ckpt, tmp_path / "out.npz"), "out.npz", capsys)
    assert listing(tmp_path) == ["out.npz"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_sample_unwritable_out(tmp_path, ckpt, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        fails(sample(ckpt, locked / "s.npz"), "locked", capsys)
        assert listing(locked) == []
    finally:
        locked.chmod(0o700)


def test_sample_out_under_a_file(tmp_path, ckpt, capsys):
    (tmp_path / "file").write_text("x")
    fails(sample(ckpt, tmp_path / "file" / "s.npz"), "not a writable directory", capsys)
    assert listing(tmp_path) == ["file"]


def test_export_missing_checkpoint(tmp_path, capsys):
    args = ["export", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "e")]
    fails(args, "nope.ckpt", capsys)
    assert listing(tmp_path) == []


def test_export_out_is_a_file(tmp_path, ckpt, capsys):
    (tmp_path / "e").write_text("x")
    args = ["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "e")]
    fails(args, "e", capsys)
    assert listing(tmp_path) == ["e"]


# --- cm eval / edit -----------------------------------------------------------------------------


def test_eval_wrong_layout(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", np.zeros((4, 3, 8, 8), np.float32))  # NCHW floats
    fails(["eval", str(tmp_path / "s.npz"), "--metrics", "is"], "uint8", capsys)
    assert listing(tmp_path) == ["s.npz"]


def test_eval_truncated_samples(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", np.zeros((64, 8, 8, 3), np.uint8))
    (tmp_path / "s.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:200])
    fails(["eval", str(tmp_path / "s.npz"), "--metrics", "is"], "Cannot read samples", capsys)
    assert listing(tmp_path) == ["s.npz"]


def test_eval_missing_inception_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CM_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    np.savez(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    args = ["eval", str(tmp_path / "s.npz"), "--metrics", "is", "--device", "cpu"]
    fails(args, "weights-inception", capsys)
    assert listing(tmp_path) == ["s.npz"]


def test_eval_missing_clip_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CM_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    np.savez(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    args = ["eval", "ref", "--data", str(tmp_path / "s.npz"), "--out", str(tmp_path / "r.npz")]
    fails(args + ["--feature", "clip", "--device", "cpu"], "open_clip", capsys)
    assert listing(tmp_path) == ["s.npz"]


def test_edit_missing_image(tmp_path, ckpt, capsys):
    out = tmp_path / "o"
    args = ["edit", "--ckpt_path", str(ckpt), "--task", "denoise", "--out", str(out)]
    fails(args + ["--input", str(tmp_path / "nope.png")], "nope.png", capsys)
    assert not out.exists()


def test_edit_wrong_image_size(tmp_path, ckpt, capsys):
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(tmp_path / "big.png")
    out = tmp_path / "o"
    args = ["edit", "--ckpt_path", str(ckpt), "--task", "denoise", "--out", str(out)]
    fails(args + ["--input", str(tmp_path / "big.png"), "--sigma", "1"], "16x16", capsys)
    assert not out.exists()


# --- the real process ---------------------------------------------------------------------------


def test_subprocess_one_line_and_debug_traceback(tmp_path):
    """``python -m cm``: exit code 2 and one line; ``CM_DEBUG=1`` shows the traceback."""
    args = [sys.executable, "-m", "cm", "sample", "--ckpt_path", str(tmp_path / "nope.ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: '{tmp_path / 'nope.ckpt'}' does not exist: expected an exported denoiser "
        "directory (model.safetensors + config.json), a .ckpt written by cm fit, or a "
        ".pt/.safetensors state dict."
    ]
    proc = subprocess.run(
        args, capture_output=True, text=True, env={**env, "CM_DEBUG": "1"}, timeout=120
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_bugs_keep_their_traceback(monkeypatch):
    """Only cm's UserErrors, file errors and parse errors are user errors; cm's bugs are not."""
    import json

    import cm.cli
    from cm.cli import is_user_error
    from cm.io import check_output

    with pytest.raises(ValueError) as library:
        json.loads("{")  # raised inside the json module: a bug if it reaches main
    assert not is_user_error(library.value)
    with pytest.raises(UserError) as mine:
        check_output(ROOT)
    assert is_user_error(mine.value)
    with pytest.raises(ValueError) as bug:
        int("x")  # a ValueError raised in cm's own frame is still a bug, not "error: ..."
    assert not is_user_error(bug.value)

    def broken(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cm.cli, "run", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["sample"])
