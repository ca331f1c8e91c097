"""The trust model: no code runs from a file cm reads (README, Security).

Gadgets are real: a module on ``sys.path`` whose import and constructor write a marker file, and
torch-fidelity's Inception class pointed at a ``__reduce__`` pickle that writes one. Each is put
where cm reads configs as data (an export's ``config.json``, a ``.ckpt``'s hyperparameters, the
``--solver`` option); every case ends in exit 2, one ``error:`` line, no traceback and no marker.
"""

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import fails, fit_args

from cm.cli import main
from cm.io import load_denoiser

GADGET = "cm_gadget_marker"  # the module name of the gadget


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A one-step ``cm fit`` checkpoint of the tiny quickstart."""
    root = tmp_path_factory.mktemp("run")
    main(fit_args(root))
    return sorted(root.glob("**/checkpoints/*.ckpt"))[-1]


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory) -> Path:
    """``cm export`` of ``ckpt``."""
    out = tmp_path_factory.mktemp("export") / "denoiser"
    main(["export", f"--ckpt_path={ckpt}", f"--out={out}"])
    return out


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """A gadget module on sys.path: importing it, calling or building anything in it writes
    the returned marker path."""
    path = tmp_path / "PWNED"
    code = f"""
        from pathlib import Path
        from torch import nn
        Path({str(path)!r}).write_text("imported")

        def solve(*args, **kwargs):
            Path({str(path)!r}).write_text("called")

        class Gadget(nn.Module):
            def __init__(self, path: str = ""):
                super().__init__()
                Path({str(path)!r}).write_text("built")
        """
    (tmp_path / f"{GADGET}.py").write_text(textwrap.dedent(code))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, GADGET, raising=False)
    return path


class _Payload:
    """Unpickled, runs ``Path(marker).write_text`` (what torch.load(weights_only=False) does)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


def edited_ckpt(ckpt: Path, out: Path, **hparams) -> Path:
    """A copy of ``ckpt`` with ``hparams`` replacing its hyperparameters' entries."""
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"].update(hparams)
    torch.save(state, out)
    return out


def edited_export(exported: Path, out: Path, **entries) -> Path:
    """A copy of the export directory with ``entries`` replacing ``config.json``'s."""
    shutil.copytree(exported, out)
    config = json.loads((out / "config.json").read_text())
    config.update(entries)
    (out / "config.json").write_text(json.dumps(config))
    return out


def gadget(path: Path) -> dict:
    """A denoiser config whose class is the gadget."""
    return {"class_path": f"{GADGET}.Gadget", "init_args": {"path": str(path)}}


def test_gadget_in_export_config_is_refused(exported, marker, tmp_path, capsys):
    """``cm sample`` on an export whose config.json names the gadget: refused, nothing runs."""
    bad = edited_export(exported, tmp_path / "bad", denoiser=gadget(marker))
    out = tmp_path / "s.npz"
    line = fails(["sample", f"--ckpt_path={bad}", f"--out={out}"], "Gadget", capsys)
    assert "config.json" in line and "--trust_config" in line
    assert not marker.exists() and not out.exists()


def test_torch_fidelity_inception_gadget_is_refused(exported, tmp_path, capsys):
    """The issue's gadget: torch-fidelity's Inception unpickling a file named in config.json."""
    pytest.importorskip("torch_fidelity")
    marker, payload = tmp_path / "PWNED", tmp_path / "weights.pth"
    torch.save(_Payload(marker), payload)
    inception = {
        "class_path": "torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3",
        "init_args": {
            "name": "inception-v3-compat",
            "features_list": ["2048"],
            "feature_extractor_weights_path": str(payload),
        },
    }
    bad = edited_export(exported, tmp_path / "bad", denoiser=inception)
    fails(["sample", f"--ckpt_path={bad}", f"--out={tmp_path / 's.npz'}"], "torch_fidelity", capsys)
    assert not marker.exists()


def test_gadget_in_sampler_solver_is_refused(exported, marker, tmp_path, capsys):
    """A Callable-typed string (the sampler's solver) naming outside code is refused too."""
    sampler = {"class_path": "cm.solvers.Sampler", "init_args": {"solver": f"{GADGET}.solve"}}
    bad = edited_export(exported, tmp_path / "bad", sampler=sampler)
    fails(["sample", f"--ckpt_path={bad}", f"--out={tmp_path / 's.npz'}"], "solve", capsys)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["sample", "export", "fit"])
