"""Checkpoints and exports on disk: ``cm fit`` .ckpt files, exports, OpenAI/EDM state dicts.

An export is ``model.safetensors`` + ``config.json``; ``config.json`` holds ``{"denoiser":
{"class_path": ..., "init_args": ...}}`` as written in the training YAML, so ``load`` rebuilds
the denoiser with jsonargparse and no pickle is ever read. Foreign checkpoints (``load_denoiser``
with ``format="openai"``/``"openai_legacy"``/``"edm"``) are loaded into a given denoiser through
the key remaps of ``cm.convert``. EDM's ``network-snapshot-*.pkl`` is a pickle of code, which
``weights_only`` refuses; extract its state dict once, from the root of an NVlabs/edm checkout::

    python -c "import pickle, sys, torch; torch.save(pickle.load(open(sys.argv[1], 'rb'))\
['ema'].state_dict(), sys.argv[2])" network-snapshot-XXXXXX.pkl edm_state.pt
"""

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cm.convert import Format, convert_state, network_of, published_url
from cm.diffusers_io import load_pipeline
from cm.diffusers_layout import is_diffusers_folder
from cm.errors import UserError
from cm.files import atomic_path
from cm.hub import local_or_cached
from cm.sharded import is_sharded, read_sharded
from cm.trust import check_config

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def build(
    config: dict[str, Any], source: str | Path | None = None, trust_config: bool = False
) -> nn.Module:
    """Instantiate a module from a ``{"class_path", "init_args"}`` config (nested ones too).

    Args:
        config: the config; one written in Python or a YAML the user passes is trusted.
        source: the file ``config`` was read from as data (an export's ``config.json``, a
            ``.ckpt``): its import paths must then pass ``cm.trust.check_config``.
        trust_config: the user's opt-in to build any class a ``source`` names.
    """
    if source is not None:
        check_config(config, source, trust_config)

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(nn.Module, "module", fail_untyped=False)
    cfg = parser.parse_object({"module": config})
    return parser.instantiate_classes(cfg).module


def export(
    denoiser: nn.Module,
    path: str | Path,
    config: dict[str, Any],
    extra: dict | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Write ``denoiser``'s weights and constructor ``config`` to the directory ``path``.

    ``extra`` entries (e.g. the ``sampler``) go into ``config.json`` too; ``files`` are text
    files written beside them (name -> text: the model card, the training config). Each file is
    written atomically, and a failure removes the directory if this call created it.
    """
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}
    try:
        with atomic_path(path / WEIGHTS) as tmp:
            save_file(state, str(tmp))
        with atomic_path(path / CONFIG) as tmp:
            tmp.write_text(json.dumps({"denoiser": config, **(extra or {})}, indent=2))
        for name, text in (files or {}).items():
            with atomic_path(path / name) as tmp:
                tmp.write_text(text)
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def load(
    path: str | Path, map_location: str | torch.device = "cpu", trust_config: bool = False
) -> nn.Module:
    """Rebuild an exported denoiser from the directory ``path`` (eval mode).

    ``config.json`` is data: its class_paths may only name cm's classes unless ``trust_config``.
    """
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise FileNotFoundError(
            f"No exported denoiser at '{path}': expected {WEIGHTS} and {CONFIG} there "
            "(write them with `cm export` or cm.io.export)."
        )
    config = read_export_config(path)
    denoiser = build(config["denoiser"], path / CONFIG, trust_config)
    _load_state(denoiser, read_safetensors(path / WEIGHTS, map_location), path / WEIGHTS)
    return denoiser.eval()


def read_export_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of the export directory ``path``; it must hold a denoiser config."""
    file = Path(path) / CONFIG
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"'{file}' is not valid JSON ({e}): re-export the denoiser with `cm export`."
        ) from None
    denoiser = config.get("denoiser") if isinstance(config, dict) else None
    if not isinstance(denoiser, dict) or "class_path" not in denoiser:
        raise UserError(
            f"'{file}' holds no denoiser config (a \"denoiser\" object with a class_path): "
            "re-export the denoiser with `cm export`."
        )
    return config


