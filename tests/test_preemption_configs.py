"""Every shipped CPU config survives SIGTERM; concurrent runs in one root keep their own files.

Each config trains a narrow network for ``STEPS`` steps three ways, in process: uninterrupted;
with SIGTERM at a seeded random step (``Preemption`` writes ``last.ckpt`` and exits 0); then
``--ckpt_path last`` in the same root, which must end with the uninterrupted run's weights.
"""

import hashlib
import json
import random
import signal
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import tiny_open_clip, write_tiny_vae

from cm.cli import main
from cm.data.captions import write_digit_captions

ROOT = Path(__file__).parents[1]
STEPS = 4
NARROW = {"model_channels": 16, "num_res_blocks": 1, "num_head_channels": 16}


def overlay(root: Path, config: str, *callbacks: dict, steps: int = STEPS) -> Path:
    """Test settings over ``configs/<config>``: few batches, frequent checkpoints, no grids.

    AMED steps its optimizer once per student interval (``N - 1`` per batch): one epoch of its
    small data instead of ``max_steps``, and a ``last.ckpt`` at every step.
    """
    amed = config.startswith("amed")
    trainer = {
        "max_steps": -1 if amed else steps,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        "callbacks": [
            *callbacks,
            {"class_path": "cm.training.Preemption"},
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "every_n_train_steps": 1 if amed else 2,
                    "save_top_k": 0,
                    "save_last": True,
                },
            },
        ],
    }
    shipped = yaml.safe_load((ROOT / "configs" / config).read_text())
    if isinstance(shipped["trainer"].get("logger"), dict):
        trainer["logger"] = {"init_args": {"save_dir": str(root)}}
    settings: dict = {"trainer": trainer}
    model = shipped["model"]["init_args"]
    if "denoiser" in model and "net" in model["denoiser"].get("init_args", {}):
        net = {"init_args": {"net": {"init_args": NARROW}}}
        settings["model"] = {"init_args": {"denoiser": net}}
    if shipped["data"]["class_path"].endswith("ImageDataModule"):
        settings["data"] = {"init_args": {"batch_size": 8}}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "test.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def fit(root: Path, config: str, *extra: str, callbacks=(), steps: int = STEPS) -> None:
    """``cm fit`` of ``configs/<config>`` with the test overlay, in process."""
    path = overlay(root, config, *callbacks, steps=steps)
    main(["fit", "--config", str(ROOT / "configs" / config), "--config", str(path), *extra])


def last(root: Path) -> dict:
    """The one ``last.ckpt`` under ``root``."""
    (path,) = root.glob("**/checkpoints/last.ckpt")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, Path]:
    """A 1-step narrow EDM digits teacher: its checkpoint and its export."""
    root = tmp_path_factory.mktemp("teacher")
    fit(root, "edm_digits.yaml", steps=1)
    ckpt = next(root.glob("**/checkpoints/*.ckpt"))
    main(["export", "--ckpt_path", str(ckpt), "--out", str(root / "export")])
    return ckpt, root / "export"


@pytest.fixture(scope="module")
def pairs(teacher, tmp_path_factory) -> Path:
    """32 ODE pairs of the teacher (2 Heun steps) from ``cm predict`` of pairs_digits.yaml."""
    root = tmp_path_factory.mktemp("pairs")
    main(
        [
            "predict",
            "--config",
            str(ROOT / "configs/pairs_digits.yaml"),
            f"--model.init_args.teacher.init_args.path={teacher[0]}",
            "--model.init_args.sampler.init_args.num_steps=2",
            "--model.init_args.batch_size=16",
            f"--data.init_args.root={root / 'pairs'}",
            "--data.init_args.num=32",
            "--data.init_args.shard_size=16",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",
        ]
    )
    return root / "pairs"


TINY_CLIP, WIDTH = "cm-test-preemption-clip", 32  # the tiny text tower's width = context_dim


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """40 captioned digits and a tiny random open_clip text encoder (for this module's tests)."""
    root = tmp_path_factory.mktemp("captions")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(root / "torch"))
        tiny_open_clip(TINY_CLIP, root / "weights", mp, text_width=WIDTH)
        yield write_digit_captions(str(root / "data"), num=40)


