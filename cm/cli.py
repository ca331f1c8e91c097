"""``cm``: LightningCLI (fit/validate/test/predict) plus sample, export, data and bench."""

import importlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI

from cm.io import Format

EXTRA_COMMANDS = """extra subcommands:
  sample   generate images from a checkpoint or exported denoiser (cm sample --help)
  export   write a bare denoiser (safetensors + config.json) from a checkpoint (cm export --help)
  data     inspect a dataset on disk: image count, shape, labels, preview grid (cm data --help)
  bench    solvers: RMSE vs NFE of every solver (and AMED predictors), table + plot
  edit     zero-shot inpaint/colorize/superres/sdedit/denoise/interpolate (cm edit -h)
  eval     FID/IS/KID/precision/recall of a samples .npz against reference statistics (cm eval -h)
  weights  check or fetch the pretrained weights cm uses (Inception, VGG, CLIP) (cm weights -h)
"""


class CMCLI(LightningCLI):
    """LightningCLI in subclass mode: any LightningModule/DataModule named in the YAML."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102 - Lightning hook
        parser.set_defaults({"trainer.max_steps": 1000})


def lightning_main(args: Sequence[str] | None) -> CMCLI:
    """Run a Lightning subcommand (fit, validate, test, predict); None reads ``sys.argv``."""
    return CMCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": EXTRA_COMMANDS},
        auto_configure_optimizers=False,
    )


def sample_parser() -> ArgumentParser:
    """Arguments of ``cm sample``."""
    p = ArgumentParser(prog="cm sample", description="Generate images from a trained denoiser.")
    p.add_argument(
        "--ckpt_path",
        type=str,
        required=True,
        help="A .ckpt from cm fit, an exported denoiser directory, or a published "
        ".pt/.safetensors state dict (with --format and --denoiser).",
    )
    p.add_argument(
        "--num", type=int, default=256, help="Number of images (seeds seed..seed+num-1)."
    )
    p.add_argument("--seed", type=int, default=0, help="First seed.")
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
    p.add_argument("--batch_size", type=int, default=256, help="Images per forward pass.")
    p.add_argument("--ema", type=bool, default=True, help="Use the EMA weights when present.")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:1 or auto.")
    p.add_argument("--out", type=str, default="samples.npz", help="Output .npz (arr_0 NHWC).")
    p.add_argument("--grid", type=str | None, default=None, help="Also write a PNG grid here.")
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
        "e.g. configs/teachers/openai_edm_imagenet64.yaml.",
    )
    return p


def sample_main(args: Sequence[str]) -> Path:
    """``cm sample``: seeded, batch-size-independent generation to an npz (and a PNG grid)."""
    from cm.io import image_spec, load_denoiser, save_grid, save_npz, to_uint8

    cfg = sample_parser().parse_args(list(args))
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    denoiser, hparams = load_denoiser(cfg.ckpt_path, cfg.denoiser, cfg.format, cfg.ema)
    denoiser = denoiser.to(device)
    shape, label_dim = image_spec(denoiser)
    if cfg.cfg_scale is not None:
        from cm.guidance import cfg as classifier_free

        denoiser = classifier_free(denoiser, cfg.cfg_scale)
    sampler = _sampler_from(hparams.get("sampler"))
    if cfg.solver is not None:
        sampler.solver = _import_solver(cfg.solver)
    if cfg.steps is not None:
        sampler.num_steps, sampler.sigmas = cfg.steps, None
    if cfg.sigmas is not None:
        sampler.sigmas = cfg.sigmas
    if cfg.predictor is not None or cfg.solver in AMED_SOLVERS:
        _use_predictor(sampler, cfg, device)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num))
    x, labels = sampler.generate(
        denoiser, seeds, shape, label_dim, cfg.class_label, cfg.batch_size, device
    )
    images = to_uint8(x)
    out = save_npz(images, cfg.out, labels)
    print(f"Wrote {len(images)} samples to {out}")
    if cfg.grid:
        print(f"Wrote grid to {save_grid(images[:100], cfg.grid, nrow=10)}")
    return out


AMED_SOLVERS = ("amed", "amed_plugin", "cm.solvers.amed", "cm.solvers.amed_plugin")


def _use_predictor(sampler, cfg, device: str) -> None:
    """Point ``sampler`` at AMED with the predictor of ``--predictor`` and its training grid."""
    from functools import partial

    from cm.io import load_predictor
    from cm.solvers import amed, amed_plugin

    if cfg.predictor is None:
        raise ValueError(f"--solver {cfg.solver} needs --predictor: a trained AMED .ckpt.")
    if cfg.steps is not None or cfg.sigmas is not None:
        raise ValueError(
            "An AMED predictor samples on the grid it was trained for: drop --steps/--sigmas "
            "(train another predictor for another NFE)."
        )
    if cfg.solver is not None and cfg.solver not in AMED_SOLVERS:
        raise ValueError(f"--predictor is for --solver amed or amed_plugin, not {cfg.solver}.")
    predictor = load_predictor(cfg.predictor).to(device)
    fn = amed if predictor.solver == "amed" else amed_plugin
    sampler.solver = partial(fn, predictor=predictor)
    sampler.sigmas = predictor.grid().tolist()
    print(f"AMED ({predictor.solver}): {predictor.nfe} NFE on {predictor.num_steps} time points")


def _import_solver(path: str):
    """The solver function at an import path like ``cm.solvers.heun``, or a name like ``heun``."""
    path = path if "." in path else f"cm.solvers.{path}"
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(
            f"--solver {path!r} is not an importable function: use e.g. cm.solvers.heun or "
            "cm.solvers.consistency.multistep."
        ) from None


def _sampler_from(config: dict | None):
    """A ``Sampler`` from the checkpoint's ``sampler`` hparam (None: one-step defaults)."""
    from cm.solvers.sampling import Sampler

    if not config:
        return Sampler()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--sampler", type=Sampler)
    cfg = parser.parse_object({"sampler": config})
    return parser.instantiate_classes(cfg).sampler


