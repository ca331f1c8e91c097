"""Bad inputs end in one ``error: ...`` line, exit code 2, no traceback and no partial output.

Every case drives the real CLI (``cm.cli.main``) in-process; one case checks the same through a
``python -m cm`` subprocess, and that ``CM_DEBUG=1`` shows the traceback.
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import DIGITS, ROOT, TINY_YAML, fails, fit_args
from PIL import Image

from cm.cli import main
from cm.errors import UserError
from cm.training.module import NonFiniteStepWarning


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


FOLDER = ["--data.init_args.dataset=cm.data.ImageFolder", "--data.init_args.use_labels=false"]
UNCOND = ["--model.init_args.denoiser.init_args.net.init_args.label_dim=0"]


# --- cm fit: data -------------------------------------------------------------------------------


def test_fit_missing_data_folder(tmp_path, capsys):
    root = tmp_path / "run"
    args = fit_args(
        root, *FOLDER, *UNCOND, f"--data.init_args.dataset.init_args.path={tmp_path / 'nope'}"
    )
    fails(args, "nope", capsys)
    assert not root.exists()


def test_fit_corrupt_png_in_folder(tmp_path, capsys):
    data = png_folder(tmp_path / "data", 4)
    (data / "1.png").write_bytes((data / "1.png").read_bytes()[:30])  # truncated
    root = tmp_path / "run"
    args = fit_args(root, *FOLDER, *UNCOND, f"--data.init_args.dataset.init_args.path={data}")
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
    args = fit_args(
        root, *FOLDER, *UNCOND, f"--data.init_args.dataset.init_args.path={tmp_path / 'data.zip'}"
    )
    fails(args, "data.zip", capsys)
    assert not root.exists()


def test_fit_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    root = tmp_path / "run"
    args = fit_args(
        root, *FOLDER, *UNCOND, f"--data.init_args.dataset.init_args.path={tmp_path / 'empty'}"
    )
    fails(args, "empty", capsys)
    assert not root.exists()


def test_fit_wrong_resolution(tmp_path, capsys):
    root = tmp_path / "run"
    fails(fit_args(root, "--data.init_args.resolution=16"), "resolution 16", capsys)
    assert not root.exists()


def test_fit_wrong_channels(tmp_path, capsys):
    data = png_folder(tmp_path / "data", 4, mode="RGB")
    root = tmp_path / "run"
    args = fit_args(root, *FOLDER, *UNCOND, f"--data.init_args.dataset.init_args.path={data}")
    fails(args, "channels", capsys)
    assert not root.exists()


def test_fit_label_count_mismatch(tmp_path, capsys):
    root = tmp_path / "run"
    args = fit_args(
        root,
        "--data.init_args.dataset=cm.data.Mixture",
        "--data.init_args.dataset.init_args.num_components=4",
    )
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
        (["--num", "-1"], "num"),
        (["--steps", "abc"], "steps"),
        (["--sigmas", "[80.0, -1.0]"], "non-negative"),
        (["--sigmas", "[]"], "sigmas"),
        (["--solver", "os.system"], "solver"),
        (["--batch_size", "-1"], "batch_size"),
        (["--class_label", "-2"], "class_label"),
    ],
    ids=[
        "solver",
        "steps-1",
        "steps0",
        "num0",
        "sigmas",
        "class_label",
        "batch0",
        "unknown-arg",
        "num-1",
        "steps-str",
        "sigmas-negative",
        "sigmas-empty",
        "solver-os",
        "batch-1",
        "class_label-2",
    ],
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


# --- cm fit: dataset.json labels ----------------------------------------------------------------


def table(*labels) -> dict:
    """A ``dataset.json`` giving image ``i.png`` the label ``labels[i]``."""
    return {"labels": [[f"{i}.png", y] for i, y in enumerate(labels)]}


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ("{", r"dataset\.json in .* is not \{"),
        (table(-1, 0, 1, 2), "'0.png' the label -1"),
        (table(10**12, 0, 1, 2), "label 10+:"),
        (table("cat", "dog", "a", "b"), "'cat'"),
        (table([1, 2], [1], [1, 2], [0, 1]), r"'1.png' the label \[1\]"),
        (table(1, 0.5, 1, 0), "'1.png' the label 0.5"),
        (table(True, 0, 1, 0), "label True"),
        ({"labels": 5}, r"is not \{"),
        ([["0.png", 1]], r"is not \{.*top level is a list"),
        (b"\xff\xfe\x00binary", r"is not \{"),
        ({"labels": [["0.png"], ["1.png"]]}, r"is not \{"),
        (table(1, 0, 1), "no label for 1 image.*'3.png'"),
        ({"labels": [["0.png", 1], ["1.png", 0], ["9.png", 1], ["3.png", 0]]}, "'2.png'"),
    ],
    ids=["invalid-json", "negative", "huge", "strings", "ragged", "mixed", "bool", "not-a-list",
         "top-level-list", "binary", "no-label-column", "missing-file", "other-file"],
)  # fmt: skip
def test_fit_bad_dataset_json(tmp_path, capsys, labels, match):
    data = png_folder(tmp_path / "data", 4)
    raw = labels if isinstance(labels, str | bytes) else json.dumps(labels)
    (data / "dataset.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    root = tmp_path / "run"
    args = fit_args(
        root,
        "--data.init_args.dataset=cm.data.ImageFolder",
        f"--data.init_args.dataset.init_args.path={data}",
    )
    line = fails(args, match, capsys)
    assert "dataset.json" in line and str(data) in line and "use_labels" in line
    assert not root.exists()


def test_fit_folder_without_images(tmp_path, capsys):
    """Only non-image files (a README, a CSV): no images, named as such."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "README.txt").write_text("digits")
    (tmp_path / "data" / "labels.csv").write_text("a,b")
    root = tmp_path / "run"
    args = fit_args(
        root, *FOLDER, *UNCOND, f"--data.init_args.dataset.init_args.path={tmp_path / 'data'}"
    )
    fails(args, "No images found", capsys)
    assert not root.exists() and listing(tmp_path / "data") == ["README.txt", "labels.csv"]


