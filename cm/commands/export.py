"""``cm export``: the (EMA) denoiser of a checkpoint as ``model.safetensors`` + ``config.json``."""

from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ArgumentParser

from cm.checkpoint import CONFIG, WEIGHTS, export, load_checkpoint
from cm.commands.options import add_ckpt_path_argument, add_overwrite_argument, add_trust_option
from cm.files import check_output_dir


def main(args: Sequence[str]) -> Path:
    """``cm export``: write the (EMA) denoiser of a checkpoint as safetensors + config.json."""
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
    add_overwrite_argument(p)
    add_trust_option(p)
    cfg = p.parse_args(list(args))
    # Before reading the checkpoint: never into its folder, never over an export unasked.
    ckpt = Path(cfg.ckpt_path)
    check_output_dir(cfg.out, (WEIGHTS, CONFIG), [ckpt], [ckpt.parent], cfg.overwrite)
    denoiser, hparams = load_checkpoint(cfg.ckpt_path, cfg.ema, trust_config=cfg.trust_config)
    sampler = {"sampler": hparams["sampler"]} if hparams.get("sampler") else None
    out = export(denoiser, cfg.out, hparams["denoiser"], sampler)
    print(f"Exported denoiser to {out}")
    return out


export_main = main  # the name cm.cli had
