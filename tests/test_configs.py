"""Every shipped config runs a real step through the real CLI: one optimizer step and one sampling
call (``cm fit``), or one batch of ODE pairs (``cm predict`` of a ``PairGenerator``).

One mechanism narrows a config for CPU time, ``smoke(config, tmp)``. It resolves every
``class_path`` in the config to its class (so re-exported aliases match) and applies, by class:

- ``RULES``: fixed ``init_args`` (network widths and depth, LPIPS input size, sampler steps,
  batch and data sizes, the tiny CLIP text tower, float32 SD weights on the CPU);
- resolution <= 64, attention only at levels that exist, ``context_dim`` = the tiny text width;
- ``fake_inputs``: each file the object reads is replaced by a tiny random one in the published
  layout: datasets (CIFAR-10 pickles, ImageNet64 ``.npz``, LSUN images, a captioned folder, latent
  ``.npy`` fields), teachers (a ``cm.io.export``, or a state dict keyed as OpenAI's ``UNetModel``
  or EDM's ``SongUNet`` for ``openai``/``edm``; a teacher under ``runs/<name>/`` is the narrowed
  denoiser of ``configs/<name>.yaml``, the config that writes it), a diffusers folder for SD, a
  latent VGG trunk, E-LatentLPIPS weights in the release's layout, a prompts file, and ODE pairs
  written by ``cm predict`` of the narrowed pairs config that the config's header names (with the
  config's own teacher where it names one, as the headers say), a tiny random VAE
  (``scripts/tiny_vae.py``) and a fresh latent cache folder;
- the trainer: one step on the CPU in float32, no Compile/W&B/checkpoints, and a 2-image
  ``SampleGrid`` for modules that ``generate``; ``PairWriter`` is kept for ``cm predict``.

Nothing is per config. ``configs/teachers/*.yaml`` (denoisers, not runs) each run the
``cm sample`` command of their header on a random narrowed teacher in the named format. The
full-size networks are built on the ``meta`` device, their sizes checked where the config's
header states them.
"""

import copy
import importlib
import itertools
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    published_names,
    register_weights,
    tiny_open_clip,
    write_cifar10,
    write_imagenet64,
    write_imagenet_folders,
    write_tiny_sd,
    write_tiny_vae,
)
from PIL import Image
from safetensors.torch import save_file
from test_convert import edm_layout, openai_layout, random_state

from cm.cli import main
from cm.data import CIFAR10, LSUN, Captions, ImageNet, ImageNet64, Latents
from cm.data.captions import write_digit_captions
from cm.io import PretrainedDenoiser, build, export
from cm.networks import ADMUNet, DiT, NCSNpp
from cm.networks.latent_vgg import LatentVGG16BN
from cm.networks.text import TextEncoder
from cm.objectives import LPIPS
from cm.objectives.elatentlpips import ELatentLPIPS
from cm.solvers import Sampler
from cm.training import ImageDataModule, PairDataModule
from cm.training.latent_vgg import ELatentLPIPSCalibration, LatentFieldsDataModule
from cm.training.pairs import PairGenerator, PairSeedDataModule, PairWriter
from cm.training.prediction import SeedDataModule
from cm.vae import VAE

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
MAX_RESOLUTION = 64
TINY_CLIP, WIDTH = "cm-test-configs-clip", 32  # the tiny text tower's width = context_dim
LATENT = 8  # side of the fake VAE latents
VGG = "vgg16-397923af.pth"
BEFORE_FIX = "35eacd1"  # ict_cifar10.yaml and pd_cifar10.yaml gave CIFAR-10 labels there
VGG_WIDTHS = [8, 8, 8, 8, 8]


