"""Pretrained weights from elsewhere: one registry, offline-safe lookup, ``cm weights fetch/check``.

Files are looked up in ``$CM_WEIGHTS`` (one or more directories, ``os.pathsep``-separated) and then
in the torch hub cache (``$TORCH_HOME/hub/checkpoints``). Nothing is downloaded implicitly: a
missing file is one ``FileNotFoundError`` naming the file, its URL and the directories searched.
``cm weights fetch`` downloads on a machine with network (atomically: a partial download never
takes the file's name).
"""

import hashlib
import os
import shutil
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cm.errors import UserError
from cm.files import atomic_path


@dataclass(frozen=True)
class WeightsFile:
    """A weights file: its name on disk, where it comes from, and what uses it."""

    filename: str
    url: str
    used_by: str
    sha256_prefix: str | None = None


REGISTRY: dict[str, WeightsFile] = {
    "inception": WeightsFile(
        "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth",
        "FID, IS, KID, precision/recall (torch-fidelity's port of the TF Inception graph)",
    ),
    "vgg16": WeightsFile(
        "vgg16-397923af.pth",
        "https://download.pytorch.org/models/vgg16-397923af.pth",
        "LPIPS (net='vgg'), the CM distance",
        "397923af",
    ),
    "alexnet": WeightsFile(
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "LPIPS (net='alex')",
        "7be5be79",
    ),
}


def clip_weights(model: str = "ViT-L-14", pretrained: str = "openai") -> WeightsFile:
    """The open_clip checkpoint ``model``/``pretrained`` as a registry entry (URL from open_clip).

    Stored as ``open_clip_<model>_<pretrained>.bin`` (the OpenAI tags are TorchScript archives,
    the others state dicts; ``cm.metrics`` reads both).
    """
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model, pretrained)
    if not cfg:
        raise UserError(
            f"open_clip has no pretrained tag {pretrained!r} for {model!r}: see "
            "open_clip.list_pretrained() for the available pairs."
        )
    url = cfg.get("url") or ""
    if not url and cfg.get("hf_hub"):
        repo = cfg["hf_hub"].rstrip("/")
        url = f"https://huggingface.co/{repo}/resolve/main/open_clip_pytorch_model.bin"
    used_by = f"CLIP score ({model}, {pretrained})"
    return WeightsFile(f"open_clip_{model}_{pretrained}.bin", url, used_by)


def load_clip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from an open_clip ``.bin``/``.pt`` file or an OpenAI TorchScript archive."""
    try:
        is_script = zipfile.is_zipfile(path) and any(
            name.endswith("constants.pkl") for name in zipfile.ZipFile(path).namelist()
        )
        if is_script:  # OpenAI's published CLIP files are TorchScript modules
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state.pop(key, None)
            return dict(state)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(
            f"Cannot read the CLIP weights '{path}' ({type(error).__name__}): download the file "
            "again (`cm weights fetch clip:MODEL:TAG`)."
        ) from None
    state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_open_clip(model: str = "ViT-L-14", pretrained: str = "openai") -> tuple[Any, dict]:
    """The open_clip ``model`` with the offline ``pretrained`` weights (frozen, eval), and its cfg.

    The file comes from ``find(clip_weights(model, pretrained))`` (one clear error when missing);
    a file that does not fit the architecture is one clear error too.
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    path = find(clip_weights(model, pretrained))
    cfg = get_pretrained_cfg(model, pretrained)
    clip = open_clip.create_model(
        model, pretrained=None, force_quick_gelu=bool(cfg.get("quick_gelu", False))
    )
    state = load_clip_state_dict(path)
    if "logit_scale" in state and state["logit_scale"].ndim != clip.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
    missing, unexpected = clip.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "logit_bias"]
    if missing or unexpected:
        raise UserError(
            f"'{path}' does not fit open_clip's {model} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[0]!r}): check "
            "that the model and pretrained tag name the file's architecture."
        )
    return clip.eval().requires_grad_(False), cfg


def weights_dirs() -> list[Path]:
    """Where weights are looked up: ``$CM_WEIGHTS`` then the torch hub cache's checkpoints."""
    dirs = [Path(p) for p in os.environ.get("CM_WEIGHTS", "").split(os.pathsep) if p]
    return dirs + [Path(torch.hub.get_dir()) / "checkpoints"]


