"""Denoisers on disk: exported, ``cm fit`` checkpoints, published OpenAI/EDM state dicts.

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
import re
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cm.convert import convert_edm, convert_openai, network_of
from cm.errors import UserError
from cm.files import atomic_open, atomic_path, check_output  # noqa: F401 - cm.io names
from cm.networks import ADMUNet, NCSNpp
from cm.trust import check_config

WEIGHTS, CONFIG = "model.safetensors", "config.json"
Format = Literal["auto", "cm", "openai", "openai_legacy", "edm"]


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
    from jsonargparse import ArgumentParser

    if source is not None:
        check_config(config, source, trust_config)

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(nn.Module, "module", fail_untyped=False)
    cfg = parser.parse_object({"module": config})
    return parser.instantiate_classes(cfg).module


def export(
    denoiser: nn.Module, path: str | Path, config: dict[str, Any], extra: dict | None = None
) -> Path:
    """Write ``denoiser``'s weights and constructor ``config`` to the directory ``path``.

    ``extra`` entries (e.g. the ``sampler``) go into ``config.json`` too. Each file is written
    atomically, and a failure removes the directory if this call created it.
    """
    import shutil

    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}
    try:
        with atomic_path(path / WEIGHTS) as tmp:
            save_file(state, str(tmp))
        with atomic_path(path / CONFIG) as tmp:
            tmp.write_text(json.dumps({"denoiser": config, **(extra or {})}, indent=2))
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


def resolve_device(name: str) -> torch.device:
    """The ``--device`` of the CLIs: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def image_spec(denoiser: Any) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), label_dim)`` of a denoiser's images: from its network, or an oracle's means."""
    net = getattr(denoiser, "net", denoiser)
    label_dim = int(getattr(net, "label_dim", 0))
    if hasattr(net, "img_resolution"):
        side = int(net.img_resolution)
        return (int(net.in_channels), side, side), label_dim
    means = getattr(denoiser, "means", None)  # cm.oracle mixtures: [K, C, H, W]
    if means is not None:
        return tuple(int(n) for n in means.shape[1:]), label_dim
    raise UserError(
        "Cannot tell the image shape of this denoiser (no network with img_resolution, no "
        "oracle means): pass the shape explicitly, e.g. image_shape [3, 32, 32]."
    )


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` NCHW floats to uint8 NHWC (the ``arr_0`` layout of OpenAI's evaluator)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_npz(images: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None) -> Path:
    """Write uint8 NHWC ``images`` as ``arr_0`` (and class indices as ``arr_1``) to ``path``."""
    import numpy as np

    path = Path(path)
    arrays = {"arr_0": images.numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy()
    with atomic_open(path) as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write uint8 NHWC ``images`` as one PNG grid, upscaled to at least 32 px per image."""
    import math

    from PIL import Image
    from torchvision.utils import make_grid

    path = Path(path)
    x = images.permute(0, 3, 1, 2)
    scale = max(1, math.ceil(32 / x.shape[-1]))
    x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    nrow = nrow or math.ceil(math.sqrt(len(x)))
    grid = make_grid(x, nrow=nrow, padding=scale, pad_value=255).permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(grid[..., 0] if images.shape[-1] == 1 else grid).save(tmp, format="PNG")
    return path


def load_checkpoint(
    path: str | Path,
    ema: bool = True,
    map_location: str | torch.device = "cpu",
    trust_config: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the (EMA) denoiser of a ``cm fit`` checkpoint and return it with its hparams.

    Reads with ``weights_only=True``; the denoiser comes from the ``denoiser`` config that the
    CLI stored in the checkpoint's hyperparameters. The hyperparameters are data: their
    class_paths may only name cm's classes unless ``trust_config``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint '{path}' does not exist: pass the .ckpt written by cm fit."
        )
    ckpt = load_weights_only(path, map_location)
    hparams = dict(ckpt.get("hyper_parameters", {})) if isinstance(ckpt, dict) else {}
    config = hparams.get("denoiser")
    if not isinstance(config, dict) or "class_path" not in config:
        raise UserError(
            f"'{path}' holds no denoiser config: checkpoints written by `cm fit` have one; "
            "for a module built in Python use cm.io.export with the constructor config."
        )
    check_config(hparams, path, trust_config)  # the sampler too, which cm sample builds
    denoiser = build(config, path, trust_config)
    state = ckpt["state_dict"]
    prefix = (
        "ema_denoiser."
        if ema and any(k.startswith("ema_denoiser.") for k in state)
        else ("denoiser.")
    )
    denoiser.load_state_dict(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    )
    return denoiser.eval(), hparams


