"""Pretrained weights from elsewhere: one registry, offline-safe lookup, ``cm weights fetch/check``.

Files are looked up in ``$CM_WEIGHTS`` (one or more directories, ``os.pathsep``-separated), then
in the torch hub cache (``$TORCH_HOME/hub/checkpoints``), then, for a file published on the Hugging
Face Hub (open_clip's tags), in the Hugging Face cache (``cm.hub.cache_dir``, where open_clip and
``hf download`` put it). Nothing is downloaded implicitly: a missing file is one
``FileNotFoundError`` naming the file, its URL and the places searched.
``cm weights fetch`` downloads on a machine with network (atomically: a partial download never
takes the file's name).

A weights cache is data, not code: every file is read by cm itself, with
``torch.load(weights_only=True)`` (``load_state_dict``), after its SHA-256 matched the published
one (``verify``). The only exception is OpenAI's CLIP, published as TorchScript archives that only
``torch.jit.load`` reads: cm opens one only after its full SHA-256 matched OpenAI's digest.
"""

import hashlib
import os
import pickle
import re
import shutil
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from cm import hub
from cm.errors import UserError
from cm.files import atomic_path

FULL_DIGEST = re.compile(r"[0-9a-f]{64}")
HUB_URL = "https://huggingface.co/{}/resolve/main/{}"  # repo id, file name
# What a truncated, corrupt or foreign weights file raises when read.
READ_ERRORS = (RuntimeError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)
Status = Literal["ok", "MISSING", "CORRUPT", "UNCHECKED"]


@dataclass(frozen=True)
class WeightsFile:
    """A weights file: its name on disk, where it comes from, what uses it, its published SHA-256.

    ``sha256`` is the full hex digest where a published one is known; a shorter hex string is a
    prefix (torch hub's ``name-<prefix>.pth`` convention, the only digest some files have); None
    means no digest is known and the file is only ever read with ``weights_only=True``.
    ``name`` is what ``cm weights fetch`` takes for it (for the error messages). ``hub_repo`` and
    ``hub_files`` (preferred first) name its copy on the Hub, looked up in the Hugging Face cache.
    """

    filename: str
    url: str
    used_by: str
    sha256: str | None = None
    name: str = ""
    hub_repo: str = ""
    hub_files: tuple[str, ...] = ()


# Full digests: torch hub names a file ``<name>-<first 8+ hex of its SHA-256>.pth``; the rest of
# each digest below was found pinned in public code (no network here to hash the files).
REGISTRY: dict[str, WeightsFile] = {
    "inception": WeightsFile(
        "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth",
        "FID, IS, KID, precision/recall (torch-fidelity's port of the TF Inception graph)",
        # pinned for this file name in HyperGAN/HyperGAN's CIFAR pretrained-critic recipe (docs),
        # and for pytorch-fid's copy (pt_inception-2015-12-05-6726825d.pth, the same bytes) in
        # genforce's inception.py _MODEL_URL_SHA256; both extend the file-name prefix.
        "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
        "inception",
    ),
    "vgg16": WeightsFile(
        "vgg16-397923af.pth",
        "https://download.pytorch.org/models/vgg16-397923af.pth",
        "LPIPS (net='vgg'), the CM distance",
        # pinned identically by several public LPIPS/3DGS reproduction scripts (e.g. a
        # VGG16_SHA256 constant beside this URL, an LPIPS "trunk_sha256" manifest entry).
        "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
        "vgg16",
    ),
    "alexnet": WeightsFile(
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "LPIPS (net='alex')",
        # No public source pinning the full digest was found: only torch hub's file-name prefix
        # is checked (about 2^-32 odds that a random replacement passes; not a defence against
        # a crafted one, but the file is read with weights_only=True, so it cannot run code).
        "7be5be79",
        "alexnet",
    ),
}