def test_gadget_in_ckpt_hparams_is_refused(ckpt, marker, tmp_path, command, capsys):
    """A ``.ckpt`` whose hyperparameters name the gadget: sample, export, fit --ckpt_path."""
    bad = edited_ckpt(ckpt, tmp_path / "bad.ckpt", denoiser=gadget(marker))
    args = {
        "sample": ["sample", f"--ckpt_path={bad}", f"--out={tmp_path / 's.npz'}"],
        "export": ["export", f"--ckpt_path={bad}", f"--out={tmp_path / 'exp'}"],
        "fit": fit_args(tmp_path / "run", f"--ckpt_path={bad}", "--trainer.max_steps=2"),
    }[command]
    line = fails(args, "Gadget", capsys)
    assert "bad.ckpt" in line and "--trust_config" in line
    assert not marker.exists()


def test_smuggled_trust_config_is_refused(ckpt, tmp_path, capsys):
    """A checkpoint cannot opt itself in: ``trust_config: true`` inside its hparams is refused."""
    objective = torch.load(ckpt, weights_only=True)["hyper_parameters"]["objective"]
    teacher = {
        "class_path": "cm.io.PretrainedDenoiser",
        "init_args": {"path": "x", "trust_config": True},
    }
    objective["init_args"]["teacher"] = teacher
    bad = edited_ckpt(ckpt, tmp_path / "bad.ckpt", objective=objective)
    fails(fit_args(tmp_path / "run", f"--ckpt_path={bad}"), "trust_config: True", capsys)


def test_solver_import_path_is_refused(ckpt, marker, tmp_path, capsys):
    """``--solver os.system`` or a module path outside cm: refused before any import."""
    out = tmp_path / "s.npz"
    for solver in ("os.system", f"{GADGET}.solve", "cm.io.torch.load"):
        fails(
            ["sample", f"--ckpt_path={ckpt}", f"--out={out}", f"--solver={solver}"],
            "--solver",
            capsys,
        )
    assert not marker.exists() and not out.exists()


def test_trust_config_opts_in(exported, marker, tmp_path, capsys):
    """With ``--trust_config`` the file's classes are built (here: the gadget runs, as promised)."""
    bad = edited_export(exported, tmp_path / "bad", denoiser=gadget(marker))
    with pytest.raises(SystemExit):  # built, then its weights do not fit: what counts is built
        main(["sample", f"--ckpt_path={bad}", f"--out={tmp_path / 's.npz'}", "--trust_config=true"])
    assert marker.read_text() == "built"


@pytest.mark.parametrize("trust", [[], ["--trust_config=true"]])
def test_legitimate_files_load(ckpt, exported, tmp_path, trust):
    """A normal checkpoint and export load with and without the opt-in, solver names too."""
    for i, source in enumerate((ckpt, exported)):
        out = tmp_path / f"s{i}.npz"
        main(
            [
                "sample",
                f"--ckpt_path={source}",
                f"--out={out}",
                "--num=2",
                "--solver=cm.solvers.heun",
                "--steps=2",
                *trust,
            ]
        )
        assert out.is_file()
    denoiser, hparams = load_denoiser(exported, trust_config=bool(trust))
    assert hparams["sampler"]["class_path"] == "cm.solvers.Sampler"


def test_resume_applies_lr_override(ckpt, tmp_path):
    """A new lr beside --ckpt_path reaches the resumed optimizer (not the checkpoint's lr)."""
    root = tmp_path / "run"
    main(
        fit_args(
            root,
            f"--ckpt_path={ckpt}",
            "--trainer.max_steps=2",
            "--model.init_args.optimizer.init_args.lr=0.0123",
        )
    )
    resumed = torch.load(sorted(root.glob("**/checkpoints/*.ckpt"))[-1], weights_only=True)
    assert resumed["global_step"] == 2
    assert resumed["hyper_parameters"]["optimizer"]["init_args"]["lr"] == 0.0123
    assert [g["lr"] for g in resumed["optimizer_states"][0]["param_groups"]] == [0.0123]


def test_resume_refuses_architecture_override(ckpt, tmp_path, capsys):
    """An architecture change beside --ckpt_path is refused, naming the key."""
    key = "model.init_args.denoiser.init_args.net.init_args.model_channels"
    args = fit_args(tmp_path / "run", f"--ckpt_path={ckpt}", f"--{key}=32")
    fails(args, re.escape(key), capsys)


def test_broken_exports_are_one_line(exported, tmp_path, capsys):
    """Truncated weights, invalid config.json, config.json without denoiser: one clear line."""
    cases = {"truncated": "truncated", "invalid": "not valid JSON", "nodenoiser": "no denoiser"}
    for name, match in cases.items():
        bad = shutil.copytree(exported, tmp_path / name)
        match name:
            case "truncated":
                data = (bad / "model.safetensors").read_bytes()
                (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
            case "invalid":
                (bad / "config.json").write_text("{not json")
            case "nodenoiser":
                (bad / "config.json").write_text('{"sampler": null}')
        line = fails(["sample", f"--ckpt_path={bad}", f"--out={tmp_path / 's.npz'}"], match, capsys)
        assert name in line