def load_any(
    path: str | Path, ema: bool = True, trust_config: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """A denoiser from a ``.ckpt`` file or an exported directory, with its hparams (may be {})."""
    path = Path(path)
    if path.is_dir():
        denoiser = load(path, trust_config=trust_config)
        config = read_export_config(path)
        check_config(config, path / CONFIG, trust_config)  # the sampler too
        return denoiser, config
    return load_checkpoint(path, ema, trust_config=trust_config)


def _published(path: Path, format: Format) -> str:
    """Where a published checkpoint named like ``path`` is downloaded from ('' if unknown)."""
    name = path.name
    if re.fullmatch(r"(edm|cd|ct)_(imagenet64|bedroom256|cat256)\w*\.pt", name):
        return f" (published at https://openaipublic.blob.core.windows.net/consistency/{name})"
    if re.fullmatch(r"\d+(x\d+_diffusion\w*|_\d+_upsampler)\.pt", name):
        return (
            f" (published at https://openaipublic.blob.core.windows.net/diffusion/jul-2021/{name})"
        )
    match format:
        case "openai" | "openai_legacy":
            return " (published by openai/consistency_models and openai/guided-diffusion)"
        case "edm":
            return " (extract it from NVlabs/edm's network-snapshot-*.pkl as cm.io describes)"
        case _:
            return ""


def read_config(path: str | Path) -> dict[str, Any]:
    """A denoiser ``{"class_path", "init_args"}`` config from a YAML or JSON file.

    A file with a top-level ``denoiser`` key (an export's ``config.json``) works too.
    """
    import yaml

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
        path: an exported directory, a ``cm fit`` ``.ckpt``, or a foreign ``.pt``/
            ``.safetensors`` state dict.
        denoiser: for foreign formats, the architecture to load into: a module, a
            ``class_path``/``init_args`` dict, or a YAML/JSON file holding one. Ignored for cm.
        format: ``cm`` (export or ``.ckpt``); ``openai`` (consistency_models, and
            guided-diffusion trained with ``--use_new_attention_order True``); ``openai_legacy``
            (guided-diffusion's default legacy attention: its 128 and 256 px models); ``edm``
            (EDM ``SongUNet`` into ``NCSNpp``); ``auto``: cm for a directory or ``.ckpt``.
        ema: use the EMA weights of a ``.ckpt``.
        trust_config: build any class that an export's ``config.json`` or a ``.ckpt``'s
            hyperparameters name (the user's opt-in, ``--trust_config``); by default only
            cm's classes (``cm.trust``). A ``denoiser`` passed here is the caller's, trusted.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"'{path}' does not exist: expected an exported denoiser directory ({WEIGHTS} + "
            f"{CONFIG}), a .ckpt written by cm fit, or a .pt/.safetensors state dict"
            f"{_published(path, format)}."
        )
    if format == "auto":
        if not (path.is_dir() or path.suffix == ".ckpt"):
            raise UserError(
                f"Cannot tell the format of '{path}': pass format openai, openai_legacy or edm "
                "(with the denoiser architecture) for a published checkpoint."
            )
        format = "cm"
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
    net.load_state_dict(_convert(read_state_dict(path), net, format))
    return denoiser.eval(), ({"denoiser": config} if config else {})


def _convert(state: dict[str, Tensor], net: nn.Module, format: Format) -> dict[str, Tensor]:
    """Remap a foreign ``state`` onto ``net`` by the key map of ``format`` (``cm.convert``)."""
    match format:
        case "openai" | "openai_legacy" if isinstance(net, ADMUNet):
            order = "heads_first" if format == "openai_legacy" else "qkv_first"
            return convert_openai(state, net, order)
        case "edm" if isinstance(net, NCSNpp):
            return convert_edm(state, net)
        case _:
            wanted = "cm.networks.NCSNpp" if format == "edm" else "cm.networks.ADMUNet"
            raise UserError(
                f"Format {format!r} loads into {wanted}, but the denoiser's network is a "
                f"{type(net).__name__}: fix the denoiser config or the format."
            )


class PretrainedDenoiser(nn.Module):
    """A frozen eval-mode teacher from disk (Song et al. 2023, CD; Salimans & Ho 2022, PD).

    The loaded module is held outside ``_modules``, so it is invisible to ``state_dict()``,
    ``parameters()``, DDP and the EMA: a teacher never goes into training checkpoints, and
    resuming rebuilds it from ``path``. ``_apply`` still moves it (``.to(device)``, ``.cuda()``,
    dtype casts), ``train()`` keeps it in eval mode, and other attributes (``net``, ``sigmas``,
    ``predict``, ``learned_variance``, ...) fall through to it.

    Args:
        path: an exported directory, a ``cm fit`` ``.ckpt``, or a foreign checkpoint file.
        denoiser: the architecture for ``openai``/``openai_legacy``/``edm`` files (in YAML a
            ``class_path``/``init_args`` object, e.g. ``configs/teachers/*.yaml``).
        format: see ``load_denoiser``; ``auto`` handles directories and ``.ckpt`` files.
        ema: use the EMA weights of a ``.ckpt``.
        trust_config: build any class named in the teacher's ``config.json`` or ``.ckpt``
            hyperparameters; by default only cm's classes (the file is data, see README's
            Security section). Set it only for a teacher file you trust.
    """

    def __init__(
        self,
        path: str,
        denoiser: nn.Module | None = None,
        format: Format = "auto",
        ema: bool = True,
        trust_config: bool = False,
    ) -> None:
        super().__init__()
        self.path, self.format, self.ema = str(path), format, ema
        module, _ = load_denoiser(path, denoiser, format, ema, trust_config)
        # A plain list: nn.Module does not register what it holds.
        self._held = [module.requires_grad_(False).eval()]
        super().train(False)

    @property
    def module(self) -> nn.Module:
        """The loaded denoiser."""
        return self._held[0]

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """``D(x; sigma)`` of the loaded denoiser."""
        return self._held[0](x, sigma, labels)

    def train(self, mode: bool = True) -> "PretrainedDenoiser":
        """Stay in eval mode whatever ``mode`` (dropout off, as the teacher was sampled)."""
        self._held[0].eval()
        return super().train(False)

    def _apply(self, fn: Any, recurse: bool = True) -> "PretrainedDenoiser":
        self._held[0]._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            held = self.__dict__.get("_held")
            if not held or name.startswith("__"):
                raise
            return getattr(held[0], name)

    def __deepcopy__(self, memo: dict[int, Any]) -> "PretrainedDenoiser":
        # A copy (e.g. of an objective) shares the frozen teacher instead of duplicating it.
        new = type(self).__new__(type(self))
        nn.Module.__init__(new)
        new.path, new.format, new.ema, new._held = self.path, self.format, self.ema, self._held
        new.training = False
        return new

    def extra_repr(self) -> str:
        """Where the teacher came from."""
        return f"path={self.path!r}, format={self.format!r}, ema={self.ema}"


def load_predictor(
    path: str | Path, map_location: str | torch.device = "cpu", trust_config: bool = False
) -> nn.Module:
    """The trained ``AMEDPredictor`` of an AMED ``cm fit`` checkpoint (eval mode).

    It carries the grid, base solver and AFS setting it was trained for (``predictor.grid()``).
    Its config is data: only cm's classes unless ``trust_config``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"AMED predictor '{path}' does not exist: pass the .ckpt written by "
            "cm fit --config configs/amed_*.yaml."
        )
    ckpt = load_weights_only(path, map_location)
    hparams = dict(ckpt.get("hyper_parameters", {})) if isinstance(ckpt, dict) else {}
    config = hparams.get("predictor")
    if not isinstance(config, dict) or "class_path" not in config:
        raise UserError(
            f"'{path}' holds no AMED predictor: train one with cm fit --config "
            "configs/amed_*.yaml and pass its .ckpt."
        )
    predictor = build(config, path, trust_config)
    prefix = "predictor."
    predictor.load_state_dict(
        {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    )
    return predictor.eval()
