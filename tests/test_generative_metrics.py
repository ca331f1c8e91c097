"""``GenerativeMetrics``: scores logged during fit, in validate, and equal under 2-process DDP."""

import csv
from pathlib import Path

import pytest
import yaml
from helpers import DIGITS, ICT_DIGITS, fit, last_ckpt, tiny_args

from cm.cli import main
from cm.training.metrics import rank_seeds


def test_rank_seeds_split_without_padding():
    for num, world in ((10, 3), (12, 2), (5, 8), (1, 2)):
        blocks = [rank_seeds(num, 100, world, r) for r in range(world)]
        flat = [s for b in blocks for s in b]
        assert flat == list(range(100, 100 + num))  # every seed once, in order


def logged(root: Path) -> dict[str, list[float]]:
    """Every logged column of the run's metrics.csv (non-empty cells)."""
    rows = list(csv.DictReader(next(root.glob("**/metrics.csv")).open()))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "digits_ref.npz"
    main(["eval", "ref", "--data", ICT_DIGITS, "--feature", DIGITS, "--out", str(out)])
    return out


def callback_config(tmp_path: Path, reference: Path, **extra) -> Path:
    config = {
        "trainer": {
            "callbacks": [
                {
                    "class_path": "cm.training.GenerativeMetrics",
                    "init_args": {
                        "reference": str(reference),
                        "metrics": ["fid", "precision", "recall"],
                        "feature": {"class_path": DIGITS},
                        "num": 30,
                        "batch_size": 16,
                        **extra,
                    },
                }
            ]
        }
    }
    path = tmp_path / "metrics.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_logs_metrics_every_n_steps(tmp_path, reference):
    root = fit(
        tmp_path / "run", 4, "--config", str(callback_config(tmp_path, reference, every_n_steps=2))
    )
    values = logged(root)
    assert len(values["metrics/fid"]) == 2  # steps 2 and 4
    assert all(v > 0 for v in values["metrics/fid"])
    assert all(0 <= v <= 1 for v in values["metrics/precision"] + values["metrics/recall"])


def test_validate_ddp_equals_single_process(tmp_path, reference):
    ckpt = last_ckpt(fit(tmp_path / "run", 2))
    cfg = callback_config(tmp_path, reference, every_n_steps=0)
    fids = []
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        root = tmp_path / f"validate_{devices}"
        args = ["--config", str(cfg), "--data.init_args.val_fraction=0.1"]
        args += ["--trainer.accelerator=cpu", f"--trainer.devices={devices}"]
        args += [f"--trainer.strategy={strategy}", f"--ckpt_path={ckpt}"]
        main(tiny_args("validate", root, *args))
        fids.append(logged(root)["metrics/fid"][-1])
    # 30 seeds split 15/15 over two ranks: the same samples, so the same FID.
    assert fids[0] == pytest.approx(fids[1], rel=1e-5)