def read_safetensors(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The tensors of a ``.safetensors`` file; a truncated or foreign file is a UserError."""
    try:
        return load_file(str(path), device=str(map_location))
    except Exception as e:  # SafetensorError (truncated header or data), not a file, ...
        raise UserError(
            f"Cannot read '{path}' ({type(e).__name__}: {' '.join(str(e).split())}): the file "
            "is truncated or not safetensors; copy or export it again."
        ) from None


def _load_state(module: nn.Module, state: dict[str, Tensor], path: str | Path) -> None:
    """``module.load_state_dict(state)``; weights that do not fit the config are a UserError."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0].rstrip(":. ")
        raise UserError(
            f"The weights in '{path}' do not fit the denoiser of its config ({first}): keep "
            "the weights and config that were written together."
        ) from None


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a corrupt or foreign file is a clear ValueError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip (RuntimeError), pickled code (UnpicklingError), ...
        what = "pickled code" if "Weights only load failed" in str(e) else "truncated or corrupt"
        raise UserError(
            f"Cannot load '{path}' with weights_only=True ({type(e).__name__}: {what}): pass a "
            "checkpoint or state dict of tensors saved by torch.save, from a source you trust."
        ) from None


def load_submodule(
    path: str | Path,
    key: str,
    prefixes: Sequence[str],
    map_location: str | torch.device = "cpu",
    trust_config: bool = False,
    missing: str = "Checkpoint '{path}' does not exist: pass the .ckpt written by cm fit.",
    absent: str = "'{path}' holds no {key} config: pass a .ckpt written by cm fit.",
) -> tuple[nn.Module, dict[str, Any]]:
    """The submodule ``key`` of a ``cm fit`` checkpoint (eval mode) and the checkpoint's hparams.

    The module is rebuilt from the ``key`` config that the CLI stored in the hyperparameters
    (data: only cm's classes unless ``trust_config``) and loaded from the ``state_dict`` entries
    under the first of ``prefixes`` that has any. Reads with ``weights_only=True``. One loader
    serves denoisers (``load_checkpoint``) and AMED predictors (``load_predictor``).

    Args:
        path: the ``.ckpt`` file.
        key: the hyperparameter holding the module's config (``denoiser``, ``predictor``).
        prefixes: state-dict prefixes to try in order, e.g. ``("ema_denoiser.", "denoiser.")``.
        map_location: where the tensors are loaded.
        trust_config: the user's opt-in to build any class the checkpoint names.
        missing: the error when ``path`` is not a file (``{path}`` is filled in).
        absent: the error when it holds no ``key`` config (``{path}``, ``{key}`` filled in).
    """
    path = Path(path)
    if is_sharded(path):  # a checkpoint directory of cm.training.FSDP: weights, no optimizers
        ckpt = read_sharded(path, optimizers=False)
    elif not path.is_file():
        raise FileNotFoundError(missing.format(path=path))
    else:
        ckpt = load_weights_only(path, map_location)
    hparams = dict(ckpt.get("hyper_parameters", {})) if isinstance(ckpt, dict) else {}
    config = hparams.get(key)
    if not isinstance(config, dict) or "class_path" not in config:
        raise UserError(absent.format(path=path, key=key))
    module = build(config, path, trust_config)
    state = ckpt["state_dict"]
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in state)), prefixes[-1])
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    _load_state(module, weights, path)
    return module.eval(), hparams


