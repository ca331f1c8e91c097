"""``cm export``: the (EMA) denoiser of a checkpoint as a cm export or a diffusers folder.

``--format cm`` writes ``model.safetensors`` + ``config.json`` (``cm.checkpoint.export``);
``--format diffusers`` a ``ConsistencyModelPipeline`` folder for an ADM consistency model, or
the ``unet/`` folder of a Stable Diffusion student (``cm.diffusers_io``). Both carry a model
card (``README.md``): the run's config, its training steps, the metrics it logged and the
command that reproduces it. ``--push_to_hub OWNER/NAME`` then uploads the folder
(``cm.hub.push_folder``).
"""

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from jsonargparse import ArgumentParser

from cm.checkpoint import CONFIG, WEIGHTS, export, load_checkpoint
from cm.commands.options import add_ckpt_path_argument, add_overwrite_argument, add_trust_option
from cm.diffusers_io import CARD, export_pipeline, export_sd_unet
from cm.diffusers_layout import INDEX, UNET
from cm.files import check_output_dir
from cm.hub import push_folder
from cm.networks.stable_diffusion import StableDiffusionDenoiser
from cm.sharded import is_sharded, read_meta

TRAINING_CONFIG = "training_config.yaml"  # the run's full config.yaml, copied next to the card


def main(args: Sequence[str]) -> Path:
    """``cm export``: write the (EMA) denoiser of a checkpoint, with a model card."""
    p = ArgumentParser(
        exit_on_error=False,
        prog="cm export",
        description="Export a bare denoiser from a checkpoint.",
    )
    add_ckpt_path_argument(p, True, "A .ckpt written by cm fit.")
    p.add_argument(
        "--out",
        type=str,
        required=True,
        help="Output directory (not the checkpoint's; an existing export only with --overwrite).",
    )
    p.add_argument("--ema", type=bool, default=True, help="Export the EMA weights when present.")
    p.add_argument(
        "--format",
        type=Literal["cm", "diffusers"],
        default="cm",
        help="cm: model.safetensors + config.json (cm sample, teachers); diffusers: a "
        "ConsistencyModelPipeline folder (ADM consistency models) or the unet/ folder of a "
        "Stable Diffusion student.",
    )
    p.add_argument(
        "--push_to_hub",
        type=str | None,
        default=None,
        help="Upload the export to this Hugging Face Hub model repository (OWNER/NAME) after "
        "writing it; needs a token with write access (hf auth login or HF_TOKEN).",
    )
    p.add_argument("--private", type=bool, default=False, help="Create the Hub repository private.")
    add_overwrite_argument(p)
    add_trust_option(p)
    cfg = p.parse_args(list(args))
    # Before reading the checkpoint: never into its folder, never over an export unasked.
    ckpt = Path(cfg.ckpt_path)
    names = (WEIGHTS, CONFIG) if cfg.format == "cm" else (INDEX, UNET)
    check_output_dir(cfg.out, (*names, CARD, TRAINING_CONFIG), [ckpt], [ckpt.parent], cfg.overwrite)
    denoiser, hparams = load_checkpoint(cfg.ckpt_path, cfg.ema, trust_config=cfg.trust_config)
    run = run_info(ckpt)
    files = {TRAINING_CONFIG: run["config"]} if run["config"] else {}
    sampler = hparams.get("sampler") or {}
    if cfg.format == "cm":
        extra = {"sampler": sampler} if sampler else None
        card = {CARD: model_card(hparams, run, "cm", cfg.ema)}
        out = export(denoiser, cfg.out, hparams["denoiser"], extra, {**card, **files})
    elif isinstance(denoiser, StableDiffusionDenoiser):
        card = model_card(hparams, run, "diffusers-sd", cfg.ema)
        out = export_sd_unet(denoiser, cfg.out, card, files)
    else:
        sigma_max = float(sampler.get("init_args", {}).get("sigma_max", 80.0))
        card = model_card(hparams, run, "diffusers", cfg.ema)
        out = export_pipeline(denoiser, cfg.out, sigma_max, card, files)
    print(f"Exported denoiser ({cfg.format}) to {out}")
    if cfg.push_to_hub:
        print(f"Pushed to {push_folder(out, cfg.push_to_hub, private=cfg.private)}")
    return out