def test_fit_text_file_named_png(tmp_path, capsys):
    data = png_folder(tmp_path / "data", 4)
    (data / "0.png").write_text("not an image")
    root = tmp_path / "run"
    args = fit_args(root, *FOLDER, *UNCOND, f"--data.init_args.dataset.init_args.path={data}")
    fails(args, "Cannot read image '0.png'", capsys)
    assert not root.exists()


# --- cm fit: option values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--data.init_args.batch_size=0"], "batch_size must be a positive number of images"),
        (["--data.init_args.batch_size=-4"], "batch_size must be a positive .* got -4"),
        (["--data.init_args.batch_size=abc"], r"^error: data\.init_args\.batch_size: .*int.*abc"),
        (["--data.init_args.num_workers=-1"], "num_workers must be 0"),
        (["--data.init_args.val_fraction=1.5"], r"val_fraction must be in \[0, 1\)"),
        (["--data.init_args.dataset=imagenet"], r"data\.init_args\.dataset: .*imagenet"),
        (["--model.init_args.nonfinite=maybe"], r"model\.init_args\.nonfinite: .*maybe"),
        (["--model.init_args.max_consecutive_skips=0"], "max_consecutive_skips must be at least 1"),
        (["--model.init_args.objective=cm.objectives.Nope"],
         r"^error: model\.init_args\.objective: class_path 'cm\.objectives\.Nope' cannot be used"),
        (["--model.class_path=cm.training.Nope"], r"^error: model: class_path 'cm\.training\.Nop"),
        (["--trainer.max_stepz=3"], "max_stepz"),
        (["--trainer.max_steps=many"], r"trainer\.max_steps.*many"),
        (["--data.init_args.resolution=16"], "resolution 16"),
        (["--model.init_args.denoiser.init_args.net.init_args.label_dim=3"],
         r"set model\.init_args\.denoiser\.init_args\.net\.init_args\.label_dim to 10, or "
         r"data\.init_args\.use_labels to false"),
    ],
    ids=["batch0", "batch-4", "batch-str", "workers-1", "val1.5", "dataset", "nonfinite",
         "max-skips0", "objective-class", "model-class", "unknown-key", "steps-str", "resolution",
         "label-dim"],
)  # fmt: skip
def test_fit_bad_option(tmp_path, capsys, extra, match):
    root = tmp_path / "run"
    line = fails(fit_args(root, *extra), match, capsys)
    assert "data.init_args.label_dim" not in line  # no such option
    assert not root.exists()


