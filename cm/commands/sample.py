"""``cm sample``: seeded, batch-size-independent generation from a checkpoint or export."""

from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ArgumentParser

from cm.checkpoint import load_denoiser
from cm.commands.options import (
    add_ckpt_path_argument,
    add_device_argument,
    add_overwrite_argument,
    add_seed_argument,
    add_trust_option,
    resolve_device,
)
from cm.convert import Format
from cm.data.captions import prompt_contexts
from cm.errors import UserError
from cm.files import check_output, same_file
from cm.guidance import cfg as classifier_free
from cm.protocols import image_spec
from cm.sample import AMED_SOLVERS, import_solver, sampler_from, use_predictor
from cm.sample_files import save_grid, save_npz, to_uint8
from cm.solvers.consistency import multistep, onestep
from cm.solvers.sampling import generate_text_or_latent


def sample_parser() -> ArgumentParser:
    """Arguments of ``cm sample``."""
    p = ArgumentParser(
        exit_on_error=False,
        prog="cm sample",
        description="Generate images from a trained denoiser.",
    )
    add_ckpt_path_argument(
        p,
        False,
        "A .ckpt from cm fit, an exported denoiser directory, a diffusers folder or its Hugging "
        "Face Hub id, or a published .pt/.safetensors state dict (with --format and --denoiser).",
    )
    p.add_argument(
        "--num", type=int, default=256, help="Number of images (seeds seed..seed+num-1)."
    )
    add_seed_argument(p)
    p.add_argument(
        "--steps",
        type=int | None,
        default=None,
        help="Solver steps on the Karras grid; default: the checkpoint's sampler.",
    )
    p.add_argument(
        "--solver",
        type=str | None,
        default=None,
        help="A cm.solvers name (heun, dpmpp_2m, ipndm, amed, ...) or the import path of a "
        "solver, e.g. cm.solvers.consistency.multistep; default: the checkpoint's sampler.",
    )
    p.add_argument(
        "--predictor",
        type=str | None,
        default=None,
        help="A trained AMED predictor (.ckpt of cm fit --config configs/amed_*.yaml): samples "
        "with AMED-Solver or AMED-Plugin on the grid it was trained for.",
    )
    p.add_argument(
        "--sigmas",
        type=list[float] | None,
        default=None,
        help="Explicit decreasing sigma grid, e.g. [80.0,0.661] for 2-step CM.",
    )
    p.add_argument(
        "--class_label",
        type=int | None,
        default=None,
        help="Generate only this class (default: classes cycle with the seed).",
    )
    p.add_argument(
        "--prompt",
        type=str | None,
        default=None,
        help="Text-to-image models: the prompt of every image, or @FILE (.txt, one per line, or "
        ".jsonl captions; seed s takes prompt s % #prompts). Needs --text_encoder.",
    )
    p.add_argument(
        "--text_encoder",
        type=str | None,
        default=None,
        help="The training YAML of a text model (its data.init_args.text_encoder is used), or a "
        "file with the encoder's class_path/init_args.",
    )
    p.add_argument("--batch_size", type=int, default=256, help="Images per forward pass.")
    p.add_argument("--ema", type=bool, default=True, help="Use the EMA weights when present.")
    add_device_argument(p)
    p.add_argument(
        "--out", type=str, default="samples.npz", help="Output .npz (arr_0 NHWC), at this path."
    )
    p.add_argument("--grid", type=str | None, default=None, help="Also write a PNG grid here.")
    add_overwrite_argument(p)
    p.add_argument(
        "--cfg_scale",
        type=float | None,
        default=None,
        help="Classifier-free guidance scale s (1: conditional, 0: unconditional); the model "
        "must have been trained with label dropout (p_uncond).",
    )
    p.add_argument(
        "--format",
        type=Format,
        default="auto",
        help="Checkpoint layout: cm (export dir or .ckpt; what auto picks), openai "
        "(consistency_models, guided-diffusion 64x64), openai_legacy (guided-diffusion 128/256), "
        "edm (state dict extracted from an EDM snapshot).",
    )
    p.add_argument(
        "--denoiser",
        type=str | None,
        default=None,
        help="YAML/JSON file with the denoiser class_path/init_args for openai/edm checkpoints, "
        "e.g. configs/teachers/openai_edm_imagenet64.yaml; without --ckpt_path, a diffusers "
        "folder or Hub id (openai/diffusers-cd_imagenet64_l2) to sample.",
    )
    add_trust_option(p)
    return p


