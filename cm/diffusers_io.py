"""Diffusers pipeline folders on disk: ``cm export --format diffusers`` and loading them back.

A consistency model (``ConsistencyPrecond`` around an ``ADMUNet``) is written as the
``ConsistencyModelPipeline`` folder that ``openai/diffusers-cd_imagenet64_l2`` is (see
``cm.diffusers_layout``); a Diffusion2GAN student on Stable Diffusion as the ``unet/`` folder
of ``UNet2DConditionModel`` that replaces SD 1.5's in its pipeline; an unconditional DDPM
model (``VPPrecond``) as a ``DDIMPipeline``. Reading goes the other way for ADM-style
``UNet2DModel`` folders: ``CMStochasticIterativeScheduler`` becomes ``ConsistencyPrecond``
(Song et al. 2023, App. C: ``c_noise = 250 ln(sigma + 1e-44)``), ``DDIMScheduler`` and
``DDPMScheduler`` become ``VPPrecond`` (Ho et al. 2020), an EDM-preconditioned
``EDMEulerScheduler`` becomes ``EDMPrecond`` (Karras et al. 2022, Table 1).

Folders are data: JSON configs and safetensors weights, read by cm itself; pickled
``diffusion_pytorch_model.bin`` weights are refused. ``diffusers`` is never imported here.
"""

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cm.convert import network_of
from cm.diffusers_layout import (
    DIFFUSERS_VERSION,
    INDEX,
    UNET,
    UNET_CONFIG,
    adm_init_args,
    from_diffusers,
    to_diffusers,
    unet_config,
)
from cm.errors import UserError
from cm.files import atomic_path
from cm.networks.adm import ADMUNet
from cm.networks.stable_diffusion import StableDiffusionDenoiser
from cm.precond import ConsistencyPrecond, EDMPrecond, VPPrecond

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER, SCHEDULER_CONFIG, CARD = "scheduler", "scheduler_config.json", "README.md"
CM_NOISE_SCALE = 250.0  # CMStochasticIterativeScheduler.sigma_to_t: 1000 * 0.25 * ln(sigma)
PRECONDS = {
    "cm.precond.ConsistencyPrecond": ConsistencyPrecond,
    "cm.precond.EDMPrecond": EDMPrecond,
    "cm.precond.VPPrecond": VPPrecond,
}
PIPELINES = {
    "CMStochasticIterativeScheduler": "ConsistencyModelPipeline",
    "DDIMScheduler": "DDIMPipeline",
}


def scheduler_config(denoiser: nn.Module, sigma_max: float) -> dict[str, Any]:
    """The diffusers scheduler config equal to ``denoiser``'s preconditioning.

    A ``ConsistencyPrecond`` (noise_scale 250) is ``CMStochasticIterativeScheduler``; a
    ``VPPrecond`` is ``DDIMScheduler`` with its betas, unclipped ``x0`` and ``leading`` timesteps
    (``DDIMPipeline``'s deterministic DDIM is Euler on the PF-ODE, cm's ``ddim``).
    """
    if type(denoiser) is VPPrecond:
        if getattr(network_of(denoiser), "label_dim", 0):
            raise UserError(
                "diffusers' DDIMPipeline samples unconditional models only; this DDPM model is "
                "class-conditional: export it with --format cm."
            )
        T = denoiser.num_timesteps
        linear = {"beta_schedule": "linear", "beta_start": 0.1 / T, "beta_end": 20.0 / T}
        betas = linear if denoiser.schedule == "linear" else {"beta_schedule": "squaredcos_cap_v2"}
        return {
            "_class_name": "DDIMScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": T,
            **betas,
            "clip_sample": False,  # cm's solvers do not clamp x0 between steps
            "set_alpha_to_one": True,  # the last step lands on x0 (sigma = 0)
            "steps_offset": 0,
            "prediction_type": "epsilon",
            "timestep_spacing": "leading",
        }
    if not isinstance(denoiser, ConsistencyPrecond):
        raise UserError(
            f"A {type(denoiser).__name__} has no diffusers pipeline with the same "
            "preconditioning: consistency models (ConsistencyPrecond) export as a "
            "ConsistencyModelPipeline and DDPM models (VPPrecond) as a DDIMPipeline; export it "
            "with --format cm."
        )
    if not math.isclose(denoiser.noise_scale, CM_NOISE_SCALE):
        raise UserError(
            f"This consistency model uses c_noise = {denoiser.noise_scale} ln(sigma), but "
            "diffusers' CMStochasticIterativeScheduler fixes c_noise = 250 ln(sigma): only "
            "models trained with noise_scale 250 export to diffusers (use --format cm)."
        )
    return {
        "_class_name": "CMStochasticIterativeScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": 40,
        "sigma_min": float(denoiser.sigma_min),
        "sigma_max": float(sigma_max),
        "sigma_data": float(denoiser.sigma_data),
        "s_noise": 1.0,
        "rho": 7.0,
        "clip_denoised": True,
    }


