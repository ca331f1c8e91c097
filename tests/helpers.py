"""Plain helpers shared by the test files (fixtures live in conftest.py).

Paths and the tiny quickstart run through the real CLI, the tiny 8x8 networks, a quiet CPU
trainer, fake dataset folders in the official layouts and ``cm predict`` pair configs. One copy
of each, so a change to the tiny setup (or to a CLI flag) is made once.
"""

import importlib.util
import io
import json
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cm.cli import main
from cm.networks import ADMUNet, NCSNpp
from cm.objectives.jvp import tangent

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
ICT_DIGITS = str(CONFIGS / "ict_digits.yaml")  # the generic tiny run (with tests/tiny.yaml)
TINY_YAML = str(ROOT / "tests" / "tiny.yaml")  # a tiny network, small batches, no progress bar
DIGITS = "cm.metrics.digits.DigitsFeatures"  # shipped weights: no download, CPU-fast

# -- the tiny quickstart through the CLI -------------------------------------------------------


def tiny_args(command: str, root: Path, *extra: str, config: str | Path = ICT_DIGITS) -> list[str]:
    """``cm <command>`` (fit, validate, predict) of ``config`` + tests/tiny.yaml under ``root``."""
    return [
        command,
        "--config",
        str(config),
        "--config",
        TINY_YAML,
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        *extra,
    ]


def fit_args(root: Path, *extra: str, steps: int = 1, config: str | Path = ICT_DIGITS) -> list[str]:
    """``cm fit`` of ``config`` with tests/tiny.yaml for ``steps`` steps, writing under ``root``."""
    return tiny_args("fit", root, f"--trainer.max_steps={steps}", *extra, config=config)


def fit(root: Path, steps: int, *extra: str) -> Path:
    """Run ``cm fit`` of the tiny quickstart for ``steps`` steps in process; return ``root``."""
    main(fit_args(root, *extra, steps=steps))
    return root


def last_ckpt(root: Path) -> Path:
    """The newest checkpoint written under ``root``."""
    return sorted(root.glob("**/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)[-1]


def fails(args: list[str], match: str, capsys) -> str:
    """Run ``cm args``; assert exit code 2, no traceback and one last ``error: <match ...>`` line.

    The line is the only ``error:`` line of stderr and carries no parser dump."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    assert [e for e in err.splitlines() if e.startswith("error: ")] == [line], err
    assert re.search(match, line), line
    for dump in ("Union subtypes", "Given value", "Namespace(", "Traceback"):
        assert dump not in line, line
    return line


# -- tiny networks and a quiet CPU trainer ------------------------------------------------------

# The tests' 8x8 one-channel ADMUNet (the quickstart network under tests/tiny.yaml), without its
# label_dim so that it also serves, as written, in YAML configs of unconditional nets.
TINY_ADM = dict(
    img_resolution=8,
    in_channels=1,
    out_channels=1,
    model_channels=16,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_resolutions=[4],
    num_head_channels=16,
)


def tiny_adm(**overrides) -> ADMUNet:
    """``TINY_ADM`` with 10 classes, changed by ``overrides``."""
    return ADMUNet(**{**TINY_ADM, "label_dim": 10, **overrides})


def tiny_ncsnpp(**overrides) -> NCSNpp:
    """An 8x8 one-channel, 10-class NCSNpp (16 channels, one block a level), changed by
    ``overrides``."""
    args = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=16)
    args |= dict(channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    return NCSNpp(**{**args, **overrides})


def cpu_trainer(root: Path | None = None, *callbacks: L.Callback, **options) -> L.Trainer:
    """A one-process CPU trainer under ``root`` with no logger, checkpoints, progress bar or
    summary unless ``options`` ask for them (pass ``max_steps`` or ``max_epochs``)."""
    quiet = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks),
    )  # fmt: skip
    return L.Trainer(**{**quiet, **options})


def n_params(net: nn.Module) -> int:
    """The number of parameters of ``net``."""
    return sum(p.numel() for p in net.parameters())


def one_hot(y: torch.Tensor, n: int) -> torch.Tensor:
    """Float one-hot rows of the class indices ``y``."""
    return F.one_hot(y, n).float()


# -- weights: registered digests, a tiny open_clip ---------------------------------------------


def register_weights(monkeypatch, name: str, path: Path) -> None:
    """Record ``path``'s SHA-256 as registry entry ``name``'s published digest for one test.

    Random test weights cannot have the published digest; this registers theirs the way the real
    files are registered, so the real check runs (there is no switch that skips it)."""
    import dataclasses

    from cm import weights

    spec = weights.REGISTRY[name]
    digest = weights.sha256_file(path)
    monkeypatch.setitem(weights.REGISTRY, name, dataclasses.replace(spec, sha256=digest))


def tiny_open_clip(name: str, directory: Path, monkeypatch, text_width: int = 32):
    """Register open_clip model ``name``/``random`` (1 layer each tower), save random weights in
    ``directory`` under ``cm.weights``' file name, point ``CM_WEIGHTS`` there; return the model."""
    import open_clip

    from cm.weights import clip_weights

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                       "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": 2,
                     "layers": 1},
    }  # fmt: skip
    configs = directory / "configs"
    configs.mkdir(parents=True)
    (configs / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(configs)
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED,
        name,
        {"random": open_clip.pretrained._pcfg(url="https://example.invalid/tiny.bin")},
    )
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    torch.save(model.state_dict(), directory / clip_weights(name, "random").filename)
    monkeypatch.setenv("CM_WEIGHTS", str(directory))
    return model


