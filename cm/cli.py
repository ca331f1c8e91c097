"""``cm``: the dispatcher of every subcommand (one module each in ``cm.commands``).

``fit``/``validate``/``test``/``predict`` are the LightningCLI (``cm.commands.fit.CMCLI``); the
others are plain parsers. A command's module is imported only when it runs, so ``cm --help``
(and a typo) answers without loading torch or Lightning: this is the one place in cm where an
import sits inside a function.
"""

import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from cm.commands.errors import (  # noqa: F401 - cm.cli names used by tests and scripts
    _is_wandb_usage_error,
    is_user_error,
    one_line,
    parse_sentence,
)
from cm.errors import UserError

# name: (module with main(args), the one line of `cm --help`)
COMMANDS = {
    "fit": ("cm.commands.fit", "train a model from a YAML config (LightningCLI)"),
    "validate": ("cm.commands.fit", "run the validation loop of a config and checkpoint"),
    "test": ("cm.commands.fit", "run the test loop of a config and checkpoint"),
    "predict": ("cm.commands.fit", "sample or write ODE pairs through a config's writer"),
    "sample": ("cm.commands.sample", "generate images from a checkpoint or exported denoiser"),
    "export": ("cm.commands.export", "write a bare denoiser (safetensors + config.json)"),
    "consolidate": ("cm.commands.consolidate", "a sharded (FSDP) checkpoint as one .ckpt file"),
    "data": ("cm.commands.data", "inspect a dataset on disk: count, shape, labels, preview"),
    "eval": ("cm.commands.eval", "FID/IS/KID/precision/recall of samples; reference statistics"),
    "edit": ("cm.commands.edit", "zero-shot inpaint/colorize/superres/sdedit/denoise/interpolate"),
    "weights": ("cm.commands.weights", "check or fetch the pretrained weights cm uses"),
    "bench": ("cm.commands.bench", "benchmarks: solvers, train, sample (cm bench --help)"),
}
LIGHTNING = ("fit", "validate", "test", "predict")
BENCHMARKS = {
    "solvers": ("cm.commands.bench.solvers", "RMSE vs NFE of every solver: table and plot"),
    "train": ("cm.commands.bench.train", "images/s, FLOPs, MFU of a config's training step"),
    "sample": ("cm.commands.bench.sample", "1-step vs N-step sampling images/s"),
}
# Names that lived in cm.cli before the commands moved to cm.commands (loaded on first use).
_MOVED = {
    "CMCLI": "cm.commands.fit",
    "lightning_main": "cm.commands.fit",
    "_check_ckpt_path": "cm.commands.fit",
    "export_main": "cm.commands.export",
    "sample_main": "cm.commands.sample",
    "sample_parser": "cm.commands.sample",
}


def menu(prog: str, commands: dict[str, tuple[str, str]], usage: str) -> str:
    """The help text of a command list: usage, then one line per subcommand."""
    width = max(map(len, commands))
    lines = [f"  {name:{width}s}  {help}" for name, (_, help) in commands.items()]
    return (
        f"usage: {usage}\n\nsubcommands:\n"
        + "\n".join(lines)
        + (f"\n\n`{prog} SUBCOMMAND --help` shows the options of one.")
    )


MAIN_USAGE = "cm SUBCOMMAND [options]   (cm fit --config configs/quickstart.yaml)"
BENCH_USAGE = "cm bench BENCHMARK [options]"


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``cm`` command; ``args`` replaces ``sys.argv[1:]`` (for tests).

    A user error (see ``is_user_error``) ends as one ``error: ...`` line on stderr and exit code
    2, like an argparse error; any other exception is a bug and keeps its traceback.
    ``CM_DEBUG=1`` shows the traceback of user errors too.
    """
    try:
        run(args)
    except Exception as e:
        user = is_user_error(e) or _is_wandb_usage_error(e)  # W&B: no API key, bad entity
        if os.environ.get("CM_DEBUG", "") not in ("", "0") or not user:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run(args: Sequence[str] | None = None) -> None:
    """Run one ``cm`` subcommand; errors propagate (``main`` reports them)."""
    # Lightning-internal noise: its own pytree deprecation, and the empty validation list that an
    # ImageDataModule without a validation split returns on purpose.
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero.*")
    argv = list(sys.argv[1:] if args is None else args)
    match argv:
        case [] | ["-h" | "--help", *_]:
            print(menu("cm", COMMANDS, MAIN_USAGE))
        case ["bench"] | ["bench", "-h" | "--help", *_]:
            print(menu("cm bench", BENCHMARKS, BENCH_USAGE))
        case ["bench", name, *rest] if name in BENCHMARKS:
            importlib.import_module(BENCHMARKS[name][0]).main(rest)
        case ["bench", name, *_]:
            names = f"{', '.join(list(BENCHMARKS)[:-1])} or {list(BENCHMARKS)[-1]}"
            raise UserError(f"Unknown benchmark {name!r}: use cm bench {names} (each has --help).")
        case [name, *_] if name in LIGHTNING or name.startswith("-"):
            # LightningCLI reads sys.argv itself; passing it again triggers a warning.
            lightning = importlib.import_module("cm.commands.fit").lightning_main
            lightning(None if args is None else argv)
        case [name, *rest] if name in COMMANDS:
            importlib.import_module(COMMANDS[name][0]).main(rest)
        case [name, *_]:
            raise UserError(f"Unknown command {name!r}: use cm {' | '.join(COMMANDS)} (cm --help).")


def __getattr__(name: str) -> Any:
    """``cm.cli.CMCLI`` and the other names that moved to ``cm.commands``, loaded on use."""
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'cm.cli' has no attribute {name!r}")