def clip_weights(model: str = "ViT-L-14", pretrained: str = "openai") -> WeightsFile:
    """The open_clip checkpoint ``model``/``pretrained`` as a registry entry (URL from open_clip).

    Stored as ``open_clip_<model>_<pretrained>.bin`` (the OpenAI tags are TorchScript archives,
    the others state dicts; ``cm.metrics`` reads both). OpenAI's URLs carry the file's full
    SHA-256 as their last directory (open_clip's ``download_pretrained_from_url`` checks it so);
    Hugging Face tags publish none that open_clip records, so those files stay unchecked. The
    Hub home is open_clip's ``hf_hub`` (``timm/...`` for OpenAI's tags, state dicts there), with
    the files open_clip looks for, safetensors first.
    """
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model, pretrained)
    if not cfg:
        raise UserError(
            f"open_clip has no pretrained tag {pretrained!r} for {model!r}: see "
            "open_clip.list_pretrained() for the available pairs."
        )
    repo, hub_file = os.path.split(cfg.get("hf_hub") or "")  # "org/name/" or "org/name/file"
    hub_file = hub_file or "open_clip_pytorch_model.bin"
    safe = "open_clip_model" if hub_file == "open_clip_pytorch_model.bin" else hub_file[:-4]
    # open_clip's own order: the safetensors alternative of a .bin/.pth first
    hub_files = (f"{safe}.safetensors", hub_file) if hub_file.endswith((".bin", ".pth")) else ()
    url = cfg.get("url") or (HUB_URL.format(repo, hub_file) if repo else "")
    parts = url.split("/")
    published = parts[-2] if "openaipublic" in url and FULL_DIGEST.fullmatch(parts[-2]) else None
    filename, used_by = f"open_clip_{model}_{pretrained}.bin", f"CLIP score ({model}, {pretrained})"
    name = f"clip:{model}:{pretrained}"
    hub_files = (hub_files or (hub_file,)) if repo else ()
    return WeightsFile(filename, url, used_by, published, name, repo, hub_files)


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with a ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def load_clip_state_dict(path: Path, spec: WeightsFile | None = None) -> dict[str, Tensor]:
    """A state dict from an open_clip ``.bin``/``.pt`` file or an OpenAI TorchScript archive.

    The file is checked against ``spec``'s published SHA-256 where one is known (``verify``).
    ``torch.jit.load`` runs an archive's code, so an archive is opened only when that check was
    against OpenAI's full digest; any other archive is refused. State dicts are read with
    ``weights_only=True``.

    Args:
        path: the file.
        spec: its registry entry (``clip_weights``); None for a file from elsewhere.
    """
    fetch_hint = f"`cm weights fetch {spec.name}`" if spec else "`cm weights fetch clip:MODEL:TAG`"
    if spec is not None:
        verify(spec, path)
    try:
        if is_torchscript(path):  # OpenAI's published CLIP files are TorchScript modules
            if spec is None or not FULL_DIGEST.fullmatch(spec.sha256 or ""):
                raise UserError(
                    f"'{path}' is a TorchScript archive, which runs code when loaded; cm opens "
                    "one only when its SHA-256 matches OpenAI's published digest (the openai "
                    "tags): save the model's state_dict() with torch.save instead."
                )
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state.pop(key, None)
            return dict(state)
        if path.suffix == ".safetensors":  # a Hub copy (open_clip_model.safetensors)
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (*READ_ERRORS, SafetensorError) as error:
        raise UserError(
            f"Cannot read the CLIP weights '{path}' ({type(error).__name__}): download the file "
            f"again ({fetch_hint})."
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"'{path}' is not a CLIP state dict: download it again ({fetch_hint}).")
    state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_open_clip(model: str = "ViT-L-14", pretrained: str = "openai") -> tuple[Any, dict]:
    """The open_clip ``model`` with the offline ``pretrained`` weights (frozen, eval), and its cfg.

    The file comes from ``locate(clip_weights(model, pretrained))`` (one clear error when missing)
    and is checked against its published SHA-256 where one is known; a file that does not fit
    the architecture is one clear error too.
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    path, spec = locate(clip_weights(model, pretrained))
    cfg = get_pretrained_cfg(model, pretrained)
    clip = open_clip.create_model(
        model, pretrained=None, force_quick_gelu=bool(cfg.get("quick_gelu", False))
    )
    state = load_clip_state_dict(path, spec)
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


def hub_copy(spec: WeightsFile, filename: str) -> WeightsFile:
    """The entry of the Hub's copy ``filename`` of ``spec``, with its digest only if the same file.

    The published SHA-256 holds for a Hub copy that is the file at ``spec.url`` (open_clip's
    Hugging Face tags); the Hub's copies of OpenAI's TorchScript files are other files (state
    dicts): unchecked, like every Hugging Face tag, and never opened as TorchScript.
    """
    url = HUB_URL.format(spec.hub_repo, filename)
    digest = spec.sha256 if url == spec.url else None
    return replace(spec, filename=filename, url=url, sha256=digest)


def locate(name: str | WeightsFile) -> tuple[Path, WeightsFile]:
    """A registered file's local path and the entry of that copy (``find``, plus what to check).

    Looks in ``weights_dirs()``, then, for a file published on the Hub, in the Hugging Face cache
    (``spec.hub_files`` in order); one clear ``FileNotFoundError`` naming every place searched.
    """
    spec = entry(name)
    for d in weights_dirs():
        if (d / spec.filename).is_file():
            return d / spec.filename, spec
    for filename in spec.hub_files:
        if (path := hub.cached_file(spec.hub_repo, filename)) is not None:
            return path, hub_copy(spec, filename)
    where = ", ".join(str(d) for d in weights_dirs())
    hf = f" or {hub.repo_folder(spec.hub_repo)} (the Hugging Face cache)" if spec.hub_repo else ""
    raise FileNotFoundError(
        f"Weights file '{spec.filename}' ({spec.used_by}) not found in {where}{hf}: download it "
        f"from {spec.url} into one of these directories (or set CM_WEIGHTS to the folder that "
        "holds it); on a machine with network, `cm weights fetch` does this"
        f"{f' (or `hf download {spec.hub_repo} {spec.hub_files[-1]}`)' if spec.hub_repo else ''}."
    )


def find(name: str | WeightsFile) -> Path:
    """The local path of a registered file, or one clear error naming file, URL and places."""
    return locate(name)[0]


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file, read in 8 MiB blocks (a 528 MB VGG16 in about a second)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def matches(spec: WeightsFile, digest: str) -> bool:
    """Whether ``digest`` is the published SHA-256 (or starts with the published prefix)."""
    return spec.sha256 is None or digest.startswith(spec.sha256.lower())


def mismatch_message(spec: WeightsFile, path: Path, digest: str) -> str:
    """The one sentence for a file whose SHA-256 is not the published one."""
    kind = "SHA-256" if FULL_DIGEST.fullmatch(spec.sha256 or "") else "SHA-256 prefix"
    fetch_cmd = f"`cm weights fetch {spec.name}`" if spec.name else "`cm weights fetch`"
    return (
        f"Weights file '{path}' ({spec.used_by}) has SHA-256 {digest[:16]}..., which does not "
        f"match the published {kind} {(spec.sha256 or '')[:16]}...: the file is corrupt or was "
        f"replaced; delete it and run {fetch_cmd}, or download it again from {spec.url}."
    )


def verify(name: str | WeightsFile, path: str | Path) -> str:
    """Hash ``path`` once and raise one ``UserError`` unless it is the published file.

    Returns:
        The file's hex SHA-256.
    """
    spec, path = entry(name), Path(path)
    digest = sha256_file(path)
    if not matches(spec, digest):
        raise UserError(mismatch_message(spec, path, digest))
    return digest


def load_state_dict(name: str | WeightsFile, path: str | Path | None = None) -> dict[str, Tensor]:
    """The tensors of a registered file: found, SHA-256-checked, read with ``weights_only=True``.

    The one loader of every registered torch file (Inception, VGG16, AlexNet): nothing in a
    weights cache is unpickled by anything but ``torch.load(weights_only=True)``.

    Args:
        name: a registry name or entry.
        path: the file to read instead of looking it up (still checked against the digest).
    """
    spec = entry(name)
    if path is None:
        path, spec = locate(spec)
    path = Path(path)
    verify(spec, path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except READ_ERRORS as error:
        raise UserError(
            f"Cannot read the weights file '{path}' ({type(error).__name__}) as plain tensors: "
            f"download {spec.filename} again from {spec.url}."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(
            f"'{path}' is not a state dict of tensors: download {spec.filename} again from "
            f"{spec.url}."
        )
    return dict(state)


def fetch(name: str | WeightsFile, directory: str | Path | None = None) -> Path:
    """Download a registered file into ``directory`` (default: the first of ``weights_dirs``).

    A present file with the published SHA-256 is left alone; a present file that does not match
    is replaced (in its own directory unless ``directory`` is given). The download goes to a
    temporary file in the same directory and is renamed only when complete and its SHA-256
    matches the published one (where known).
    """
    spec = entry(name)
    present, copy = None, spec
    try:
        present, copy = locate(spec)
    except FileNotFoundError:
        pass
    if present is not None and matches(copy, sha256_file(present)):
        return present
    # a bad copy is replaced in its own directory, never inside the Hugging Face cache
    own = present is not None and present.name == spec.filename
    default_dir = present.parent if own else weights_dirs()[0]
    target_dir = Path(directory) if directory is not None else default_dir
    target = target_dir / spec.filename
    try:
        with atomic_path(target) as tmp:
            with tmp.open("wb") as out, urllib.request.urlopen(spec.url) as response:
                shutil.copyfileobj(response, out)
            digest = sha256_file(tmp)
            if not matches(spec, digest):
                raise UserError(
                    f"Download of {spec.url} has SHA-256 {digest[:16]}..., expected "
                    f"{(spec.sha256 or '')[:16]}...: retry, or fetch the file by hand."
                )
    except OSError as error:  # no network, DNS, HTTP errors, disk: one sentence, no urllib trace
        raise ConnectionError(
            f"Could not download {spec.url} ({error}): on a machine without network, copy "
            f"'{spec.filename}' into {target_dir} by hand."
        ) from None
    return target


@dataclass(frozen=True)
class Check:
    """One row of ``cm weights check``: a file's status and, when not ok, why."""

    name: str
    filename: str
    path: Path | None
    status: Status
    detail: str = ""


def check_one(name: str) -> Check:
    """Find and hash one registered file: ok, MISSING, CORRUPT, or UNCHECKED (no digest known)."""
    spec = entry(name)
    try:
        path, copy = locate(spec)
    except FileNotFoundError:
        return Check(name, spec.filename, None, "MISSING", f"download from {spec.url}")
    if copy.sha256 is None:
        where = "" if path.name == spec.filename else ", Hugging Face cache copy"
        return Check(name, spec.filename, path, "UNCHECKED", f"no published SHA-256{where}")
    spec = copy  # the digest that holds for the copy found
    digest = sha256_file(path)
    if not matches(spec, digest):
        detail = f"expected {spec.sha256[:16]}..., got {digest[:16]}..."
        return Check(name, spec.filename, path, "CORRUPT", detail)
    prefix_only = not FULL_DIGEST.fullmatch(spec.sha256)
    return Check(name, spec.filename, path, "ok", "file-name prefix only" if prefix_only else "")


def check(names: Sequence[str] | None = None) -> list[Check]:
    """The status of each registered (or named) file, every present file hashed once."""
    return [check_one(name) for name in names or list(REGISTRY)]