def run_info(ckpt: Path) -> dict[str, Any]:
    """What a model card tells about the run of ``ckpt``: steps, logged metrics, config."""
    if is_sharded(ckpt):  # cm.training.FSDP's checkpoint directory: step and callbacks
        state = read_meta(ckpt)
    else:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    info: dict[str, Any] = {
        "file": ckpt.name,
        "step": int(state.get("global_step", 0)),
        "epoch": int(state.get("epoch", 0)),
        "metrics": {},
        "config": "",
    }
    for name, value in (state.get("callbacks") or {}).items():
        if name.startswith("ModelCheckpoint") and value.get("monitor"):
            score = value.get("best_model_score")
            if score is not None:
                info["metrics"][f"best {value['monitor']}"] = float(score)
    run = ckpt.parent.parent  # <run>/checkpoints/<name>.ckpt; the loggers write into <run>
    config = run / "config.yaml"
    if config.is_file():
        info["config"] = config.read_text()
    for file in sorted(run.glob("**/metrics.csv")):
        info["metrics"].update(_last_values(file))
    return info


def _last_values(file: Path) -> dict[str, float]:
    """The last logged value of every metric column of a Lightning ``metrics.csv``."""
    last: dict[str, float] = {}
    with open(file, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key in ("step", "epoch") or not value:
                    continue
                try:
                    last[key] = float(value)
                except ValueError:
                    continue
    return {k: v for k, v in last.items() if math.isfinite(v)}


def model_card(hparams: dict[str, Any], run: dict[str, Any], kind: str, ema: bool) -> str:
    """The ``README.md`` of an export: what it is, how it was trained, how to use it."""
    denoiser = hparams.get("denoiser", {})
    objective = (hparams.get("objective") or {}).get("class_path", "unknown")
    net = denoiser.get("init_args", {}).get("net", {}) if isinstance(denoiser, dict) else {}
    consistency = "Consistency" in f"{denoiser.get('class_path', '')} {objective}"
    tags = ["cm", "consistency-models" if consistency else "diffusion"]
    library = "cm" if kind == "cm" else "diffusers"
    front = {
        "library_name": library,
        "tags": [*tags, *(["diffusers"] if library == "diffusers" else [])],
        "pipeline_tag": "text-to-image"
        if kind == "diffusers-sd"
        else "unconditional-image-generation",
    }
    metrics = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(run["metrics"].items()))
    reproduce = (
        f"cm fit --config {TRAINING_CONFIG}"
        if run["config"]
        else "(no config.yaml was found next to the checkpoint's run folder)"
    )
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {denoiser.get('class_path', 'denoiser')} around {net.get('class_path', 'a network')}",
        "",
        f"Trained with cm ({objective}), exported by `cm export "
        f"--format {'cm' if kind == 'cm' else 'diffusers'}` from `{run['file']}` "
        f"({'EMA' if ema else 'raw'} weights).",
        "",
        "## Training",
        "",
        f"- Steps: {run['step']} (epoch {run['epoch']}).",
        f"- Objective: `{objective}`.",
        f"- Config: `{TRAINING_CONFIG}` (the run's full config)."
        if run["config"]
        else "- Config: the denoiser config below (the run's config.yaml was not found).",
        "",
        "### Metrics logged during training (last values)",
        "",
        "| metric | value |\n|---|---|\n" + metrics if metrics else "None were logged.",
        "",
        "### Reproduce",
        "",
        f"```\n{reproduce}\n```",
        "",
        "## Use",
        "",
        f"```python\n{_usage(kind)}\n```",
        "",
        "## Denoiser config",
        "",
        f"```yaml\n{yaml.safe_dump({'denoiser': denoiser}, sort_keys=False).strip()}\n```",
        "",
    ]
    return "\n".join(lines)


def _usage(kind: str) -> str:
    """The code snippet of the model card."""
    match kind:
        case "diffusers":
            return (
                "from diffusers import ConsistencyModelPipeline\n\n"
                'pipe = ConsistencyModelPipeline.from_pretrained("PATH_OR_HUB_ID")\n'
                "image = pipe(num_inference_steps=1).images[0]  # class_labels=... if conditional"
            )
        case "diffusers-sd":
            return (
                "from diffusers import DDIMScheduler, StableDiffusionPipeline, "
                "UNet2DConditionModel\n\n"
                'unet = UNet2DConditionModel.from_pretrained("PATH_OR_HUB_ID", subfolder="unet")\n'
                'pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/'
                'stable-diffusion-v1-5", unet=unet)\n'
                "# one step from the last trained timestep (999), as Diffusion2GAN samples\n"
                "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, "
                'timestep_spacing="trailing")\n'
                'image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0)'
                ".images[0]"
            )
        case _:
            return (
                "# shell: cm sample --ckpt_path PATH --num 64\n"
                "from cm.checkpoint import load\n\n"
                'denoiser = load("PATH")  # D(x, sigma, labels); a teacher: '
                "cm.teacher.PretrainedDenoiser"
            )


export_main = main  # the name cm.cli had