def precond_config(scheduler: Mapping[str, Any], net: dict[str, Any], source: str) -> dict:
    """The cm denoiser config (class_path/init_args) of a scheduler config and a network."""
    name = scheduler.get("_class_name")
    sigma_data = float(scheduler.get("sigma_data", 0.5))
    if name == "CMStochasticIterativeScheduler":
        init = {"sigma_data": sigma_data, "sigma_min": float(scheduler.get("sigma_min", 0.002))}
        return {
            "class_path": "cm.precond.ConsistencyPrecond",
            "init_args": {"net": net, **init, "noise_scale": CM_NOISE_SCALE},
        }
    if name in ("DDIMScheduler", "DDPMScheduler"):
        return {
            "class_path": "cm.precond.VPPrecond",
            "init_args": {"net": net, **vp_init_args(scheduler, source)},
        }
    edm = scheduler.get("precondition_type", "edm") == "edm"
    if name in ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler") and edm:
        if scheduler.get("prediction_type", "epsilon") != "epsilon":
            raise UserError(
                f"'{source}' predicts {scheduler['prediction_type']}; cm's EDMPrecond reads "
                "EDM's F (prediction_type epsilon)."
            )
        return {
            "class_path": "cm.precond.EDMPrecond",
            "init_args": {"net": net, "sigma_data": sigma_data, "noise_scale": 0.25},
        }
    raise UserError(
        f"'{source}' uses the scheduler {name!r}; cm reads CMStochasticIterativeScheduler "
        "(consistency models), DDIMScheduler/DDPMScheduler (DDPM) and EDM-preconditioned "
        "EDMEulerScheduler folders."
    )


def vp_init_args(scheduler: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``VPPrecond`` init_args of a DDPM/DDIM scheduler config, if cm builds the same betas."""
    T = int(scheduler.get("num_train_timesteps", 1000))
    kind = scheduler.get("beta_schedule", "linear")
    start, end = float(scheduler.get("beta_start", 1e-4)), float(scheduler.get("beta_end", 0.02))
    linear = kind == "linear" and math.isclose(start, 0.1 / T) and math.isclose(end, 20.0 / T)
    if scheduler.get("prediction_type", "epsilon") != "epsilon" or scheduler.get("trained_betas"):
        raise UserError(f"'{source}' is not an epsilon-prediction model with standard betas.")
    if not linear and kind != "squaredcos_cap_v2":
        raise UserError(
            f"'{source}' uses {kind} betas from {start} to {end}; cm's VPPrecond builds Ho et "
            "al.'s linear betas (1e-4 to 0.02 at T = 1000) and the cosine squaredcos_cap_v2."
        )
    return {"schedule": "linear" if linear else "cosine", "num_timesteps": T}


def sampler_config(scheduler: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Sampler`` of a scheduler: one consistency step, 50 DDIM steps or EDM's 18 Heun."""
    init: dict[str, Any] = {
        "sigma_min": float(scheduler.get("sigma_min", 0.002)),
        "sigma_max": float(scheduler.get("sigma_max", 80.0)),
    }
    name = scheduler.get("_class_name")
    if name == "CMStochasticIterativeScheduler":
        init.update(solver="cm.solvers.consistency.onestep", num_steps=1)
    elif name in ("DDIMScheduler", "DDPMScheduler"):  # DDIMPipeline's default: 50 DDIM steps
        init = {"solver": "cm.solvers.ddim", "schedule": "vp", "num_steps": 50}
    else:
        init.update(solver="cm.solvers.heun", num_steps=18)
    return {"class_path": "cm.solvers.sampling.Sampler", "init_args": init}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or one UserError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"'{path}' is missing: the diffusers folder is incomplete.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"'{path}' is not valid JSON ({e}): re-save the folder.") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' does not hold a JSON object: re-save the folder.")
    return data


# -- writing ----------------------------------------------------------------------------------


def export_pipeline(
    denoiser: nn.Module,
    path: str | Path,
    sigma_max: float = 80.0,
    card: str = "",
    files: Mapping[str, str] | None = None,
) -> Path:
    """Write an ADM model as a diffusers pipeline folder at ``path`` (``scheduler_config``).

    Args:
        denoiser: a ``ConsistencyPrecond`` (noise_scale 250; a ``ConsistencyModelPipeline``) or
            an unconditional ``VPPrecond`` (a ``DDIMPipeline``) around an ``ADMUNet``.
        path: the output folder.
        sigma_max: the pipeline's starting noise level (the model's sampler's).
        card: the model card, written as ``README.md``.
        files: further text files to write (name -> text), e.g. the training config.

    Returns:
        ``path``. Every file is written atomically; a failure removes a folder this call made.
    """
    scheduler = scheduler_config(denoiser, sigma_max)  # refuses non-consistency models first
    net = network_of(denoiser)
    config = unet_config(net)
    index = {
        "_class_name": PIPELINES[scheduler["_class_name"]],
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "unet": ["diffusers", "UNet2DModel"],
    }
    jsons = {
        INDEX: index,
        f"{UNET}/{UNET_CONFIG}": config,
        f"{SCHEDULER}/{SCHEDULER_CONFIG}": scheduler,
    }
    return _write(path, jsons, {f"{UNET}/{UNET_WEIGHTS}": to_diffusers(net)}, card, files)