def config_args(config: str, request: pytest.FixtureRequest) -> list[str]:
    """What a config needs beyond the overlay: its teacher, pairs or captions; small data."""
    match config:
        case "cd_digits.yaml" | "pd_digits.yaml" | "scd_digits.yaml":
            export = request.getfixturevalue("teacher")[1]
            return [f"--model.init_args.objective.init_args.teacher.init_args.path={export}"]
        case "ect_digits.yaml":
            export = request.getfixturevalue("teacher")[1]
            return [f"--model.init_args.objective.init_args.init_from.init_args.path={export}"]
        case "amed_digits.yaml":
            return [
                f"--model.init_args.denoiser.init_args.path={request.getfixturevalue('teacher')[0]}",
                "--data.init_args.num=32",
                "--data.init_args.batch_size=8",
            ]
        case "amed_mixture.yaml":
            return ["--data.init_args.num=32", "--data.init_args.batch_size=8"]
        case "cd_mixture.yaml" | "scd_mixture.yaml" | "meanflow_mixture.yaml":
            return ["--data.init_args.dataset.init_args.num_samples=64"]
        case "d2g_digits.yaml":
            # G and D start from the narrow teacher; R1 at every step, also after the resume.
            net = f"--model.init_args.discriminator.init_args.net.init_args={json.dumps(NARROW)}"
            return [
                f"--model.init_args.teacher.init_args.path={request.getfixturevalue('teacher')[0]}",
                net,
                "--model.init_args.r1_interval=1",
                f"--data.init_args.root={request.getfixturevalue('pairs')}",
                "--data.init_args.batch_size=8",
            ]
        case "latent_digits.yaml":  # a tiny random VAE and one latent cache for all three runs
            root = request.getfixturevalue("tmp_path")
            vae = write_tiny_vae(root / "tiny_vae")
            dataset = "--data.init_args.dataset.init_args"
            return [
                f"--model.init_args.denoiser.init_args.vae.init_args.path={vae}",
                f"{dataset}.vae.init_args.path={vae}",
                f"{dataset}.cache={root / 'latents'}",
            ]
        case "edm_digits_text.yaml":
            encoder = {"model": TINY_CLIP, "pretrained": "random", "max_length": 8}
            return [
                f"--model.init_args.denoiser.init_args.net.init_args.context_dim={WIDTH}",
                f"--data.init_args.dataset.init_args.path={request.getfixturevalue('captions')}",
                f"--data.init_args.dataset.init_args.text_encoder.init_args={json.dumps(encoder)}",
            ]
    return []


CONFIGS = [
    "quickstart.yaml",  # ECT from scratch (issue 18)
    "ict_digits.yaml",
    "edm_digits.yaml",
    "ddpm_digits.yaml",
    "iddpm_digits.yaml",
    "cd_digits.yaml",
    "pd_digits.yaml",
    "cd_mixture.yaml",
    "amed_mixture.yaml",  # SeedDataModule: a StepStream of seeds, resumed mid-epoch
    "amed_digits.yaml",
    "d2g_digits.yaml",  # on ODE pairs from cm predict (PairDataModule)
    "edm_digits_text.yaml",  # a captioned folder through a tiny open_clip text encoder
    "sct_digits.yaml",  # sCM: the adaptive weighting head's parameters and moments too
    "scd_digits.yaml",
    "scd_mixture.yaml",
    "ect_digits.yaml",  # ECT's stage is a function of the step
    "meanflow_digits.yaml",  # MeanFlow: (t, r) pairs and label drops per global sample index
    "meanflow_mixture.yaml",
    "latent_digits.yaml",  # training reads latents from the cache, per-sample posterior draws
]


def test_every_cpu_config_ships_preemption_and_a_periodic_last_ckpt():
    for config in CONFIGS:
        callbacks = yaml.safe_load((ROOT / "configs" / config).read_text())["trainer"]["callbacks"]
        names = [c["class_path"] for c in callbacks]
        assert "cm.training.Preemption" in names, config
        periodic = [c.get("init_args", {}) for c in callbacks if "every_n_train_steps" in str(c)]
        assert periodic and periodic[0]["save_last"] is True, config


