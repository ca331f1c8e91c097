"""``cm``: LightningCLI (fit/validate/test/predict) plus sample, export, data and bench."""

import os
import re
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from jsonargparse import ArgumentParser
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from cm.errors import UserError
from cm.files import add_overwrite_argument, check_output_dir
from cm.io import CONFIG, WEIGHTS, export, load_checkpoint, load_weights_only
from cm.sample import sample_main, sample_parser  # noqa: F401 - public entry points
from cm.training.overrides import compare
from cm.training.resilience import Preemption
from cm.training.rundir import RunDir, resolve_last
from cm.trust import add_trust_option, check_config

EXTRA_COMMANDS = """extra subcommands:
  sample   generate images from a checkpoint or exported denoiser (cm sample --help)
  export   write a bare denoiser (safetensors + config.json) from a checkpoint (cm export --help)
  data     inspect a dataset on disk: image count, shape, labels, preview grid (cm data --help)
  bench    solvers: RMSE vs NFE of every solver (and AMED predictors), table + plot;
           train: images/s, FLOPs, MFU, eager vs compiled; sample: 1-step vs N-step images/s
  edit     zero-shot inpaint/colorize/superres/sdedit/denoise/interpolate (cm edit -h)
  eval     FID/IS/KID/precision/recall of a samples .npz against reference statistics (cm eval -h)
  weights  check or fetch the pretrained weights cm uses (Inception, VGG, CLIP) (cm weights -h)
"""