def main(args: Sequence[str]) -> Path:
    """``cm sample``: seeded, batch-size-independent generation to an npz (and a PNG grid)."""
    cfg = sample_parser().parse_args(list(args))
    if cfg.ckpt_path is None:  # `cm sample --denoiser OWNER/NAME`: a whole diffusers model
        if cfg.denoiser is None or Path(cfg.denoiser).suffix.lower() in (".yaml", ".yml", ".json"):
            raise UserError(
                "cm sample needs --ckpt_path (a checkpoint, an export, a diffusers folder or Hub "
                "id), or --denoiser naming a diffusers folder or Hub id."
            )
        cfg.ckpt_path, cfg.denoiser = cfg.denoiser, None
    check_outputs(cfg)
    device = resolve_device(cfg.device)
    denoiser, hparams = load_denoiser(
        cfg.ckpt_path, cfg.denoiser, cfg.format, cfg.ema, cfg.trust_config
    )
    denoiser = denoiser.to(device)
    shape, label_dim = image_spec(denoiser)
    _check_sample_args(cfg, label_dim)
    if cfg.cfg_scale is not None:
        denoiser = classifier_free(denoiser, cfg.cfg_scale)
    sampler = sampler_from(hparams.get("sampler"))
    if cfg.solver is not None:
        sampler.solver = import_solver(cfg.solver, cfg.trust_config)
    if cfg.steps is not None:
        sampler.num_steps, sampler.sigmas = cfg.steps, None
    if cfg.sigmas is not None:
        sampler.sigmas = cfg.sigmas
    if (
        cfg.solver is None
        and sampler.solver is onestep
        and int((sampler.grid(denoiser) > 0).sum()) > 1
    ):
        # A consistency checkpoint asked for several steps samples them (Song et al. 2023, Alg. 1)
        # instead of silently using only the first sigma.
        sampler.solver = multistep
    if cfg.predictor is not None or cfg.solver in AMED_SOLVERS:
        _use_predictor(sampler, cfg, device)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num))
    if getattr(getattr(denoiser, "net", None), "context_dim", 0):  # latents: decoded in both
        x, labels = _generate_text_or_latent(cfg, sampler, denoiser, seeds, shape, device), None
    else:
        x, labels = sampler.generate(
            denoiser, seeds, shape, label_dim, cfg.class_label, cfg.batch_size, device
        )
    images = to_uint8(x)
    out = save_npz(images, cfg.out, labels)
    print(f"Wrote {len(images)} samples to {out}")
    if cfg.grid:
        print(f"Wrote grid to {save_grid(images[:100], cfg.grid, nrow=10)}")
    return out


def check_outputs(cfg) -> None:
    """Refuse ``--out``/``--grid`` onto an input, onto each other or an existing file, up front."""
    prompts = cfg.prompt[1:] if cfg.prompt and cfg.prompt.startswith("@") else None
    inputs = (cfg.ckpt_path, cfg.predictor, cfg.denoiser, cfg.text_encoder, prompts)
    check_output(cfg.out, inputs, cfg.overwrite)
    if cfg.grid is not None:
        if same_file(cfg.grid, cfg.out):
            raise UserError(f"--grid '{cfg.grid}' is the --out file: give the grid its own name.")
        check_output(cfg.grid, inputs, cfg.overwrite, option="--grid")


def _generate_text_or_latent(cfg, sampler, denoiser, seeds, shape, device):
    """Images of a text-conditioned (``--prompt``) and/or latent (VAE-decoded) denoiser."""
    contexts = None
    if cfg.prompt is not None or cfg.text_encoder is not None:
        if cfg.prompt is None or cfg.text_encoder is None:
            raise UserError("A text-to-image model needs both --prompt and --text_encoder.")
        contexts = prompt_contexts(cfg.text_encoder, cfg.prompt)
    elif getattr(getattr(denoiser, "net", None), "context_dim", 0):
        raise UserError(
            "This model is text-conditioned: give --prompt TEXT (or @FILE) and --text_encoder "
            "with its training YAML."
        )
    return generate_text_or_latent(
        sampler, denoiser, seeds, shape, contexts, cfg.batch_size, device
    )


def _check_sample_args(cfg, label_dim: int) -> None:
    """Refuse counts, grids and labels that cannot be sampled, before any generation."""
    for name in ("num", "batch_size", "steps"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be a positive integer, got {value}.")
    sigmas = cfg.sigmas
    pairs = zip(sigmas[:-1], sigmas[1:], strict=True) if sigmas else ()
    if sigmas is not None and (not sigmas or min(sigmas) < 0 or any(a <= b for a, b in pairs)):
        raise UserError(
            f"--sigmas must be non-negative and strictly decreasing, got {sigmas}: e.g. "
            "[80.0,0.661] for 2-step consistency sampling."
        )
    if cfg.class_label is not None and not 0 <= cfg.class_label < label_dim:
        raise UserError(
            f"--class_label {cfg.class_label} is out of range: this model has "
            + (f"classes 0..{label_dim - 1}." if label_dim else "no classes (drop the option).")
        )


def _use_predictor(sampler, cfg, device: str) -> None:
    """Point ``sampler`` at AMED with the predictor of ``--predictor`` and its training grid."""
    if cfg.predictor is None:
        raise UserError(f"--solver {cfg.solver} needs --predictor: a trained AMED .ckpt.")
    if cfg.steps is not None or cfg.sigmas is not None:
        raise UserError(
            "An AMED predictor samples on the grid it was trained for: drop --steps/--sigmas "
            "(train another predictor for another NFE)."
        )
    if cfg.solver is not None and cfg.solver not in AMED_SOLVERS:
        raise UserError(f"--predictor is for --solver amed or amed_plugin, not {cfg.solver}.")
    use_predictor(sampler, cfg.predictor, device, cfg.trust_config)


sample_main = main  # the name cm.cli had