# -- fake dataset folders in the official layouts ----------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Pickle as Python 2's cPickle wrote the official batches: str opcodes, numpy 1.x names."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        op = pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else None
        self.write(op or pickle.BINSTRING + struct.pack("<i", len(obj)))
        self.write(obj)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = lambda self, obj: self.save_bytes(obj.encode("latin1"))
    dispatch[type] = dispatch[type(len)] = save_global


def py2_dumps(obj) -> bytes:
    """``obj`` pickled the way Python 2 wrote the official CIFAR-10 batches."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_cifar10(parent: Path, n: int = 4) -> Path:
    """Official layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [(i + j) % 10 for j in range(n)],
            b"filenames": [b"x.png"] * n,
        }
        # train batches as Python 2 wrote them, the test batch as Python 3 re-pickles it
        dumps = py2_dumps if name != "test_batch" else lambda b: pickle.dumps(b, protocol=2)
        (root / name).write_bytes(dumps(batch))
    meta = {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": n}
    (root / "batches.meta").write_bytes(py2_dumps(meta))
    return root


def write_imagenet64(root: Path, n: int = 2) -> tuple[Path, np.ndarray, np.ndarray]:
    """Official npz batches (CHW rows, 1-based labels) in the two official subfolders."""
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (10 * n, 64, 64, 3), dtype=np.uint8)
    labels = rng.integers(1, 1001, 10 * n)
    labels[:2] = [1, 1000]
    rows = hwc.transpose(0, 3, 1, 2).reshape(10 * n, -1)  # R plane, G plane, B plane
    (root / "Imagenet64_train_npz").mkdir(parents=True)
    (root / "Imagenet64_val_npz").mkdir()
    for k in range(10):
        part = slice(k * n, (k + 1) * n)
        np.savez(
            root / "Imagenet64_train_npz" / f"train_data_batch_{k + 1}.npz",
            data=rows[part],
            labels=labels[part].tolist(),
            mean=np.zeros(12288),
        )
    np.savez(root / "Imagenet64_val_npz" / "val_data.npz", data=rows[:3], labels=labels[:3])
    return root, hwc, labels


# -- cm predict configs: ODE pairs ---------------------------------------------------------------


def write_pairs_config(path: Path, tmp: Path, generator: dict, seeds: dict) -> str:
    """Write a ``cm predict`` YAML to ``path``: ``PairGenerator(**generator)`` on one CPU writes
    the pairs of ``PairSeedDataModule(**seeds)``, ``tmp`` the trainer's root; return its path."""
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp),
            "callbacks": [{"class_path": "cm.training.pairs.PairWriter"}],
        },
        "model": {"class_path": "cm.training.pairs.PairGenerator", "init_args": generator},
        "data": {"class_path": "cm.training.pairs.PairSeedDataModule", "init_args": seeds},
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


# -- text conditioning: a tiny open_clip tower, tiny Stable Diffusion ----------------------------

