"""``cm bench train``: images/s, step time, peak memory, FLOPs, TFLOP/s and MFU of a config.

The module and data module are built from the YAML exactly as ``cm fit`` builds them, and the
timed step is the real Lightning training step (``cm.training.bench``).
"""

import sys
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jsonargparse import ArgumentParser

from cm.bench.report import markdown_rows, write_rows
from cm.bench.sampling import measure_peak_tflops
from cm.commands.bench.config import config_files, fit_cli, split_argv
from cm.commands.options import add_overwrite_argument
from cm.errors import UserError
from cm.files import check_output
from cm.training.bench import run_timed
from cm.training.speed import Compile, CompileMode


def parser() -> ArgumentParser:
    """Options of ``cm bench train`` (every other argument goes to the ``cm fit`` parser)."""
    p = ArgumentParser(
        prog="cm bench train",
        description="Time the real training step of a config: images/s, step time, peak memory, "
        "FLOPs per step, TFLOP/s and MFU, eager and compiled. All other arguments (--config, "
        "--model..., --trainer..., --data...) are those of cm fit.",
    )
    p.add_argument("--warmup", type=int, default=5, help="Untimed steps first (>= 1).")
    p.add_argument("--steps", type=int, default=20, help="Timed (micro-batch) steps.")
    p.add_argument(
        "--compile",
        type=CompileMode | Literal["none"] | None,
        default=None,
        help="Also time the network under torch.compile with this mode; none: eager only "
        "(default: the mode of the config's cm.training.speed.Compile callback, if any).",
    )
    p.add_argument("--backend", type=str, default="inductor", help="torch.compile backend.")
    p.add_argument(
        "--channels_last",
        type=bool | None,
        default=None,
        help="NHWC network in both runs (default: as the config's Compile callback, else off).",
    )
    p.add_argument(
        "--peak_tflops",
        type=float | None,
        default=None,
        help="Device peak for MFU; default: measured bf16 matmul on CUDA, unknown (n/a) on CPU.",
    )
    p.add_argument(
        "--synthetic",
        type=bool,
        default=False,
        help="Random images of the data module's shape and batch instead of reading the data.",
    )
    p.add_argument("--out", type=str, default="bench/train.csv", help="CSV file written.")
    add_overwrite_argument(p)
    return p


def main(argv: Sequence[str]) -> list[dict[str, Any]]:
    """``cm bench train``: eager (and compiled) rows as a Markdown table and a CSV file."""
    own, args = split_argv(argv, {f"--{a.dest}" for a in parser()._actions})
    opts = parser().parse_args(own)
    if opts.steps < 1:
        raise UserError(f"--steps must be >= 1, got {opts.steps}.")
    check_output(opts.out, config_files(args), opts.overwrite)
    # The eager run's build also tells which Compile callback the config has; the compiled run
    # gets a fresh build (compilation is in place), made after the eager one is released.
    cli = fit_cli(args)
    configured = next(
        (c for c in cli.trainer_config.get("callbacks") or [] if isinstance(c, Compile)), None
    )
    channels_last = opts.channels_last
    if channels_last is None:
        channels_last = configured is not None and configured.channels_last
    mode = opts.compile or (configured.mode if configured is not None else None)
    mode = None if mode == "none" else mode
    rows = [run_timed(cli, opts, Compile(compile=False, channels_last=channels_last), True)]
    del cli
    if mode is not None:
        # The config's module list (e.g. CT's target network too), so both runs time its step.
        modules = configured.modules if configured is not None else None
        compiled = Compile(modules, mode, backend=opts.backend, channels_last=channels_last)
        rows.append(run_timed(fit_cli(args), opts, compiled, False))
    if rows[0] is None:  # not global rank 0
        return []
    peak, device = opts.peak_tflops, rows[0]["_device"]
    if peak is None and device.type == "cuda":
        peak = measure_peak_tflops(device, torch.bfloat16)
    flops = rows[0]["_flops"]
    for row in rows:
        seconds = row.pop("_seconds")
        row.pop("_flops"), row.pop("_device")
        row["tflop_per_step"] = flops / 1e12
        row["tflops_per_s"] = flops / seconds / 1e12
        row["peak_tflops"] = peak
        row["mfu"] = None if peak is None else row["tflops_per_s"] / peak
    if len(rows) == 2:
        rows[1]["speedup_vs_eager"] = rows[0]["step_ms_mean"] / rows[1]["step_ms_mean"]
        rows[0]["speedup_vs_eager"] = 1.0
    print(markdown_rows(rows))
    print(f"Wrote {write_rows(rows, opts.out)}", file=sys.stderr)
    return rows


train_main, train_parser = main, parser  # the names cm.training.bench had