def test_fit_config_with_wrong_type(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    use_labels: [1, 2]\n")
    fails(fit_args(tmp_path / "run", "--config", str(bad)), r"use_labels", capsys)
    assert listing(tmp_path) == ["bad.yaml"]


def test_fit_cd_missing_teacher(tmp_path, capsys, monkeypatch):
    """cd_digits distils runs/edm_digits/export: without it, the one sentence that names it."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs" / "cd_digits.yaml"), "--config", TINY_YAML]
    args += ["--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    fails(args, r"^error: 'runs/edm_digits/export' does not exist: expected an exported", capsys)
    assert listing(tmp_path) == []


def test_fit_corrupt_lpips_weights(tmp_path, monkeypatch, capsys):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "vgg16-397923af.pth").write_bytes(b"not a torch file" * 64)
    monkeypatch.setenv("CM_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    distance = "--model.init_args.objective.init_args.distance=cm.objectives.LPIPS"
    fails(fit_args(tmp_path / "run", distance), r"^error: [^:]*vgg16-397923af\.pth", capsys)
    assert listing(tmp_path) == ["weights", "weights/vgg16-397923af.pth"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_fit_gpu_config_on_cpu(tmp_path, capsys, accelerator):
    root = tmp_path / "run"
    args = fit_args(root, f"--trainer.accelerator={accelerator}")
    fails(args, r"asks for a GPU; .*`--trainer\.accelerator cpu --trainer\.devices 1`", capsys)
    assert not root.exists()


def test_fit_wandb_without_api_key(tmp_path, monkeypatch, capsys):
    """W&B online with no key: one line saying how to log in or go offline, no traceback."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home"))
    root = tmp_path / "run"
    logger = ["--trainer.logger=lightning.pytorch.loggers.WandbLogger",
              f"--trainer.logger.init_args.save_dir={root}"]  # fmt: skip
    args = fit_args(root)[:-1] + logger  # fit_args without its CSVLogger's save_dir
    try:
        fails(args, r"^error: W&B: .*wandb login.*WANDB_MODE=offline", capsys)
    finally:
        import wandb

        wandb.teardown()  # wandb keeps the online settings in a process-wide singleton
    assert not root.exists()


# --- cm fit --ckpt_path: files that are not cm checkpoints --------------------------------------