TINY_CLIP = "cm-test-tiny-text-clip"
WIDTH = 32  # the tiny text tower's token width = the UNet's context_dim
TEXT_ADM = {**TINY_ADM, "num_head_channels": 8, "num_groups": 8}  # ADMUNet args, no labels


def text_pairs_config(
    tmp: Path,
    root: Path,
    prompts: Path,
    cfg_scale: float | None,
    teacher: dict | None = None,
    sampler: dict | None = None,
    **options,
) -> str:
    """Pairs of a random text-conditioned ADM teacher: 10 seeds in shards of 4, Euler 2 steps."""
    net = {"class_path": "cm.networks.ADMUNet", "init_args": {**TEXT_ADM, "context_dim": WIDTH}}
    teacher = teacher or {"class_path": "cm.precond.EDMPrecond", "init_args": {"net": net}}
    sampler = sampler or {"solver": "cm.solvers.euler", "num_steps": 2}
    encoder = {
        "class_path": "cm.networks.text.TextEncoder",
        "init_args": {"model": TINY_CLIP, "pretrained": "random", "max_length": 8},
    }
    generator = {
        "teacher": teacher,
        "sampler": {"class_path": "cm.solvers.Sampler", "init_args": sampler},
        "cfg_scale": cfg_scale,
        "batch_size": 3,
        "captions": str(prompts),
        "text_encoder": encoder,
        **options,
    }
    seeds = {"root": str(root), "num": 10, "seed": 0, "shard_size": 4}
    return write_pairs_config(tmp / f"text_pairs_{cfg_scale}.yaml", tmp, generator, seeds)


SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


def write_tiny_sd(tmp_path: Path) -> Path:
    """``tmp_path/sd``: a tiny random UNet2DConditionModel, AutoencoderKL and scheduler config."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=WIDTH,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    unet.save_pretrained(tmp_path / "sd" / "unet")
    vae.save_pretrained(tmp_path / "sd" / "vae")
    (tmp_path / "sd" / "scheduler").mkdir()
    (tmp_path / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER))
    return tmp_path / "sd"


def write_tiny_vae(path: Path, seed: int = 0) -> Path:
    """``path``: the tiny random AutoencoderKL of ``scripts/tiny_vae.py`` (reused if there)."""
    pytest.importorskip("diffusers")
    if (path / "config.json").is_file():
        return path
    spec = importlib.util.spec_from_file_location("tiny_vae", ROOT / "scripts" / "tiny_vae.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.save_tiny_vae(path, seed)


def write_sd_pairs(tmp_path: Path, tiny_sd: Path, captions: str) -> tuple[Path, str]:
    """Latent text pairs of the tiny SD teacher by ``cm predict`` (DDIM 2 steps, CFG 3)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(captions)
    root = tmp_path / "sd_pairs"
    teacher = {
        "class_path": "cm.networks.stable_diffusion.StableDiffusionDenoiser",
        "init_args": {"path": str(tiny_sd), "load_vae": False},
    }
    sampler = {"solver": "cm.solvers.ddim", "num_steps": 2, "schedule": "vp"}
    config = text_pairs_config(
        tmp_path, root, prompts, 3.0, teacher, sampler, clamp=False, uncond_caption=""
    )
    main(["predict", "--config", config])
    return root, config


# -- configs and names shared by two test files ------------------------------------------------


def amed_yaml(tmp_path: Path, **predictor) -> Path:
    """configs/amed_mixture.yaml writing under ``tmp_path``, quiet, with ``predictor`` options,
    3 teacher substeps and 2560 seeds in batches of 64; return the written YAML's path."""
    config = yaml.safe_load((CONFIGS / "amed_mixture.yaml").read_text())
    config["trainer"].update(
        default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False
    )
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    config["model"]["init_args"]["predictor"]["init_args"].update(predictor)
    config["model"]["init_args"]["objective"]["init_args"]["teacher_substeps"] = 3
    config["data"]["init_args"].update(num=2560, batch_size=64)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "amed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def published_names(trunk_key: str) -> str:
    """The E-LatentLPIPS release's name of ``trunk.features.<i>.<param>`` (slices 0-6, 7-13, ...,
    34-43)."""
    _, _, i, param = trunk_key.split(".")
    s = 1 + sum(int(i) >= b for b in (7, 14, 24, 34))
    return f"net.slice{s}.{i}.{param}"