def entry(name: str | WeightsFile) -> WeightsFile:
    """A registry entry by name (``inception``, ``vgg16``, ``alexnet``, ``clip:MODEL:TAG``)."""
    if isinstance(name, WeightsFile):
        return name
    if name.startswith("clip:"):
        _, model, tag = (name.split(":") + ["", ""])[:3]
        return clip_weights(model or "ViT-L-14", tag or "openai")
    if name not in REGISTRY:
        raise UserError(
            f"Unknown weights {name!r}: choose from {', '.join(REGISTRY)} or clip:MODEL:TAG."
        )
    return REGISTRY[name]


def find(name: str | WeightsFile) -> Path:
    """The local path of a registered file, or one clear error naming file, URL and directories."""
    spec = entry(name)
    for d in weights_dirs():
        if (d / spec.filename).is_file():
            return d / spec.filename
    where = ", ".join(str(d) for d in weights_dirs())
    raise FileNotFoundError(
        f"Weights file '{spec.filename}' ({spec.used_by}) not found in {where}: download it "
        f"from {spec.url} into one of these directories (or set CM_WEIGHTS to the folder that "
        "holds it); on a machine with network, `cm weights fetch` does this."
    )


def fetch(name: str | WeightsFile, directory: str | Path | None = None) -> Path:
    """Download a registered file into ``directory`` (default: the first of ``weights_dirs``).

    Present files are left alone. The download goes to a temporary file in the same directory
    and is renamed only when complete and (where known) its SHA-256 prefix matches.
    """
    spec = entry(name)
    try:
        return find(spec)
    except FileNotFoundError:
        pass
    target_dir = Path(directory) if directory is not None else weights_dirs()[0]
    target = target_dir / spec.filename
    try:
        with atomic_path(target) as tmp:
            with tmp.open("wb") as out, urllib.request.urlopen(spec.url) as response:
                shutil.copyfileobj(response, out)
            if spec.sha256_prefix is not None:
                digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
                if not digest.startswith(spec.sha256_prefix):
                    raise UserError(
                        f"Download of {spec.url} has SHA-256 {digest[:12]}..., expected "
                        f"{spec.sha256_prefix}...: retry, or fetch the file by hand."
                    )
    except OSError as error:  # no network, DNS, HTTP errors, disk: one sentence, no urllib trace
        raise ConnectionError(
            f"Could not download {spec.url} ({error}): on a machine without network, copy "
            f"'{spec.filename}' into {target_dir} by hand."
        ) from None
    return target


def check(names: Sequence[str] | None = None) -> list[tuple[str, str, Path | None]]:
    """``(name, filename, path or None)`` for each registered (or named) file."""
    rows = []
    for name in names or list(REGISTRY):
        spec = entry(name)
        try:
            rows.append((name, spec.filename, find(spec)))
        except FileNotFoundError:
            rows.append((name, spec.filename, None))
    return rows


def weights_main(args: Sequence[str]) -> None:
    """``cm weights check [NAME ...]`` lists what is present; ``cm weights fetch`` downloads."""
    from jsonargparse import ArgumentParser

    p = ArgumentParser(
        exit_on_error=False,
        prog="cm weights",
        description="Pretrained weights used by cm (Inception, VGG/AlexNet for LPIPS, CLIP): "
        "list what is present (check) or download what is missing (fetch).",
    )
    p.add_argument("action", type=str, help="check or fetch.")
    p.add_argument(
        "names",
        type=str,
        nargs="*",
        default=[],
        help=f"Which weights (default all): {', '.join(REGISTRY)}, clip:MODEL:TAG.",
    )
    p.add_argument("--dir", type=str | None, default=None, help="fetch: where to put the files.")
    cfg = p.parse_args(list(args))
    names = cfg.names or list(REGISTRY)
    match cfg.action:
        case "check":
            for name, filename, path in check(names):
                print(f"{name:12s} {'ok' if path else 'MISSING':8s} {path or filename}")
        case "fetch":
            for name in names:
                print(f"{name:12s} {fetch(name, cfg.dir)}")
        case _:
            raise UserError(f"Unknown action {cfg.action!r}: use cm weights check or fetch.")