def export_sd_unet(
    denoiser: nn.Module, path: str | Path, card: str = "", files: Mapping[str, str] | None = None
) -> Path:
    """Write a Stable Diffusion student's U-Net as a diffusers ``unet/`` folder (+ model card).

    The folder replaces SD 1.5's ``unet`` (``UNet2DConditionModel.from_pretrained(path,
    subfolder="unet")``); Diffusion2GAN's generator (Kang et al. 2024) samples in one step from
    the last trained timestep.
    """
    if not isinstance(denoiser, StableDiffusionDenoiser):
        raise UserError(f"A {type(denoiser).__name__} is not a Stable Diffusion U-Net.")
    unet = denoiser.net.unet
    config = {
        "_class_name": type(unet).__name__,
        "_diffusers_version": DIFFUSERS_VERSION,
        **{k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    return _write(
        path, {f"{UNET}/{UNET_CONFIG}": config}, {f"{UNET}/{UNET_WEIGHTS}": state}, card, files
    )


def _write(
    path: str | Path,
    jsons: Mapping[str, Any],
    weights: Mapping[str, dict[str, Tensor]],
    card: str,
    files: Mapping[str, str] | None,
) -> Path:
    """Write JSON, safetensors and text files under ``path``, each atomically."""
    path = Path(path)
    created = not path.exists()
    texts = {**({CARD: card} if card else {}), **(files or {})}
    try:
        for name, tensors in weights.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path / name) as tmp:
                save_file(dict(tensors), str(tmp), metadata={"format": "pt"})
        for name, data in jsons.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path / name) as tmp:
                tmp.write_text(json.dumps(data, indent=2, default=list) + "\n")
        for name, text in texts.items():
            with atomic_path(path / name) as tmp:
                tmp.write_text(text)
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return path


# -- reading ----------------------------------------------------------------------------------


def load_pipeline(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """An ADM-style diffusers folder as a cm denoiser (eval mode) with its denoiser/sampler config.

    Args:
        path: a folder with ``unet/`` (``UNet2DModel``) and ``scheduler/`` (a
            ``CMStochasticIterativeScheduler`` or an EDM ``EDMEulerScheduler``), e.g. a Hub
            snapshot of ``openai/diffusers-cd_imagenet64_l2`` or a ``save_pretrained`` folder.
        map_location: where the weights are read to.
    """
    root = Path(path)
    config = read_json(root / UNET / UNET_CONFIG)
    kind = config.get("_class_name")
    if kind == "UNet2DConditionModel":
        raise UserError(
            f"'{root}' is a Stable Diffusion pipeline: use it through "
            f"cm.networks.StableDiffusionDenoiser (path: {root}), as configs/d2g_sd15.yaml does."
        )
    if kind != "UNet2DModel":
        raise UserError(f"'{root}' holds a {kind!r}; cm reads diffusers' UNet2DModel folders.")
    source = str(root / UNET / UNET_CONFIG)
    net_config = {"class_path": "cm.networks.ADMUNet", "init_args": adm_init_args(config, source)}
    scheduler = read_json(root / SCHEDULER / SCHEDULER_CONFIG)
    den_config = precond_config(scheduler, net_config, str(root / SCHEDULER / SCHEDULER_CONFIG))
    init = dict(den_config["init_args"])
    net = ADMUNet(**init.pop("net")["init_args"])
    net.load_state_dict(from_diffusers(_read_weights(root / UNET, map_location), net, str(root)))
    denoiser = PRECONDS[den_config["class_path"]](net, **init)
    return denoiser.eval(), {"denoiser": den_config, "sampler": sampler_config(scheduler)}


def _read_weights(folder: Path, map_location: str) -> dict[str, Tensor]:
    """The safetensors weights of a diffusers model folder (never a pickled ``.bin``)."""
    file = folder / UNET_WEIGHTS
    if not file.is_file():
        pickled = " (it has only pickled .bin weights, which cm does not read)"
        has_bin = (folder / "diffusion_pytorch_model.bin").is_file()
        raise FileNotFoundError(
            f"No {UNET_WEIGHTS} in '{folder}'{pickled if has_bin else ''}: re-save the model "
            "with save_pretrained(safe_serialization=True)."
        )
    try:
        return load_file(str(file), device=map_location)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"'{file}' is not a readable safetensors file ({e}).") from None