def write_imagenet_folders(root: Path) -> Path:
    """Three odd-sized JPEGs in ILSVRC2012's ``train/<wnid>/`` layout, two classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for wnid, sizes in (("n01440764", [(40, 60), (70, 50)]), ("n15075141", [(33, 33)])):
        (root / "train" / wnid).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / wnid / f"{wnid}_{i}.JPEG")
    return root


# -- activation checkpointing: same function, fewer saved activations --------------------------


def saved_tensors(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``fn()`` and the number of tensors autograd saved for its backward outside checkpoints
    (``torch.utils.checkpoint`` saves through its own hooks, which hide these)."""
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), count


def check_checkpointing(plain: nn.Module, ckpt: nn.Module, x: torch.Tensor, *args) -> None:
    """``ckpt`` (``checkpointing: true``) loads ``plain``'s state dict strictly, under the same
    keys, and computes the same training output and gradients (dropout drawn from one seed)
    while saving far fewer tensors; in eval mode or without grad it saves as many."""
    ckpt.load_state_dict(plain.state_dict())
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    runs = []
    for net in (plain, ckpt):
        net.train()
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)
        out, saved = saved_tensors(lambda net=net, xi=xi: net(xi, *args))
        out.square().mean().backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        runs.append((out.detach(), xi.grad, grads, saved))
        net.zero_grad()
    (out0, gx0, g0, saved0), (out1, gx1, g1, saved1) = runs
    torch.testing.assert_close(out1, out0, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=1e-6)
    assert g1.keys() == g0.keys() and len(g0) == len(list(plain.parameters()))
    for name, grad in g0.items():
        torch.testing.assert_close(g1[name], grad, rtol=0, atol=1e-6, msg=name)
    assert saved1 < saved0 / 2, (saved1, saved0)
    for net in (plain, ckpt):
        net.eval()
    assert saved_tensors(lambda: ckpt(x, *args))[1] == saved_tensors(lambda: plain(x, *args))[1]


def check_checkpointed_tangent(plain: nn.Module, ckpt: nn.Module, x: torch.Tensor, *args) -> None:
    """The sCT/MeanFlow tangent ``d/ds F(x + s dx, c + s dc)`` of a training-mode network is the
    same with checkpointing: through ``cm.objectives.jvp.tangent`` (no grad: checkpointing is
    bypassed) and through ``torch.func.jvp`` with grad enabled (checkpointing runs)."""
    c_noise, *rest = args
    gen = torch.Generator().manual_seed(3)
    dx = torch.randn(x.shape, generator=gen)
    dc = torch.rand(c_noise.shape, generator=gen) + 0.5
    ckpt.load_state_dict(plain.state_dict())
    results = []
    for net in (plain, ckpt):
        net.train()

        def f(x: torch.Tensor, c: torch.Tensor, net=net) -> torch.Tensor:
            return net(x, c, *rest)

        torch.manual_seed(5)
        no_grad = tangent(f, (x, c_noise), (dx, dc), precision="float32")
        torch.manual_seed(5)
        with sdpa_kernel(SDPBackend.MATH):
            with_grad = torch.func.jvp(f, (x, c_noise), (dx, dc))[1]
        results.append((no_grad, with_grad))
    (a0, b0), (a1, b1) = results
    assert a0.abs().mean() > 1e-4
    torch.testing.assert_close(a1, a0, rtol=0, atol=1e-6)
    torch.testing.assert_close(b1, b0, rtol=0, atol=1e-6)
    torch.testing.assert_close(b0, a0, rtol=1e-4, atol=1e-5)  # grad mode changes kernels


# -- a Hugging Face hub cache written by hand (no network) -------------------------------------


def write_hf_snapshot(
    cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "main"
) -> Path:
    """Lay ``files`` out in the Hugging Face cache ``cache`` as a download of model ``repo_id``
    would (``models--OWNER--NAME/`` with ``blobs/``, ``snapshots/COMMIT/`` links, ``refs/``);
    return the snapshot folder, which ``cm.hub.resolve(repo_id)`` finds offline."""
    import hashlib
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
