"""The real CLI on tiny configs: fit, resume, sample, export, print_config, errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONFIGS, cpu_trainer, fit, last_ckpt, tiny_adm, tiny_args

from cm.cli import main

CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIG_FILES, ids=[c.name for c in CONFIG_FILES])
def test_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out


def test_help_lists_extra_commands(capsys):
    main(["--help"])  # a menu (tests/test_layout.py checks it line by line), then exit 0
    out = capsys.readouterr().out
    assert "fit" in out and "sample" in out and "export" in out


def test_fit_sample_export(tmp_path, capsys):
    root = fit(tmp_path / "run", 3)
    samples = next(root.glob("**/samples/samples.npz"))
    assert next(root.glob("**/samples/final.png")).is_file()
    data = np.load(samples)
    assert data["arr_0"].shape == (12, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [i % 10 for i in range(12)]
    ckpt = last_ckpt(root)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    main(
        [
            "sample",
            "--ckpt_path",
            str(ckpt),
            "--num",
            "7",
            "--batch_size",
            "3",
            "--out",
            str(a),
            "--grid",
            str(tmp_path / "grid.png"),
        ]
    )
    main(["sample", "--ckpt_path", str(ckpt), "--num", "7", "--batch_size", "7", "--out", str(b)])
    assert np.array_equal(np.load(a)["arr_0"], np.load(b)["arr_0"])  # per-seed determinism
    assert (tmp_path / "grid.png").is_file()
    # the final samples of fit used the same seeds and the EMA weights
    assert np.array_equal(np.load(a)["arr_0"], data["arr_0"][:7])
    export_dir = tmp_path / "export"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(export_dir)])
    c = tmp_path / "c.npz"
    main(["sample", "--ckpt_path", str(export_dir), "--num", "7", "--out", str(c)])
    assert np.array_equal(np.load(a)["arr_0"], np.load(c)["arr_0"])
    # multistep sampling runs from the command line too
    main(
        [
            "sample",
            "--ckpt_path",
            str(ckpt),
            "--num",
            "2",
            "--solver",
            "cm.solvers.consistency.multistep",
            "--sigmas",
            "[80.0, 0.8]",
            "--out",
            str(c),
            "--overwrite",  # c exists: replacing it needs the flag
        ]
    )
    assert np.load(c)["arr_0"].shape == (2, 8, 8, 1)
    # a two-step grid on a one-step checkpoint samples multistep, not only its first sigma
    d = tmp_path / "d.npz"
    main(
        ["sample", "--ckpt_path", str(ckpt), "--num", "2", "--sigmas", "[80.0, 0.8]"]
        + ["--out", str(d)]
    )
    assert np.array_equal(np.load(d)["arr_0"], np.load(c)["arr_0"])
    assert not np.array_equal(np.load(d)["arr_0"], np.load(a)["arr_0"][:2])
    # `python -m cm` is the console script: it must exit 0
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cm",
            "sample",
            "--ckpt_path",
            str(ckpt),
            "--num",
            "2",
            "--out",
            str(c),
            "--overwrite",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"Wrote 2 samples to {c}" in done.stdout


def test_resume_is_exact(tmp_path):
    # dropout and flips make the RNG matter: the resumed run must draw what the full run drew
    extra = [
        "--model.init_args.objective.init_args.total_steps=20",
        "--model.init_args.denoiser.init_args.net.init_args.dropout=0.2",
        "--data.init_args.flip=true",
    ]
    full = fit(tmp_path / "full", 20, *extra)
    half = fit(tmp_path / "half", 10, *extra)
    resumed = fit(tmp_path / "resumed", 20, *extra, f"--ckpt_path={last_ckpt(half)}")
    a = torch.load(last_ckpt(full), weights_only=True)
    b = torch.load(last_ckpt(resumed), weights_only=True)
    assert a["global_step"] == b["global_step"] == 20
    keys = [k for k in a["state_dict"] if k.startswith(("denoiser.", "ema_denoiser."))]
    assert any(k.startswith("ema_denoiser.") for k in keys)
    for k in keys:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def predict(root: Path, out: Path, num: int, *extra: str) -> None:
    """``cm predict`` of seeds ``0 .. num - 1`` with the last checkpoint under ``root``."""
    args = [f"--ckpt_path={last_ckpt(root)}", "--data=cm.training.SeedDataModule"]
    args += [f"--data.num={num}", "--data.batch_size=2"]
    args += ["--trainer.callbacks+=cm.training.NpzWriter", f"--trainer.callbacks.out={out}"]
    main(tiny_args("predict", root, *args, *extra))


def test_predict_writes_npz(tmp_path):
    root = fit(tmp_path / "run", 2)
    out = tmp_path / "pred.npz"
    predict(root, out, 5)
    ref = tmp_path / "ref.npz"
    main(["sample", "--ckpt_path", str(last_ckpt(root)), "--num", "5", "--out", str(ref)])
    assert np.array_equal(np.load(out)["arr_0"], np.load(ref)["arr_0"])


def test_two_process_predict_generates_every_seed_once(tmp_path):
    root = fit(tmp_path / "run", 1)
    devices = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp_spawn"]
    predict(root, tmp_path / "pred.npz", 10, *devices)
    parts = [np.load(tmp_path / f"pred.rank{r}.npz")["arr_0"] for r in range(2)]
    assert [len(p) for p in parts] == [5, 5]  # contiguous blocks, no seed lost or repeated
    ref = tmp_path / "ref.npz"
    main(["sample", "--ckpt_path", str(last_ckpt(root)), "--num", "10", "--out", str(ref)])
    assert np.array_equal(np.concatenate(parts), np.load(ref)["arr_0"])


def test_validate_reports_heldout_loss(tmp_path):
    root = fit(tmp_path / "run", 2, "--data.init_args.val_fraction=0.1")
    val = "--data.init_args.val_fraction=0.1"
    main(tiny_args("validate", root, val, f"--ckpt_path={last_ckpt(root)}"))
    metrics = sorted(root.glob("**/metrics.csv"))[-1].read_text()
    assert "val/loss" in metrics


def test_module_built_in_python_checkpoints_weights_only(tmp_path):
    from cm.data import Mixture
    from cm.ema import EMA
    from cm.objectives import DenoisingScoreMatching
    from cm.precond import EDMPrecond
    from cm.training import DenoiserModule, ImageDataModule

    net = tiny_adm(label_dim=0, attention_resolutions=[])
    module = DenoiserModule(EDMPrecond(net), DenoisingScoreMatching(), ema=EMA(0.9))
    data = ImageDataModule(Mixture(num_samples=64), batch_size=16, use_labels=False)
    trainer = cpu_trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    trainer.fit(module, data)
    ckpt = next(tmp_path.glob("**/*.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 2
    assert any(k.startswith("ema_denoiser.") for k in state["state_dict"])


def test_objective_noise_differs_per_rank_and_micro_batch():
    from types import SimpleNamespace

    from cm.objectives import DenoisingScoreMatching
    from cm.precond import EDMPrecond
    from cm.training import DenoiserModule

    net = tiny_adm(label_dim=0, channel_mult=[1], attention_resolutions=[])
    module = DenoiserModule(EDMPrecond(net), DenoisingScoreMatching())

    def draw(step: int, rank: int, batch_idx: int, world: int = 2) -> torch.Tensor:
        module._trainer = SimpleNamespace(
            global_step=step, global_rank=rank, world_size=world, accumulate_grad_batches=2
        )
        module.on_train_batch_start((torch.zeros(8 // world, 1, 8, 8), None), batch_idx)
        return module.objective.draws.randn_like(torch.zeros(8 // world, 1, 8, 8))

    try:
        assert torch.equal(draw(3, 0, 6), draw(3, 0, 6))  # a resumed step redraws its noise
        assert not torch.equal(draw(3, 0, 6), draw(3, 1, 6))  # ranks' samples get their own
        assert not torch.equal(draw(3, 0, 6), draw(3, 0, 7))  # so do accumulated micro-batches
        assert not torch.equal(draw(3, 0, 6), draw(4, 0, 8))
        # ... and two ranks draw exactly one process's noise for the global batch, in rank order
        ranks = torch.cat([draw(3, 0, 6), draw(3, 1, 6)])
        assert torch.equal(ranks, draw(3, 0, 6, world=1))
    finally:
        module._trainer = None


def test_two_process_ddp_fit(tmp_path):
    root = fit(
        tmp_path / "ddp",
        2,
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp_spawn",
    )
    ckpt = torch.load(last_ckpt(root), weights_only=True)
    assert ckpt["global_step"] == 2
    assert next(root.glob("**/samples/samples.npz")).is_file()