class Gadget:
    """Pickles to a call of ``os.system``: loading it must refuse, never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def torch_gadget(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Gadget(marker)}, path)


def raw_gadget(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": Gadget(marker)}))


def other_zip(path: Path, marker: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes/readme.txt", "a zip, not a torch file")


def flat_zip(path: Path, marker: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.txt", "files not in a subdirectory")


def empty_file(path: Path, marker: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    ("write", "match"),
    [
        (torch_gadget, "weights_only.*pickled code"),
        (raw_gadget, "not a torch checkpoint"),
        (other_zip, "weights_only|not a torch checkpoint"),
        (flat_zip, "weights_only|not a torch checkpoint"),
        (empty_file, "truncated|not a torch checkpoint"),
    ],
    ids=["reduce-torch-save", "reduce-pickle", "other-zip", "flat-zip", "empty"],
)
def test_fit_refuses_foreign_checkpoint(tmp_path, capsys, write, match):
    marker = tmp_path / "marker"
    bad = tmp_path / "in" / "bad.ckpt"
    bad.parent.mkdir()
    write(bad, marker)
    root = tmp_path / "run"
    fails(fit_args(root, f"--ckpt_path={bad}"), f"bad.ckpt.*({match})", capsys)
    assert not marker.exists()  # the payload never ran
    assert not root.exists() and listing(tmp_path / "in") == ["bad.ckpt"]


def test_fit_ckpt_path_is_a_directory(tmp_path, capsys):
    (tmp_path / "dir.ckpt").mkdir()
    fails(fit_args(tmp_path / "run", f"--ckpt_path={tmp_path / 'dir.ckpt'}"), "dir.ckpt", capsys)
    assert listing(tmp_path) == ["dir.ckpt"]


# --- cm test / validate without held-out data ---------------------------------------------------


@pytest.mark.parametrize("command", ["test", "validate"])
def test_no_held_out_data(tmp_path, capsys, command):
    root = tmp_path / "run"
    args = [command, *fit_args(root)[1:]]
    fails(args, f"cm {command} needs held-out data.*--data.init_args.val_fraction", capsys)
    assert not root.exists()


# --- nonfinite: skip warns at each skip and stops after a run of them ---------------------------


class NaNBatches(L.Callback):
    """Test helper: NaN images (so a NaN loss) in the steps ``first .. last``."""

    def __init__(self, first: int, last: int = 10**9) -> None:
        self.first, self.last = first, last

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first <= trainer.global_step <= self.last:
            batch[0].fill_(float("nan"))


def nan_fit(tmp_path: Path, first: int, last: int, steps: int, *extra: str) -> list[str]:
    """``cm fit`` with ``nonfinite=skip`` whose steps ``first .. last`` have a NaN loss."""
    overlay = tmp_path / "nan.yaml"
    callback = {
        "class_path": "test_bad_inputs.NaNBatches",
        "init_args": {"first": first, "last": last},
    }
    overlay.write_text(json.dumps({"trainer": {"callbacks": [callback]}}))
    return fit_args(tmp_path / "run", "--config", str(overlay), f"--trainer.max_steps={steps}",
                    "--model.init_args.nonfinite=skip", *extra)  # fmt: skip


def test_nonfinite_skip_stops_after_consecutive_skips(tmp_path, capsys):
    args = nan_fit(tmp_path, 1, 10**9, 8, "--model.init_args.max_consecutive_skips=3")
    with pytest.warns(NonFiniteStepWarning) as warned:
        fails(args, r"in 3 steps in a row \(up to step 3; model\.init_args\.max_consecutive_skips"
              r"=3\): the run diverged", capsys)  # fmt: skip
    messages = [str(w.message) for w in warned if w.category is NonFiniteStepWarning]
    assert messages[0].startswith("Step 1: non-finite loss or gradients, step skipped")
    assert "1 skipped in all, 1 in a row, the run stops at 3" in messages[0]
    assert messages[1].startswith("Step 2:") and "2 skipped in all, 2 in a row" in messages[1]


def test_nonfinite_skip_warns_and_finishes(tmp_path, capsys):
    """Two isolated NaN steps: each is reported, the run finishes, and says how many it dropped."""
    args = nan_fit(tmp_path, 1, 1, 4, "--model.init_args.max_consecutive_skips=2")
    with pytest.warns(NonFiniteStepWarning) as warned:
        main(args)
    messages = [str(w.message) for w in warned if w.category is NonFiniteStepWarning]
    assert messages[0].startswith("Step 1: non-finite") and "1 in a row" in messages[0]
    assert messages[-1].startswith("1 optimizer step(s) in 4 training steps were skipped")


# --- cm eval ------------------------------------------------------------------------------------


def npz(**arrays):
    """A writer of an ``.npz`` holding ``arrays`` (with pickled objects allowed)."""

    def write(path: Path) -> None:
        with path.open("wb") as f:
            np.savez(f, **arrays)

    return write


@pytest.mark.parametrize(
    ("write", "match"),
    [
        (lambda p: p.write_text("hello"), "not an .npz"),
        (lambda p: np.save(p.open("wb"), np.zeros((2, 8, 8, 3), np.uint8)), "not an .npz"),
        (lambda p: Image.new("RGB", (8, 8)).save(p, format="PNG"), "not an .npz"),
        (npz(arr_0=np.array([{"a": 1}], dtype=object)), "Cannot read samples"),
        (npz(images=np.zeros((2, 8, 8, 3), np.uint8)), "has no arr_0"),
        (npz(arr_0=np.zeros((2, 8, 8, 4), np.uint8)), "C = 1 or 3"),
    ],
    ids=["text", "npy", "png", "objects", "no-arr0", "4-channels"],
)
def test_eval_not_samples(tmp_path, capsys, write, match):
    write(tmp_path / "s.npz")
    line = fails(["eval", str(tmp_path / "s.npz"), "--metrics", "is"], match, capsys)
    assert "s.npz" in line
    assert listing(tmp_path) == ["s.npz"]


def test_eval_directory_as_samples(tmp_path, capsys):
    (tmp_path / "s.npz").mkdir()
    fails(["eval", str(tmp_path / "s.npz"), "--metrics", "is"], "s.npz", capsys)
    assert listing(tmp_path) == ["s.npz"]


def test_eval_rgb_samples_against_grayscale_reference(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "gray.npz", rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8))
    np.savez(tmp_path / "rgb.npz", rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    ref = tmp_path / "ref.npz"
    main(["eval", "ref", "--data", str(tmp_path / "gray.npz"), "--out", str(ref),
          "--feature", DIGITS, "--device", "cpu"])  # fmt: skip
    capsys.readouterr()
    args = ["eval", str(tmp_path / "rgb.npz"), "--ref", str(ref), "--metrics", "fid"]
    args += ["--feature", DIGITS, "--device", "cpu"]
    fails(args, r"samples have 3 channel\(s\) but the reference .*ref\.npz.* 1-channel", capsys)
    assert listing(tmp_path) == ["gray.npz", "ref.npz", "rgb.npz"]
    # the same samples in gray score fine
    main([*args[:1], str(tmp_path / "gray.npz"), *args[2:], "--json", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["fid"] is not None


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["eval", "--metricz", "fid"], "metricz"),
        (["export", "--ckpt_path", "x.ckpt"], "out"),
        (["export", "--ckpt_path", "x.ckpt", "--out", "e", "--emma", "false"], "emma"),
        (["bench", "nope"], "Unknown benchmark"),
    ],
    ids=["eval-unknown", "export-missing-out", "export-unknown", "bench-unknown"],
)
def test_bad_subcommand_options(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    fails(args, match, capsys)
    assert listing(tmp_path) == []


# --- the real process ---------------------------------------------------------------------------


def test_subprocess_one_line_and_debug_traceback(tmp_path):
    """``python -m cm``: exit code 2 and one line; ``CM_DEBUG=1`` shows the traceback."""
    args = [sys.executable, "-m", "cm", "sample", "--ckpt_path", str(tmp_path / "nope.ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: '{tmp_path / 'nope.ckpt'}' does not exist: expected an exported denoiser "
        "directory (model.safetensors + config.json), a .ckpt written by cm fit, a diffusers "
        "folder or Hugging Face Hub id, or a .pt/.safetensors state dict."
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
