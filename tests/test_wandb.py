"""A real offline W&B run of ``cm fit``: config, losses, LR, throughput, grids, FID vs NFE.

wandb 0.31 has no Python reader for ``.wandb`` files (the ``datastore`` module went to Go with
wandb-core), so ``records`` reads the format itself: a 7-byte header, then a LevelDB-style log
of 32 KiB blocks whose records (7-byte header: crc32, length, type) hold ``Record`` protobufs of
``wandb.proto.wandb_internal_pb2``, the same messages ``wandb sync`` uploads.
"""

import json
import struct
import time
from pathlib import Path

import pytest
import yaml
from helpers import DIGITS, ICT_DIGITS, TINY_YAML

from cm.cli import main

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    """Every ``Record`` of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block tail too short for a header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero-filled rest of a block
            pos += left
            continue
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history(recs: list) -> list[dict]:
    """The logged rows: ``{key: value}`` with values decoded from JSON."""
    return [
        {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in r.history.item
        }
        for r in recs
        if r.WhichOneof("record_type") == "history"
    ]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B with every directory it touches inside ``tmp_path`` (nothing in $HOME)."""
    for var, sub in [("WANDB_DIR", "wandb"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts"), ("HOME", "home")]:  # fmt: skip
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_offline_run_logs_config_losses_lr_throughput_grids_and_nfe_plot(wandb_env):
    tmp = wandb_env
    ref = tmp / "ref.npz"
    main(["eval", "ref", "--data", ICT_DIGITS, "--feature", DIGITS, "--out", str(ref)])
    run_dir = tmp / "run"
    sampler = "cm.solvers.Sampler"
    config = {
        "trainer": {
            "max_steps": 2,
            "log_every_n_steps": 1,
            "default_root_dir": str(run_dir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "cm-test", "name": "tiny", "save_dir": str(run_dir)},
            },
            "callbacks": [
                {"class_path": "cm.training.SampleGrid", "init_args": {"every_n_steps": 2}},
                {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
                {"class_path": "cm.training.callbacks.Throughput"},
                {
                    "class_path": "cm.training.GenerativeMetrics",
                    "init_args": {
                        "reference": str(ref),
                        "metrics": ["fid"],
                        "feature": {"class_path": DIGITS},
                        "num": 20,
                        "batch_size": 20,
                        "every_n_steps": 2,
                        "samplers": [
                            {"class_path": sampler, "init_args": {"num_steps": 1}},
                            {
                                "class_path": sampler,
                                "init_args": {
                                    "solver": "cm.solvers.consistency.multistep",
                                    "sigmas": [80.0, 0.661],
                                },
                            },
                        ],
                    },
                },
            ],
        }
    }
    (tmp / "wandb.yaml").write_text(yaml.safe_dump(config))
    overlay = str(tmp / "wandb.yaml")
    main(["fit", "--config", ICT_DIGITS, "--config", TINY_YAML, "--config", overlay])
    # The `cm` process finishes its run at exit (wandb's atexit hook); in-process, finish it here
    # so the records are flushed and the next WandbLogger does not reuse this run.
    import wandb

    wandb.finish()

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    # wandb-core writes the file from its own process: under load the last blocks land a moment
    # after finish() returns, so wait (up to 60 s) for the exit record.
    deadline = time.monotonic() + 60
    while True:
        recs = records(files[0])
        kinds = {r.WhichOneof("record_type") for r in recs}
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"run", "config", "history", "exit"} <= kinds

    # config: the model's init_args as the YAML had them
    updates = {
        u.key: json.loads(u.value_json)
        for r in recs
        if r.WhichOneof("record_type") == "config"
        for u in r.config.update
    }
    net = updates["denoiser"]["init_args"]["net"]
    assert net["class_path"] == "cm.networks.ADMUNet"
    assert net["init_args"]["model_channels"] == 16  # tiny.yaml's override
    assert updates["optimizer"]["init_args"]["lr"] == 0.001

    rows = history(recs)
    keys = {k for row in rows for k in row}
    assert {"train/loss", "lr-Adam", "perf/images_per_sec", "perf/sec_per_step"} <= keys
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 2 and all(v > 0 for v in losses)
    assert all(row["perf/images_per_sec"] > 0 for row in rows if "perf/images_per_sec" in row)
    assert [row["lr-Adam"] for row in rows if "lr-Adam" in row][0] == 0.001

    # metric curves: FID of each sampler, and the FID-vs-NFE table (NFE counted: 1 and 2)
    assert {"metrics/fid_onestep_1", "metrics/fid_multistep_2"} <= keys
    table_rows = [row for row in rows if row.get("metrics/nfe_table/_type") == "table-file"]
    assert len(table_rows) == 1
    table_file = runs[0] / "files" / table_rows[0]["metrics/nfe_table/path"]
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "sampler", "nfe", "fid"]
    assert [(r[1], r[2]) for r in table["data"]] == [("onestep_1", 1), ("multistep_2", 2)]
    assert table_rows[0]["metrics/fid_vs_nfe_table/_type"] == "table-file"  # the line plot's data

    # sample grids: logged images whose PNGs are in the run's files
    grids = [row for row in rows if row.get("samples/_type") == "images/separated"]
    assert len(grids) == 2  # step 2 and the final grid
    for row in grids:
        for name in row["samples/filenames"]:
            assert (runs[0] / "files" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp / "home").exists() or not any((tmp / "home").rglob("*.wandb"))


def test_failed_fit_leaves_no_wandb_run(wandb_env):
    """A corrupt image fails the first step: the offline run and run dir are removed."""
    from PIL import Image

    tmp = wandb_env
    data = tmp / "data"
    data.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), 40 * i).save(data / f"{i}.png")
    (data / "3.png").write_bytes((data / "3.png").read_bytes()[:40])
    run_dir = tmp / "run"
    logger = "lightning.pytorch.loggers.WandbLogger"
    args = [
        "fit", "--config", ICT_DIGITS, "--config", TINY_YAML, "--trainer.max_steps=1",
        f"--trainer.default_root_dir={run_dir}", f"--trainer.logger={logger}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--data.init_args.dataset=cm.data.ImageFolder",
        f"--data.init_args.dataset.init_args.path={data}",
        "--data.init_args.use_labels=false", "--data.init_args.batch_size=4",
        "--model.init_args.denoiser.init_args.net.init_args.label_dim=0",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert not run_dir.exists()
