"""ODE pairs: cm predict writes resumable shards with an index; PairDataModule streams them."""

import json
from pathlib import Path

import pytest
import torch
from helpers import fit, last_ckpt, write_pairs_config
from safetensors.torch import load_file

from cm.cli import main, run
from cm.io import PretrainedDenoiser
from cm.solvers import Sampler, SeededNoise, heun
from cm.solvers.sampling import seed_labels
from cm.training.pair_data import PairDataModule
from cm.training.pairs import (
    PairSeedDataModule,
    plan_shards,
    rank_shards,
    shard_name,
)

NUM, SHARD = 24, 8


def pairs_config(tmp: Path, ckpt: Path, root: Path, num_steps: int = 2) -> str:
    """A tiny pairs YAML: 24 seeds in shards of 8, Heun with ``num_steps`` steps, on the CPU."""
    generator = {
        "teacher": {"class_path": "cm.io.PretrainedDenoiser", "init_args": {"path": str(ckpt)}},
        "sampler": {
            "class_path": "cm.solvers.Sampler",
            "init_args": {"solver": "cm.solvers.heun", "num_steps": num_steps},
        },
        "batch_size": 5,  # chunks that do not align with shards
    }
    seeds = {"root": str(root), "num": NUM, "seed": 0, "shard_size": SHARD}
    return write_pairs_config(tmp / f"pairs{num_steps}.yaml", tmp, generator, seeds)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A tiny teacher checkpoint and its 24 pairs: (tmp dir, ckpt, shard root, config)."""
    tmp = tmp_path_factory.mktemp("pairs")
    ckpt = last_ckpt(fit(tmp / "teacher", 2))
    root = tmp / "pairs"
    config = pairs_config(tmp, ckpt, root)
    main(["predict", "--config", config])
    return tmp, ckpt, root, config


def load_all(root: Path) -> dict[str, torch.Tensor]:
    """All shards of ``root``'s index, concatenated in index order."""
    shards = json.loads((root / "index.json").read_text())["shards"]
    parts = [load_file(root / s["file"]) for s in shards]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def test_predict_writes_shards_and_index(generated):
    _, ckpt, root, _ = generated
    names = [shard_name(s) for s in plan_shards(NUM, 0, SHARD)]
    assert sorted(p.name for p in root.glob("pairs-*")) == names  # no temporary files left
    index = json.loads((root / "index.json").read_text())
    assert index["complete"] and index["num_pairs"] == NUM
    assert [s["file"] for s in index["shards"]] == names
    assert [(s["first_seed"], s["last_seed"], s["count"]) for s in index["shards"]] == [
        (0, 7, 8),
        (8, 15, 8),
        (16, 23, 8),
    ]
    assert index["image_shape"] == [1, 8, 8] and index["label_dim"] == 10
    assert index["solver"] == "cm.solvers.rk.heun" and len(index["sigmas"]) == 3
    pairs = load_all(root)
    assert pairs["seeds"].tolist() == list(range(NUM))
    assert pairs["z"].shape == pairs["x"].shape == (NUM, 1, 8, 8)
    assert pairs["z"].dtype == pairs["x"].dtype == torch.float16
    assert pairs["labels"].tolist() == [s % 10 for s in range(NUM)]
    # x is the sampler's endpoint for that seed, z its starting noise (x_T = z * sigma_max)
    teacher, seeds = PretrainedDenoiser(str(ckpt)), [13, 21]
    x = Sampler(heun, num_steps=2)(teacher, seeds, (1, 8, 8), seed_labels(seeds, 10))
    torch.testing.assert_close(pairs["x"][seeds].float(), x.clamp(-1, 1), atol=2e-3, rtol=0)
    z = SeededNoise(seeds).randn((1, 8, 8))
    torch.testing.assert_close(pairs["z"][seeds].float(), z, atol=4e-3, rtol=1e-3)  # float16
    assert pairs["z"].float().std().item() == pytest.approx(1.0, abs=0.15)


