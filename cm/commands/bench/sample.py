"""``cm bench sample``: images/s of 1-step sampling vs N-step Heun at the same batch."""

import sys
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jsonargparse import ArgumentParser

from cm.bench.report import markdown_rows, write_rows
from cm.bench.sampling import time_sampling
from cm.checkpoint import load_denoiser
from cm.commands.bench.config import config_files, fit_cli, split_argv
from cm.commands.options import (
    add_ckpt_path_argument,
    add_device_argument,
    add_overwrite_argument,
    add_trust_option,
    resolve_device,
)
from cm.errors import UserError
from cm.files import check_output
from cm.protocols import image_spec
from cm.training.bench import device_name
from cm.training.speed import CompileMode, prepare


def parser() -> ArgumentParser:
    """Options of ``cm bench sample`` (other arguments build the model as ``cm fit`` does)."""
    p = ArgumentParser(
        prog="cm bench sample",
        description="Images/s of 1-step sampling vs N-step Heun at the same batch, for the "
        "denoiser of a checkpoint (--ckpt_path) or of a config (--config ..., random weights).",
    )
    add_ckpt_path_argument(p, False, "A .ckpt or export dir.")
    p.add_argument("--batch_size", type=int, default=64, help="Images per solver call.")
    p.add_argument("--heun_steps", type=int, default=40, help="Heun steps (2n - 1 NFE; 40: 79).")
    p.add_argument("--warmup", type=int, default=2, help="Untimed calls of each solver.")
    p.add_argument("--repeats", type=int, default=5, help="Timed calls of each solver.")
    p.add_argument("--precision", type=Literal["32", "bf16"], default="32", help="bf16: autocast.")
    p.add_argument(
        "--compile", type=CompileMode | None, default=None, help="torch.compile mode of the net."
    )
    p.add_argument("--backend", type=str, default="inductor", help="torch.compile backend.")
    p.add_argument("--channels_last", type=bool, default=False, help="NHWC network.")
    add_device_argument(p)
    p.add_argument("--out", type=str, default="bench/sample.csv", help="CSV file written.")
    add_overwrite_argument(p)
    add_trust_option(p)
    return p


def main(argv: Sequence[str]) -> list[dict[str, Any]]:
    """``cm bench sample``: 1-step vs N-step rows as a Markdown table and a CSV file."""
    own, args = split_argv(argv, {f"--{a.dest}" for a in parser()._actions})
    opts = parser().parse_args(own)
    if (opts.ckpt_path is None) == (not args):
        raise UserError("cm bench sample needs either --ckpt_path or --config (not both).")
    check_output(opts.out, [opts.ckpt_path, *config_files(args)], opts.overwrite)
    if opts.ckpt_path is not None:
        denoiser, _ = load_denoiser(opts.ckpt_path, None, "auto", True, opts.trust_config)
    else:
        denoiser = fit_cli(args).model.eval_denoiser
    device = resolve_device(opts.device)
    denoiser = denoiser.to(device).eval().requires_grad_(False)
    shape, label_dim = image_spec(denoiser)
    net = getattr(denoiser, "net", denoiser)
    prepare(net, opts.compile is not None, opts.compile, backend=opts.backend,
            channels_last=opts.channels_last)  # fmt: skip
    autocast = torch.bfloat16 if opts.precision == "bf16" else None
    rows = time_sampling(
        denoiser, shape, label_dim, opts.batch_size, opts.heun_steps,
        warmup=opts.warmup, repeats=opts.repeats, autocast=autocast,
    )  # fmt: skip
    for row in rows:
        row["device"] = device_name(device)
        row["precision"], row["compile"] = opts.precision, opts.compile or "eager"
    print(markdown_rows(rows))
    print(f"Wrote {write_rows(rows, opts.out)}", file=sys.stderr)
    return rows