@pytest.mark.parametrize("config", CONFIGS)
def test_sigterm_at_a_random_step_then_resume_equals_the_uninterrupted_run(
    config, request, tmp_path
):
    extra = config_args(config, request)
    fit(tmp_path / "full", config, *extra)
    batch = random.Random(config).randrange(1, STEPS - 1)  # seeded per config
    helper = "test_preemption_configs.SignalAtBatch"
    signal_at = {"class_path": helper, "init_args": {"batch": batch}}
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path / "cut", config, *extra, callbacks=[signal_at])
    assert stopped.value.code in (None, 0)
    a, cut = last(tmp_path / "full"), last(tmp_path / "cut")
    # the batch it was in, finished (AMED: several optimizer steps per batch)
    assert cut["global_step"] == (batch + 1) * a["global_step"] // STEPS
    fit(tmp_path / "cut", config, *extra, "--ckpt_path=last")
    b = last(tmp_path / "cut")
    assert a["global_step"] == b["global_step"] > cut["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    # the optimizers' moments and step counts too (Diffusion2GAN: G's and D's)
    assert len(a["optimizer_states"]) == len(b["optimizer_states"]) > 0
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert opt_a["param_groups"] == opt_b["param_groups"]
        torch.testing.assert_close(opt_b["state"], opt_a["state"], rtol=0, atol=1e-6)
    print(f"{config}: max |resumed - uninterrupted| = {max_difference(a, b):.1e}")


def max_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two checkpoints' floating-point weights."""
    floats = [(v, b["state_dict"][k]) for k, v in a["state_dict"].items() if v.is_floating_point()]
    return max((x - y).abs().max().item() for x, y in floats)


def seed_batches(processed: int, epochs: int, world: int = 1, rank: int = 0) -> list[list[int]]:
    """AMED's training seeds (20, 5 global batches an epoch) of a run resumed after ``processed``
    batches, for ``epochs`` of Lightning's passes over the loader."""
    from types import SimpleNamespace

    from cm.training import SeedDataModule

    data = SeedDataModule(num=20, seed=100, batch_size=4 // world)
    progress = SimpleNamespace(total=SimpleNamespace(processed=processed))
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    data.trainer = SimpleNamespace(world_size=world, global_rank=rank, fit_loop=loop)
    loader = data.train_dataloader()
    assert len(loader) == 5  # Lightning's batches per epoch
    return [b.tolist() for _ in range(epochs) for b in loader]


def test_seed_stream_continues_across_epochs_resumes_mid_epoch_and_splits_over_ranks():
    full = seed_batches(0, 3)
    epochs = [sum(full[e * 5 : (e + 1) * 5], []) for e in range(3)]
    assert all(sorted(e) == list(range(100, 120)) for e in epochs)  # every seed once an epoch
    assert epochs[0] != epochs[1] != epochs[2]  # in a new order
    # resumed after batch 7 (mid epoch 1): the rest of that epoch, then epoch 2
    assert seed_batches(7, 2) == full[7:]
    # two ranks take the two halves of each global batch
    halves = zip(seed_batches(0, 3, 2, 0), seed_batches(0, 3, 2, 1), strict=True)
    assert [r0 + r1 for r0, r1 in halves] == full


class SignalAtBatch(L.Callback):
    """Test helper: SIGTERM to this process as training batch ``batch`` starts (mid-step)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """The checkpoint must wait for the end of this batch's optimizer step(s)."""
        if batch_idx == self.batch:
            signal.raise_signal(signal.SIGTERM)


class SignalLater(L.Callback):
    """Test helper: SIGTERM to this process ``delay`` seconds after the sanity check starts."""

    def __init__(self, delay: float) -> None:
        self.delay, self.sent = delay, 0.0

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        """From a thread: Python runs the handler between two of the evaluation's inner steps."""

        def send() -> None:
            self.sent = time.perf_counter()
            signal.raise_signal(signal.SIGTERM)

        threading.Timer(self.delay, send).start()


def test_sigterm_during_the_sanity_check_exits_within_one_evaluation_step(tmp_path, capsys):
    # iDDPM's bits/dim over all 1000 timesteps: seconds per validation batch on a CPU.
    later = SignalLater(1.0)
    bpd = "--model.init_args.objective.init_args.bpd_timesteps=1000"
    path = overlay(tmp_path, "iddpm_digits.yaml")
    argv = ["fit", "--config", str(ROOT / "configs/iddpm_digits.yaml"), "--config", str(path), bpd]
    original = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        _run_with(argv, later)
    took = time.perf_counter() - later.sent
    assert stopped.value.code in (None, 0)
    assert later.sent > 0 and took < 2.0, took  # one of 1000 inner steps, not the evaluation
    assert signal.getsignal(signal.SIGTERM) == original
    assert not list(tmp_path.glob("version_*"))  # the run's own (empty) dir is gone
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--ckpt_path=last"])
    assert refused.value.code == 2
    assert "nothing to resume in" in capsys.readouterr().err


def _run_with(argv: list[str], callback) -> None:
    """``cm fit argv`` with ``callback`` added to the trainer (an object, not a class path)."""
    from cm.cli import CMCLI

    original = CMCLI.instantiate_trainer

    def instantiate_trainer(self, **kwargs):
        trainer = original(self, **kwargs)
        trainer.callbacks.append(callback)
        return trainer

    CMCLI.instantiate_trainer = instantiate_trainer
    try:
        main(argv)
    finally:
        CMCLI.instantiate_trainer = original


# -- two runs in one root --------------------------------------------------------------------


def digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_concurrent_runs_in_one_root_keep_their_own_files(tmp_path, capsys):
    shared = tmp_path / "runs"
    fit(shared, "quickstart.yaml")  # run A, finished: version_0
    (shared / "test.yaml").rename(tmp_path / "a.yaml")
    before = digest(shared)
    # Run B starts in the same root and fails at its first step (a NaN loss: nonfinite stop),
    # after writing its config.yaml and logs.
    poison = {"class_path": "test_resilience.Poison", "init_args": {"step": 0}}
    with pytest.raises(SystemExit) as failed:
        fit(shared, "quickstart.yaml", callbacks=[poison])
    assert failed.value.code == 2
    (shared / "test.yaml").unlink()
    assert digest(shared) == before  # not a byte of run A lost, nothing of B left
    # Concurrent starts: each claims its own version dir, exclusively.
    from cm.training.rundir import claim_version

    claimed: list[Path] = []
    threads = [threading.Thread(target=lambda: claimed.append(claim_version(shared)))
               for _ in range(8)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({p.name for p in claimed}) == 8 and "version_0" not in {p.name for p in claimed}
    for p in claimed:
        p.rmdir()
    # Two runs with a last.ckpt: `last` is ambiguous, the candidates are named.
    fit(shared, "quickstart.yaml", steps=2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ambiguous:
        fit(shared, "quickstart.yaml", "--ckpt_path=last")
    err = capsys.readouterr().err
    assert ambiguous.value.code == 2 and "ambiguous" in err
    assert "version_0" in err and "version_1" in err and "pass the one" in err
    # Naming the run (the logger's version) picks it.
    fit(shared, "quickstart.yaml", "--ckpt_path=last", "--trainer.logger.init_args.version=1")
    assert sorted(p.name for p in shared.glob("version_*")) == ["version_0", "version_1"]
    assert torch.load(shared / "version_1/checkpoints/last.ckpt")["global_step"] == STEPS
    # A root with no checkpoint: an error, not a silent fresh start.
    with pytest.raises(SystemExit) as nothing:
        fit(tmp_path / "empty", "quickstart.yaml", "--ckpt_path=last")
    assert nothing.value.code == 2
    assert "nothing to resume in" in capsys.readouterr().err
    assert not list((tmp_path / "empty").glob("version_*"))