def export_main(args: Sequence[str]) -> Path:
    """``cm export``: write the (EMA) denoiser of a checkpoint as safetensors + config.json."""
    from cm.io import export, load_checkpoint

    p = ArgumentParser(prog="cm export", description="Export a bare denoiser from a checkpoint.")
    p.add_argument("--ckpt_path", type=str, required=True, help="A .ckpt written by cm fit.")
    p.add_argument("--out", type=str, required=True, help="Output directory.")
    p.add_argument("--ema", type=bool, default=True, help="Export the EMA weights when present.")
    cfg = p.parse_args(list(args))
    denoiser, hparams = load_checkpoint(cfg.ckpt_path, cfg.ema)
    out = export(denoiser, cfg.out, hparams["denoiser"])
    if hparams.get("sampler"):
        import json

        config = json.loads((out / "config.json").read_text())
        config["sampler"] = hparams["sampler"]
        (out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"Exported denoiser to {out}")
    return out


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``cm`` command; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    # Lightning-internal noise: its own pytree deprecation, and the empty validation list that an
    # ImageDataModule without a validation split returns on purpose.
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero.*")
    argv = list(sys.argv[1:] if args is None else args)
    match argv:
        case ["sample", *rest]:
            sample_main(rest)
        case ["export", *rest]:
            export_main(rest)
        case ["data", *rest]:
            from cm.data.inspect import data_main

            data_main(rest)
        case ["bench", "solvers", *rest]:
            from cm.bench import bench_main

            bench_main(rest)
        case ["edit", *rest]:
            from cm.editing.cli import edit_main

            edit_main(rest)
        case ["weights", *rest]:
            from cm.weights import weights_main

            weights_main(rest)
        case ["eval", *rest]:
            from cm.metrics.evaluate import eval_main
            from cm.training.datamodule import config_batches

            eval_main(rest, config_batches)
        case ["bench", *_]:
            raise ValueError("cm bench has one benchmark: cm bench solvers (see its --help).")
        case _:
            # LightningCLI reads sys.argv itself; passing it again triggers a warning.
            lightning_main(None if args is None else argv)