def test_resume_regenerates_only_missing_shards(generated, tmp_path):
    _, ckpt, root, _ = generated
    # a copy, so the other tests keep the original directory
    copy = tmp_path / "pairs"
    copy.mkdir()
    for p in root.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    before = load_all(copy)
    first, middle, last = (copy / shard_name(s) for s in plan_shards(NUM, 0, SHARD))
    stamp = first.stat().st_mtime_ns
    middle.write_bytes(middle.read_bytes()[: middle.stat().st_size // 2])  # a torn write
    last.unlink()  # a crash before this shard
    (copy / "index.json").unlink()
    main(["predict", "--config", pairs_config(tmp_path, ckpt, copy)])
    assert first.stat().st_mtime_ns == stamp  # finished shards are skipped, not rewritten
    after = load_all(copy)
    assert after["seeds"].tolist() == list(range(NUM))  # every seed exactly once
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=2e-3, rtol=0)
    # A complete directory generates nothing; other solver settings are refused.
    stamps = {p.name: p.stat().st_mtime_ns for p in copy.glob("pairs-*")}
    main(["predict", "--config", pairs_config(tmp_path, ckpt, copy)])
    assert stamps == {p.name: p.stat().st_mtime_ns for p in copy.glob("pairs-*")}
    with pytest.raises(ValueError, match="other settings \\(sigmas\\)"):
        run(["predict", "--config", pairs_config(tmp_path, ckpt, copy, num_steps=3)])


@pytest.mark.parametrize(("num", "shard_size", "world"), [(24, 8, 2), (70, 8, 3), (5, 8, 2)])
def test_ranks_take_disjoint_whole_shards(num, shard_size, world):
    shards = plan_shards(num, 100, shard_size)
    assert all(len(s) == shard_size for s in shards[:-1])
    per_rank = [rank_shards(shards, r, world) for r in range(world)]
    seeds = [s for mine in per_rank for shard in mine for s in shard]
    assert sorted(seeds) == list(range(100, 100 + num))  # disjoint and covering
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1  # balanced


def test_seed_datamodule_skips_finished_shards(generated, tmp_path):
    _, _, root, _ = generated
    data = PairSeedDataModule(str(tmp_path), num=NUM, shard_size=SHARD)
    assert [b.tolist() for b in data.predict_dataloader()] == [
        list(s) for s in plan_shards(NUM, 0, SHARD)
    ]
    done = PairSeedDataModule(str(root), num=NUM + 4, shard_size=SHARD)  # one more shard
    assert [b.tolist() for b in done.predict_dataloader()] == [[24, 25, 26, 27]]


def test_pair_datamodule_streams_each_pair_once(generated):
    _, _, root, _ = generated
    data = PairDataModule(str(root), batch_size=8, seed=3)
    assert (data.resolution, data.channels, data.label_dim) == (8, 1, 10)
    stream = iter(data.train_dataloader())
    batches = [next(stream) for _ in range(NUM // 8)]  # one epoch
    z, x, labels = (torch.cat(parts) for parts in zip(*batches, strict=True))
    assert z.shape == x.shape == (NUM, 1, 8, 8) and labels.shape == (NUM, 10)
    assert z.dtype == x.dtype == labels.dtype == torch.float32
    stored = load_all(root)
    # match each streamed pair to its stored seed through z (distinct Gaussian draws)
    seed_of = (z.flatten(1)[:, None] == stored["z"].float().flatten(1)[None]).all(-1).int()
    assert seed_of.sum(0).tolist() == [1] * NUM  # every pair exactly once per epoch
    order = seed_of.argmax(1)
    assert torch.equal(x, stored["x"].float()[order])
    assert labels.argmax(1).tolist() == (order % 10).tolist()
    assert not torch.equal(order, torch.arange(NUM))  # shuffled


def test_pair_datamodule_without_pairs_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run cm predict --config configs/pairs_"):
        _ = PairDataModule(str(tmp_path)).label_dim


def test_two_ranks_write_each_shard_once(generated, tmp_path):
    tmp, ckpt, root, _ = generated
    ddp = tmp_path / "ddp"
    config = pairs_config(tmp_path, ckpt, ddp)
    args = ["--trainer.devices=2", "--trainer.strategy=ddp_spawn", "--trainer.accelerator=cpu"]
    main(["predict", "--config", config, *args])
    index = json.loads((ddp / "index.json").read_text())
    assert index["complete"] and len(list(ddp.glob("pairs-*"))) == NUM // SHARD
    two, one = load_all(ddp), load_all(root)
    assert two["seeds"].tolist() == list(range(NUM))
    torch.testing.assert_close(two["x"], one["x"], atol=2e-3, rtol=0)  # world-size independent