class CMCLI(LightningCLI):
    """LightningCLI in subclass mode: any LightningModule/DataModule named in the YAML."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102 - Lightning hook
        parser.set_defaults({"trainer.max_steps": 1000})
        add_trust_option(parser)  # for the hyperparameters of --ckpt_path

    def instantiate_trainer(self, **kwargs):  # noqa: D102 - LightningCLI hook
        trainer = super().instantiate_trainer(**kwargs)
        # Preemption first among the callbacks (Lightning keeps ModelCheckpoints last): from its
        # step-boundary check on, a signal may cut the other callbacks' sampling short.
        trainer.callbacks.sort(key=lambda callback: not isinstance(callback, Preemption))
        config = self.config_init.get(self.subcommand) if self.subcommand else None
        resume = None
        if config is not None and config.get("ckpt_path") == "last":
            # Lightning's "last" looks in one directory and silently starts over when it is empty.
            resume = resolve_last(trainer)
            config["ckpt_path"] = str(resume)
        # An exclusive version_N per run: concurrent runs in one root never share a last.ckpt.
        self.run_dir = RunDir.prepare(trainer, resume if self.subcommand == "fit" else None)
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` and its hyperparameters, which are data, against the config.

        Lightning merges the checkpoint's hyperparameters over the model config, importing any
        class_path they name and silently replacing the user's overrides. Here they may only
        name cm's classes (``cm.trust``, unless ``--trust_config``), the user's config wins, the
        architecture must match the checkpoint's, and changed optimizer/scheduler arguments are
        applied to the restored states on ``fit`` (``cm.training.overrides``).
        """
        self.resume_overrides = None
        if not (subcommand := self.config.get("subcommand")):
            return
        config = self.config[subcommand]
        path = config.get("ckpt_path")
        _check_ckpt_path(path)
        if not path or not Path(path).is_file():
            return
        ckpt = load_weights_only(path)
        hparams = dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
        check_config(hparams, path, bool(config.get("trust_config")))
        model = config.get("model")
        model = model.as_dict() if hasattr(model, "as_dict") else dict(model or {})
        self.resume_overrides = compare(path, hparams, model)

    def before_fit(self) -> None:
        """Apply optimizer/scheduler overrides given beside ``--ckpt_path`` to its states."""
        if self.resume_overrides:
            self.trainer.callbacks.append(self.resume_overrides)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``subcommand``; if it fails before the first step, remove what this run created.

        That is this run's own ``version_N`` dir, W&B run files and ``config.yaml``, and the
        directories it had to create if they are empty (``RunDir.remove``), by rank 0 and before
        any optimizer step: nothing another process wrote, no checkpoint, is ever deleted.
        """
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if self.trainer.global_step == 0 and self.trainer.global_rank == 0:
                self.run_dir.remove(self.trainer)
            raise


def _check_ckpt_path(path: str | None) -> None:
    """Refuse a missing or truncated ``--ckpt_path`` before Lightning builds anything."""
    if path is None or path in ("last", "best", "hpc") or path.startswith("registry"):
        return
    if "://" in path:  # a remote checkpoint (s3://, gs://, ...): Lightning's fsspec reads it
        return
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"Checkpoint '{path}' does not exist: pass a .ckpt written by cm fit (or 'last')."
        )
    import zipfile

    try:  # torch.save writes a zip; a truncated one has no central directory at its end
        zipfile.ZipFile(path).close()
    except zipfile.BadZipFile:
        raise UserError(
            f"Checkpoint '{path}' is truncated or not a torch checkpoint: pass an intact .ckpt "
            "written by cm fit."
        ) from None


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
        # Parse errors raise, so that main() reports them on one line.
        parser_kwargs={
            "epilog": EXTRA_COMMANDS,
            "exit_on_error": False,
            **{c: {"exit_on_error": False} for c in ("fit", "validate", "test", "predict")},
        },
        auto_configure_optimizers=False,
    )


def export_main(args: Sequence[str]) -> Path:
    """``cm export``: write the (EMA) denoiser of a checkpoint as safetensors + config.json."""
    p = ArgumentParser(
        exit_on_error=False,
        prog="cm export",
        description="Export a bare denoiser from a checkpoint.",
    )
    p.add_argument("--ckpt_path", type=str, required=True, help="A .ckpt written by cm fit.")
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


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is the user's to fix: bad arguments/config, files, or one of cm's checks.

    That is: a ``cm.errors.UserError`` (raised where cm validates an input), a command-line or
    config parse error (argparse/jsonargparse), an ``OSError`` (missing, unreadable or unwritable
    files) or a Lightning ``MisconfigurationException``. Anything else, a ``ValueError`` from cm's
    own code included, is a bug and keeps its traceback.
    """
    if isinstance(e, UserError | ArgumentError | OSError | MisconfigurationException):
        return True
    if not isinstance(e, ValueError):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = "" if tb is None else tb.tb_frame.f_globals.get("__name__", "")
    return module.split(".")[0] == "jsonargparse"  # jsonargparse's own validation of a config


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (an ``OSError`` from the system names its file).

    A jsonargparse dump of Union alternatives is reduced to its option and innermost message
    (``parse_sentence``); Lightning's "no GPU" errors name the overrides that run on the CPU.
    """
    if isinstance(e, OSError) and e.strerror and e.filename and len(e.args) == 2:
        return f"{e.strerror}: '{e.filename}' (check the path and its permissions)."
    text = parse_sentence(str(e))
    if isinstance(e, MisconfigurationException) and re.search(_NO_GPU, text):
        return (
            f"{text.rstrip('!.')}: this config asks for a GPU; to run on the CPU add "
            "`--trainer.accelerator cpu --trainer.devices 1` (and, if they then fail, "
            "`--trainer.precision 32-true` and no Compile callback)."
        )
    if _is_wandb_usage_error(e):
        text = (
            f"W&B: {text.rstrip('.')} (`wandb login`); or set WANDB_MODE=offline, or pick another "
            "logger (e.g. --trainer.logger lightning.pytorch.loggers.CSVLogger)."
        )
    if isinstance(e, ArgumentError):
        text = f"{text.rstrip('.')} (see --help)."
    return text


_NO_GPU = r"No supported gpu backend found|can not run on your system since the accelerator"
# Lines of a jsonargparse Union dump that say nothing the user can act on: the structure, the
# None alternative of every `X | None`, the str alternative of an import path, the given value.
_DUMP_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
    "Expected a path but",
)


def parse_sentence(text: str) -> str:
    """The one meaningful sentence of a (jsonargparse) error message, on one line.

    jsonargparse reports a bad ``class_path`` or init argument, and any error raised while
    instantiating one, as a nested dump of every Union alternative it tried; the user needs the
    dotted option (``model.init_args.objective``), the class_path that failed and the innermost
    message. Other messages are returned with their whitespace collapsed.
    """
    if not text.lstrip().startswith(('Parser key "', _DUMP_NOISE[0])):
        return " ".join(text.split())
    option, class_path, leaves = "", None, []
    for raw in text.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or line.startswith(_DUMP_NOISE):
            continue
        if key := re.match(r'Parser key "([^"]+)":\s*(.*)', line):
            joint = ".init_args." if class_path else "."
            option = f"{option}{joint}{key[1]}" if option else key[1]
            class_path, line = None, key[2]
        elif path := re.fullmatch(r"Problem with given class_path '([^']+)':", line):
            class_path = path[1]
            continue
        if line and line not in leaves:
            leaves.append(line)
    if not leaves:
        return " ".join(text.split())
    message = " ".join(leaves)
    if class_path:
        message = f"class_path '{class_path}' cannot be used ({message.rstrip('.')})"
    return f"{option}: {message}" if option else message


def _is_wandb_usage_error(e: BaseException) -> bool:
    """W&B's own "no API key" and similar setup errors (wandb is imported only by its logger)."""
    kind = type(e)
    return kind.__module__.startswith("wandb") and kind.__name__ in (
        "UsageError",
        "AuthenticationError",
    )


def run(args: Sequence[str] | None = None) -> None:
    """Run one ``cm`` subcommand; errors propagate (``main`` reports them)."""
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
        case ["bench", "train", *rest]:
            from cm.training.bench import train_main

            train_main(rest)
        case ["bench", "sample", *rest]:
            from cm.training.bench import sample_main as bench_sample_main

            bench_sample_main(rest)
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
            raise UserError(
                "Unknown benchmark: use cm bench solvers, train or sample (each has --help)."
            )
        case _:
            # LightningCLI reads sys.argv itself; passing it again triggers a warning.
            lightning_main(None if args is None else argv)