def resolve(class_path: str) -> Any:
    """The object a ``class_path`` names (an alias resolves to the class it re-exports)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _optional(class_path: str) -> Any:
    """``resolve`` for classes of optional extras: None when the extra is not installed."""
    try:
        return resolve(class_path)
    except ImportError:
        return None


SD_DENOISER = _optional("cm.networks.stable_diffusion.StableDiffusionDenoiser")
SD_DISCRIMINATOR = _optional("cm.networks.sd_discriminator.SDDiscriminator")

# Fixed init_args by class, wherever the class appears (student, teacher, D, data, callbacks).
RULES: dict[Any, dict[str, Any]] = {
    NCSNpp: {"model_channels": 16, "channel_mult": [1, 1], "num_blocks": 1},
    ADMUNet: {
        "model_channels": 16,
        "channel_mult": [1, 1],
        "num_res_blocks": 1,
        "num_head_channels": 16,
    },
    DiT: {"hidden_size": 32, "depth": 2, "num_heads": 2},
    LPIPS: {"resize": 0},  # the VGG trunk at the image size, not 224 px
    ImageDataModule: {"batch_size": 2, "num_workers": 0},
    PairDataModule: {"batch_size": 2, "num_workers": 0},
    SeedDataModule: {"num": 2, "batch_size": 2},
    PairSeedDataModule: {"num": 2, "shard_size": 2},
    PairGenerator: {"batch_size": 2},
    LatentFieldsDataModule: {"batch_size": 2, "num_workers": 0, "val": None},
    LatentVGG16BN: {"widths": VGG_WIDTHS, "hidden": 8, "pool_size": 1},
    ELatentLPIPS: {"widths": VGG_WIDTHS},
    TextEncoder: {"model": TINY_CLIP, "pretrained": "random", "max_length": 8},
    SD_DENOISER: {"dtype": "float32"},  # float16 is a GPU setting
    SD_DISCRIMINATOR: {"num_groups": 8},  # the tiny U-Net's GroupNorm
}
TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "strategy": "auto",
    "num_nodes": 1,
    "precision": "32-true",
    "max_steps": 1,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}
GRID = {"every_n_steps": 0, "num": 2, "final_num": 2, "batch_size": 2}
KEEP_CALLBACKS = (PairWriter,)  # what a command needs to produce its output


def objects(node: Any):
    """Every ``{"class_path", "init_args"}`` dict in a config, depth first."""
    if isinstance(node, dict):
        if "class_path" in node:
            yield node
        for value in node.values():
            yield from objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from objects(value)


def narrow(config: dict) -> dict:
    """``config`` with ``RULES``' keys, resolution <= ``MAX_RESOLUTION`` and the tiny text width."""
    config = copy.deepcopy(config)
    for obj in objects(config):
        cls = resolve(obj["class_path"])
        args = obj.setdefault("init_args", {}) or {}
        obj["init_args"] = args
        args.update(copy.deepcopy(RULES.get(cls, {})))
        if args.get("img_resolution", 0) > MAX_RESOLUTION:
            args["img_resolution"] = MAX_RESOLUTION
        if args.get("resolution", 0) > MAX_RESOLUTION:
            args["resolution"] = MAX_RESOLUTION
        if cls is ADMUNet:  # attention at a level that exists; the tiny CLIP's token width
            res = args.get("img_resolution", 64)
            keep = [r for r in args.get("attention_resolutions", []) if r >= res // 2]
            args["attention_resolutions"] = keep
            if args.get("context_dim"):
                args["context_dim"] = WIDTH
        if cls is Sampler:  # at most 2 steps (a one-step sampler stays one step)
            args["num_steps"] = min(args.get("num_steps", 2), 2)
        if cls is NCSNpp:
            res = args.get("img_resolution", 32)
            keep = [r for r in args.get("attn_resolutions", []) if r >= res // 2]
            args["attn_resolutions"] = keep
    return config


# -- tiny inputs in the published layouts --------------------------------------------------------


def _lsun(folder: Path) -> Path:
    """Four odd-sized JPEGs (the loader center-crops and resizes)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 256, (80 + i, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return folder


def fake_dataset(name: str, args: dict, tmp: Path) -> None:
    """Point a dataset's ``path`` at a tiny fake copy in its published layout."""
    match name:
        case "cifar10":
            args["path"] = str(write_cifar10(tmp / "cifar"))
        case "imagenet64":
            args["path"] = str(write_imagenet64(tmp / "imagenet64")[0])
            args["cache_dir"] = str(tmp / "imagenet64_cache")
        case "lsun":
            args["path"] = str(_lsun(tmp / "lsun"))
        case "imagenet":
            args["path"] = str(write_imagenet_folders(tmp / "ilsvrc"))
        case "captions":
            args["path"] = str(write_digit_captions(str(tmp / "captions"), num=4))


# Dataset objects (``data.init_args.dataset.class_path``) by class; short names by themselves.
DATASETS = {
    CIFAR10: "cifar10",
    ImageNet64: "imagenet64",
    ImageNet: "imagenet",
    LSUN: "lsun",
    Captions: "captions",
}


def _fields(root: Path, task: str) -> str:
    """Two rows of random latent ``.npy`` fields (``cm.training.latent_vgg``'s layout)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    latents = ("latents",) if task == "imagenet" else ("ref", "p0", "p1")
    for field in latents:
        np.save(root / f"{field}.npy", rng.normal(size=(2, 4, LATENT, LATENT)).astype("f2"))
    if task == "imagenet":
        np.save(root / "labels.npy", rng.integers(0, 1000, 2))
    else:
        np.save(root / "judge.npy", rng.random(2).astype("f4"))
    return str(root)


def producing_config(path: str) -> dict | None:
    """The narrowed ``configs/<name>.yaml`` whose run writes ``runs/<name>/...``, if any."""
    match = re.match(r"runs/([^/]+)/", path or "")
    if match and (CONFIGS / f"{match[1]}.yaml").is_file():
        return narrow(yaml.safe_load((CONFIGS / f"{match[1]}.yaml").read_text()))
    return None


def fake_teacher(args: dict, config: dict, tmp: Path, i: int) -> None:
    """A random teacher in the format a ``PretrainedDenoiser`` names, at ``args["path"]``."""
    if Path(args["path"]).is_absolute() and Path(args["path"]).exists():
        return  # a fake already: pairs_for passes the config's own teacher on
    match args.get("format", "auto"):
        case "openai":
            net = args["denoiser"]["init_args"]["net"]["init_args"]
            rows = openai_layout(
                net["img_resolution"], net["in_channels"], net["model_channels"],
                net["out_channels"], net["num_res_blocks"], tuple(net["attention_resolutions"]),
                tuple(net["channel_mult"]), net["label_dim"] or None, net["resblock_updown"],
                net["use_scale_shift_norm"],
            )  # fmt: skip
            path = tmp / f"teacher{i}.pt"
            torch.save(random_state(rows), path)
        case "edm":
            net = args["denoiser"]["init_args"]["net"]["init_args"]
            taps = len(net.get("resample_filter", [1, 1]))
            rows = edm_layout(
                net["img_resolution"], net["in_channels"], net["out_channels"],
                net["label_dim"], 0, net["model_channels"], tuple(net["channel_mult"]),
                net["num_blocks"], tuple(net["attn_resolutions"]),
                net.get("channel_mult_noise", 1), net.get("embedding_type") == "fourier",
                net.get("encoder_type", "standard"), net.get("decoder_type", "standard"), taps,
            )  # fmt: skip
            state = random_state(rows)
            f = torch.tensor(net.get("resample_filter", [1, 1]), dtype=torch.float32)
            for key, ours, _ in rows:
                if ours is None and key.endswith("resample_filter"):
                    state[key] = torch.outer(f, f)[None, None] / f.sum() ** 2
            path = tmp / f"teacher{i}.pt"
            torch.save(state, path)
        case _:  # a cm export: of the config that writes it, else of the student's architecture
            source = producing_config(args.get("path")) or config
            denoiser = copy.deepcopy(source["model"]["init_args"]["denoiser"])
            path = tmp / f"teacher{i}"
            torch.manual_seed(i)
            export(build(copy.deepcopy(denoiser)), path, denoiser)
    args["path"] = str(path)


def fake_trunk(path: Path) -> str:
    """A random narrowed latent VGG trunk as safetensors (``load_trunk``'s ``cm`` format)."""
    torch.manual_seed(0)
    net = LatentVGG16BN(4, VGG_WIDTHS, num_classes=1000, hidden=8, pool_size=1)
    save_file(net.state_dict(), path)
    return str(path)


def fake_elatentlpips(args: dict, path: Path) -> str:
    """Random E-LatentLPIPS weights in the format ``args`` names (ours, or the release's keys)."""
    torch.manual_seed(0)
    state = ELatentLPIPS(widths=VGG_WIDTHS).state_dict()
    if args.get("format", "cm") == "cm":
        save_file(state, path)
        return str(path)
    published = {}
    for k, v in state.items():
        name = f"lin{k.split('.')[1]}.model.1.weight" if k.startswith("heads.") else None
        published[name or published_names(k)] = v.clone()
    torch.save(published, path)
    return str(path)


# The pairs config a PairDataModule config's header names: "cm predict --config configs/X.yaml".
PREDICT = re.compile(r"cm predict --config configs/(\S+\.yaml)")


def pairs_for(config: dict, header: str, tmp: Path, tiny_sd: Path) -> str:
    """ODE pairs written by ``cm predict`` of the narrowed pairs config the header names.

    The config's own teacher replaces the pairs config's where it names one (the headers' recipe:
    e.g. d2g_cifar10 distils its class-conditional teacher).
    """
    pairs = yaml.safe_load((CONFIGS / PREDICT.search(header)[1]).read_text())
    teacher = config["model"]["init_args"].get("teacher")
    if teacher is not None:
        pairs["model"]["init_args"]["teacher"] = copy.deepcopy(teacher)
    out = tmp / "pairs"
    out.mkdir()
    path, command = smoke(pairs, out, "", tiny_sd)
    main([command, "--config", str(path)])
    return str(out / "written")


def fake_inputs(config: dict, header: str, tmp: Path, tiny_sd: Path) -> None:
    """Replace every file an object of ``config`` reads by a tiny random one (module doc)."""
    for i, obj in enumerate(list(objects(config))):
        cls, args = resolve(obj["class_path"]), obj["init_args"]
        if cls is ImageDataModule and isinstance(args.get("dataset"), str):
            fake_dataset(args["dataset"], args, tmp)
        elif cls in DATASETS:
            fake_dataset(DATASETS[cls], args, tmp)
        elif cls is PairSeedDataModule:
            args["root"] = str(tmp / "written")
        elif cls is PairDataModule:
            args["root"] = pairs_for(config, header, tmp, tiny_sd)
        elif cls is LatentFieldsDataModule:
            args["train"] = _fields(tmp / "fields", args.get("task", "imagenet"))
        elif cls is PretrainedDenoiser:
            fake_teacher(args, config, tmp, i)
        elif cls in (SD_DENOISER, SD_DISCRIMINATOR):
            args["path"] = str(tiny_sd)
        elif cls is VAE:
            args["path"] = str(write_tiny_vae(tmp / "tiny_vae"))
        elif cls is Latents:
            args["cache"] = str(tmp / "latents")
        elif cls is ELatentLPIPSCalibration and args.get("trunk"):
            args["trunk"] = fake_trunk(tmp / "trunk.safetensors")
        elif cls is ELatentLPIPS and args.get("path"):
            args["path"] = fake_elatentlpips(args, tmp / f"elatentlpips{i}.pth")
        elif cls is PairGenerator and args.get("captions"):
            (tmp / "prompts.txt").write_text("a cat\na dog\n")
            args["captions"] = str(tmp / "prompts.txt")


def smoke(config: dict, tmp: Path, header: str, tiny_sd: Path) -> tuple[Path, str]:
    """The one narrowing mechanism: ``config`` ready for one CPU step, written to ``tmp``.

    Returns the config file and the subcommand that runs it (``predict`` for a
    ``PairGenerator``, else ``fit``).
    """
    config = narrow(config)
    model = resolve(config["model"]["class_path"])
    trainer = config.setdefault("trainer", {})
    kept = [c for c in trainer.get("callbacks", []) if resolve(c["class_path"]) in KEEP_CALLBACKS]
    if hasattr(model, "generate"):  # one sampling call through the module's sampler
        kept.append({"class_path": "cm.training.SampleGrid", "init_args": dict(GRID)})
    trainer.update(copy.deepcopy(TRAINER), default_root_dir=str(tmp / "run"), callbacks=kept)
    fake_inputs(config, header, tmp, tiny_sd)
    path = tmp / "smoke.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, "predict" if model is PairGenerator else "fit"


# -- fixtures: weights shared by the whole module ------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One ``CM_WEIGHTS`` dir: random VGG16 (LPIPS) and a tiny open_clip (text configs)."""
    import torchvision

    cache = tmp_path_factory.mktemp("weights")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(cache / "torch"))
        tiny_open_clip(TINY_CLIP, cache, mp, text_width=WIDTH)  # sets CM_WEIGHTS = cache
        torch.manual_seed(0)
        torch.save(torchvision.models.vgg16(weights=None).state_dict(), cache / VGG)
        register_weights(mp, "vgg16", cache / VGG)
        yield cache


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path | None:
    """A tiny random diffusers SD folder (UNet, VAE, scheduler); None without diffusers."""
    if SD_DENOISER is None:
        return None
    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def all_configs() -> list[str]:
    """Every runnable config: the top-level ``configs/*.yaml`` (teachers/ are denoisers)."""
    return sorted(p.name for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("name", all_configs())
def test_config_runs_one_step(name, tmp_path, weights, tiny_sd):
    text = (CONFIGS / name).read_text()
    config = yaml.safe_load(text)
    needs_sd = any("stable_diffusion" in o["class_path"] for o in objects(config))
    needs_sd |= any(resolve(o["class_path"]) is VAE for o in objects(config))
    if needs_sd and tiny_sd is None:
        pytest.skip("needs diffusers (pip install -e '.[dev]')")
    path, command = smoke(config, tmp_path, text, tiny_sd)
    main([command, "--config", str(path)])
    if command == "predict":  # every seed's pair, in shards, and an index that says complete
        index = json.loads((tmp_path / "written" / "index.json").read_text())
        assert index["complete"] and index["num_pairs"] == 2
    elif hasattr(resolve(config["model"]["class_path"]), "generate"):
        (samples,) = (tmp_path / "run").glob("**/samples/samples.npz")
        images = np.load(samples)["arr_0"]
        assert images.shape[0] == 2 and images.dtype == np.uint8


def test_head_ict_cifar10_fails_on_the_labels(tmp_path, weights, capsys):
    """The config before issue 15 gave an unconditional network CIFAR-10's 10 labels.

    Its model is git's (commit 35eacd1, the last one before the fix), its data today's in the
    current schema without the fix (``use_labels``); in a shallow clone, today's model is the same.
    """
    config = yaml.safe_load((CONFIGS / "ict_cifar10.yaml").read_text())
    del config["data"]["init_args"]["use_labels"]
    old = subprocess.run(
        ["git", "show", f"{BEFORE_FIX}:configs/ict_cifar10.yaml"], cwd=ROOT, capture_output=True,
        text=True,
    )  # fmt: skip
    if old.returncode == 0:
        old = yaml.safe_load(old.stdout)
        assert "use_labels" not in old["data"]["init_args"]
        config["model"] = old["model"]
    with pytest.raises(SystemExit) as e:
        path, command = smoke(config, tmp_path, "", None)
        main([command, "--config", str(path)])
    assert e.value.code == 2
    assert re.search(r"label_dim 10 but the network has label_dim 0", capsys.readouterr().err)


def header_sample_command(text: str) -> list[str] | None:
    """The ``cm sample ...`` arguments a teacher config's header gives (continuation lines too)."""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    for i, line in enumerate(lines):
        if "cm sample" in line:
            rest = itertools.takewhile(lambda w: w.startswith("--"), lines[i + 1 :])
            words = [line.split("cm sample", 1)[1], *rest]
            return shlex.split(" ".join(w.rstrip("\\") for w in words), comments=True)
    return None


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIGS / "teachers").glob("*.yaml")))
def test_teacher_config_samples_as_its_header_says(name, tmp_path):
    """configs/teachers: the header's ``cm sample`` command on a random narrowed teacher."""
    text = (CONFIGS / "teachers" / name).read_text()
    args = header_sample_command(text)
    if args is None:
        pytest.skip("no cm sample command: used inline (sd15: configs/pairs_sd15.yaml)")
    denoiser = narrow({"model": {"init_args": {"denoiser": yaml.safe_load(text)}}})
    teacher = {"path": "teacher.pt", "denoiser": denoiser["model"]["init_args"]["denoiser"]}
    teacher["format"] = args[args.index("--format") + 1]
    fake_teacher(teacher, denoiser, tmp_path, 0)
    (tmp_path / "denoiser.yaml").write_text(yaml.safe_dump(teacher["denoiser"]))
    values = {"--ckpt_path": teacher["path"], "--denoiser": str(tmp_path / "denoiser.yaml")}
    values["--steps"] = "2"
    args = [values.get(args[i - 1], a) if i else a for i, a in enumerate(args)]
    out = tmp_path / "samples.npz"
    main(["sample", *args, "--num", "2", "--batch_size", "2", "--device", "cpu", "--out", str(out)])
    images = np.load(out)["arr_0"]
    assert images.shape[0] == 2 and images.dtype == np.uint8


