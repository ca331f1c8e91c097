"""``cm``: LightningCLI (fit/validate/test/predict) plus sample, export, data and bench."""

import os
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from jsonargparse import ArgumentParser
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from cm.errors import UserError
from cm.sample import sample_main, sample_parser  # noqa: F401 - public entry points
from cm.training.callbacks import existing_paths, remove_new, run_outputs

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

    def instantiate_trainer(self, **kwargs):  # noqa: D102 - LightningCLI hook
        trainer = super().instantiate_trainer(**kwargs)
        # Lightning puts checkpoints under the logger's version_N/, which a second `cm fit` (a new
        # version) never sees: `--ckpt_path last` after a preemption would silently start over.
        # A ModelCheckpoint without dirpath writes to <default_root_dir>/checkpoints instead.
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(Path(trainer.default_root_dir).resolve() / "checkpoints")
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Refuse a bad ``--ckpt_path`` before Lightning reads hyperparameters from it."""
        if subcommand := self.config.get("subcommand"):
            _check_ckpt_path(self.config[subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``subcommand``; if it fails before the first step, remove the dirs it created.

        Only paths that did not exist before (run dir, ``version_N``, the ``config.yaml`` dir,
        checkpoint dir, offline W&B run) are removed, and only by rank 0 and before any
        optimizer step, so no checkpoint or pre-existing folder is ever deleted.
        """
        roots = [Path(self.trainer.default_root_dir)]
        roots += [Path(lg.save_dir) for lg in self.trainer.loggers if lg.save_dir is not None]
        before = existing_paths(roots)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if self.trainer.global_step == 0 and self.trainer.global_rank == 0:
                outputs = run_outputs(self.trainer, roots)
                for logger in self.trainer.loggers:  # an open W&B run would write on
                    if isinstance(logger, WandbLogger) and logger._experiment is not None:
                        logger.experiment.finish(exit_code=1)
                remove_new(outputs, before, roots)
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
    from cm.io import export, load_checkpoint

    p = ArgumentParser(
        exit_on_error=False,
        prog="cm export",
        description="Export a bare denoiser from a checkpoint.",
    )
    p.add_argument("--ckpt_path", type=str, required=True, help="A .ckpt written by cm fit.")
    p.add_argument("--out", type=str, required=True, help="Output directory.")
    p.add_argument("--ema", type=bool, default=True, help="Export the EMA weights when present.")
    cfg = p.parse_args(list(args))
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise FileExistsError(f"Output '{cfg.out}' is a file: pass a directory for the export.")
    denoiser, hparams = load_checkpoint(cfg.ckpt_path, cfg.ema)
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
        if os.environ.get("CM_DEBUG", "") not in ("", "0") or not is_user_error(e):
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
    """The message of ``e`` on one line (an ``OSError`` from the system names its file)."""
    if isinstance(e, OSError) and e.strerror and e.filename and len(e.args) == 2:
        return f"{e.strerror}: '{e.filename}' (check the path and its permissions)."
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, ArgumentError):
        text = f"{text.rstrip('.')} (see --help)."
    return text


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