def load_checkpoint(
    path: str | Path,
    ema: bool = True,
    map_location: str | torch.device = "cpu",
    trust_config: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the (EMA) denoiser of a ``cm fit`` checkpoint and return it with its hparams.

    The hyperparameters are data: their class_paths (the sampler's too, which ``cm sample``
    builds) may only name cm's classes unless ``trust_config``.
    """
    prefixes = ("ema_denoiser.", "denoiser.") if ema else ("denoiser.",)
    absent = (
        "'{path}' holds no denoiser config: checkpoints written by `cm fit` have one; for a "
        "module built in Python use cm.io.export with the constructor config."
    )
    denoiser, hparams = load_submodule(
        path, "denoiser", prefixes, map_location, trust_config, absent=absent
    )
    check_config(hparams, path, trust_config)
    return denoiser, hparams


def load_predictor(
    path: str | Path, map_location: str | torch.device = "cpu", trust_config: bool = False
) -> nn.Module:
    """The trained ``AMEDPredictor`` of an AMED ``cm fit`` checkpoint (eval mode).

    It carries the grid, base solver and AFS setting it was trained for (``predictor.grid()``).
    Its config is data: only cm's classes unless ``trust_config``.
    """
    missing = (
        "AMED predictor '{path}' does not exist: pass the .ckpt written by "
        "cm fit --config configs/amed_*.yaml."
    )
    absent = (
        "'{path}' holds no AMED predictor: train one with cm fit --config configs/amed_*.yaml "
        "and pass its .ckpt."
    )
    predictor, _ = load_submodule(
        path, "predictor", ("predictor.",), map_location, trust_config, missing, absent
    )
    return predictor


def load_any(
    path: str | Path, ema: bool = True, trust_config: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """A denoiser from a ``.ckpt`` file or an exported directory, with its hparams (may be {})."""
    path = Path(path)
    if path.is_dir() and not is_sharded(path):
        denoiser = load(path, trust_config=trust_config)
        config = read_export_config(path)
        check_config(config, path / CONFIG, trust_config)  # the sampler too
        return denoiser, config
    return load_checkpoint(path, ema, trust_config=trust_config)


def read_config(path: str | Path) -> dict[str, Any]:
    """A denoiser ``{"class_path", "init_args"}`` config from a YAML or JSON file.

    A file with a top-level ``denoiser`` key (an export's ``config.json``) works too.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Denoiser config '{path}' does not exist: write a YAML file with the denoiser's "
            "class_path and init_args, e.g. configs/teachers/openai_edm_imagenet64.yaml."
        )
    config = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    if isinstance(config, dict) and "class_path" not in config:
        config = config.get("denoiser")
    if not isinstance(config, dict) or "class_path" not in config:
        raise UserError(
            f"'{path}' holds no denoiser config: give it a top-level class_path and init_args "
            "(e.g. class_path: cm.precond.EDMPrecond) as in configs/teachers/."
        )
    return config


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file or a ``.pt`` state dict (``weights_only`` load)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code: EDM snapshots, whole modules
        raise UserError(
            f"'{path}' is not a plain state dict of tensors ({type(e).__name__}): save "
            "model.state_dict() with torch.save, or extract EDM snapshots as cm.io describes."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(
            f"'{path}' is not a flat state dict of tensors: save model.state_dict() itself."
        )
    return state


def load_denoiser(
    path: str | Path,
    denoiser: nn.Module | dict[str, Any] | str | Path | None = None,
    format: Format = "auto",
    ema: bool = True,
    trust_config: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Any supported denoiser file as a denoiser (eval mode) with its hparams ({} if foreign).

    Args:
        path: an exported directory, a ``cm fit`` ``.ckpt``, a diffusers folder or the
            Hugging Face Hub id of one (found in the HF cache, ``cm.hub.resolve``), or a
            foreign ``.pt``/``.safetensors`` state dict.
        denoiser: for foreign formats, the architecture to load into: a module, a
            ``class_path``/``init_args`` dict, or a YAML/JSON file holding one. Ignored for cm.
        format: ``cm`` (export or ``.ckpt``); ``openai`` (consistency_models, and
            guided-diffusion trained with ``--use_new_attention_order True``); ``openai_legacy``
            (guided-diffusion's default legacy attention: its 128 and 256 px models); ``edm``
            (EDM ``SongUNet`` into ``NCSNpp``); ``diffusers`` (an ADM-style ``UNet2DModel``
            pipeline folder, ``cm.diffusers_io``); ``auto``: diffusers for a folder that
            ``save_pretrained`` wrote, cm for an export folder or ``.ckpt``.
        ema: use the EMA weights of a ``.ckpt``.
        trust_config: build any class that an export's ``config.json`` or a ``.ckpt``'s
            hyperparameters name (the user's opt-in, ``--trust_config``); by default only
            cm's classes (``cm.trust``). A ``denoiser`` passed here is the caller's, trusted.
    """
    path = Path(path)
    if format in ("auto", "diffusers"):
        path = local_or_cached(path, "denoiser")  # a Hub id: its snapshot in the HF cache
    if not path.exists():
        raise FileNotFoundError(
            f"'{path}' does not exist: expected an exported denoiser directory ({WEIGHTS} + "
            f"{CONFIG}), a .ckpt written by cm fit, a diffusers folder or Hugging Face Hub id, "
            f"or a .pt/.safetensors state dict{published_url(path, format)}."
        )
    if format == "auto":
        if path.is_dir() and is_diffusers_folder(path) and not (path / CONFIG).is_file():
            format = "diffusers"
        elif not (path.is_dir() or path.suffix == ".ckpt"):
            raise UserError(
                f"Cannot tell the format of '{path}': pass format openai, openai_legacy or edm "
                "(with the denoiser architecture) for a published checkpoint."
            )
        else:
            format = "cm"
    if format == "diffusers":
        if not is_diffusers_folder(path):
            raise UserError(
                f"'{path}' is not a diffusers folder (no model_index.json or unet/config.json): "
                "give the folder save_pretrained wrote, or its Hub id."
            )
        return load_pipeline(path)
    if format == "cm":
        return load_any(path, ema, trust_config)
    if denoiser is None:
        raise UserError(
            f"Loading '{path}' as format {format!r} needs the denoiser architecture: pass a "
            "denoiser config (cm sample --denoiser FILE.yaml), e.g. configs/teachers/*.yaml."
        )
    config = None
    if not isinstance(denoiser, nn.Module):
        config = denoiser if isinstance(denoiser, dict) else read_config(denoiser)
        denoiser = build(config)
    net = network_of(denoiser)
    net.load_state_dict(convert_state(read_state_dict(path), net, format))
    return denoiser.eval(), ({"denoiser": config} if config else {})