# Parameters stated in a config's header, e.g. "(56.4 M params" or "(526.3M parameters)".
STATED = re.compile(r"\(([\d.]+) ?M param")


@pytest.mark.parametrize(
    "name", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("**/*.yaml"))
)
def test_full_size_networks_build_on_meta(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    header = "".join(
        line for line in (CONFIGS / name).read_text().splitlines() if line.startswith("#")
    )
    if "class_path" in config and "model" not in config:  # configs/teachers: a denoiser
        denoisers = [config]
    elif "model" not in config:  # configs/strategies: a trainer overlay for any config
        denoisers = []
    else:
        model = config["model"]["init_args"]
        teachers = (o for o in objects(model) if o["class_path"].endswith("PretrainedDenoiser"))
        denoisers = [t["init_args"]["denoiser"] for t in teachers if "denoiser" in t["init_args"]]
        if "net" in model.get("denoiser", {}).get("init_args", {}):
            denoisers.insert(0, model["denoiser"])
    if not denoisers:
        pytest.skip("no cm network in this config")
    counts = []
    for d in denoisers:
        if "stable_diffusion" in d["class_path"]:
            continue  # diffusers reads its own config from the checkpoint folder
        d["init_args"].pop("vae", None)  # a latent model's VAE: read from its folder, not built
        with torch.device("meta"):
            module = build(copy.deepcopy(d))
        counts.append(sum(p.numel() for p in module.parameters()))
        assert all(p.is_meta for p in module.parameters())
    if stated := STATED.search(header):
        assert round(counts[0] / 1e6, 1) == float(stated.group(1)), counts
