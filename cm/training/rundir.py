"""Run directories: one exclusive ``version_N`` per run, ``--ckpt_path last``, failed-run cleanup.

Lightning's CSV/TensorBoard loggers pick ``version_N`` by listing the directory, so two runs
started together in one root may pick the same one and overwrite each other's ``last.ckpt``.
``RunDir.prepare`` claims the version directory with an exclusive ``mkdir`` on global rank 0
instead, and puts the checkpoints of every ``ModelCheckpoint`` without ``dirpath`` in
``<run dir>/checkpoints``. ``--ckpt_path last`` is resolved here to one run's checkpoint (the
resumed run then writes into that same run dir), and a run that fails before its first step
removes exactly what it created: its claimed run dir, its W&B run files, its ``config.yaml``
and the directories it had to create, if they are empty (another process may be using them).
"""

import csv
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from cm.errors import UserError


def claim_version(parent: Path) -> Path:
    """Create ``parent/version_N`` for the first free ``N`` (exclusive ``mkdir``) and return it."""
    parent.mkdir(parents=True, exist_ok=True)
    taken = [p.name.removeprefix("version_") for p in parent.glob("version_*")]
    n = max((int(v) + 1 for v in taken if v.isdigit()), default=0)
    while True:
        try:
            (parent / f"version_{n}").mkdir()  # atomic: exactly one process creates it
            return parent / f"version_{n}"
        except FileExistsError:
            n += 1


def newest_last(directory: Path) -> Path | None:
    """The newest ``last*.ckpt`` in ``directory`` (``last-v1.ckpt`` after a name clash), if any."""
    found = list(directory.glob("last*.ckpt")) if directory.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _base(trainer: L.Trainer, logger) -> Path:
    """Where ``logger`` puts its run dirs: ``<save_dir>/<name>`` (W&B: ``<save_dir>/<project>``)."""
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")


def _fixed_version(logger) -> str | None:
    """The run dir name the user chose for ``logger`` (``version``/W&B ``id``), if any."""
    match logger:
        case CSVLogger() | TensorBoardLogger() if logger._version is not None:
            v = logger._version
            return v if isinstance(v, str) else f"version_{v}"
        case WandbLogger():
            return logger._id or os.environ.get("WANDB_RUN_ID")
    return None


def resolve_last(trainer: L.Trainer) -> Path:
    """The checkpoint ``--ckpt_path last`` means: this run's newest ``last*.ckpt``.

    With a ``ModelCheckpoint`` ``dirpath`` set, that directory; else the run dirs under
    ``default_root_dir`` and the loggers' ``<save_dir>/<name>`` (``<dir>/checkpoints`` and
    ``<dir>/*/checkpoints``), narrowed to the logger's ``version``/W&B id when one is set.
    Several candidates or none are a ``UserError``: never a guess, never a silent fresh start.
    """
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    fixed = [Path(c.dirpath) for c in callbacks if c.dirpath is not None]
    searched = fixed
    if fixed:
        dirs = fixed
    else:
        bases = {Path(trainer.default_root_dir)} | {_base(trainer, lg) for lg in trainer.loggers}
        searched = sorted(bases)
        dirs = [d for b in sorted(bases) for d in (b / "checkpoints", *b.glob("*/checkpoints"))]
        own = [_fixed_version(lg) for lg in trainer.loggers[:1]]
        if own and own[0] is not None:
            dirs = [d for d in dirs if d.parent.name == own[0]]
    found = sorted({p.absolute() for d in dirs if (p := newest_last(d)) is not None})
    if not found:
        where = " or ".join(str(d) for d in searched)
        raise UserError(
            f"--ckpt_path last: nothing to resume in {where}: no last.ckpt there (a first start "
            "takes no --ckpt_path; or pass the .ckpt to resume)."
        )
    if len(found) > 1:
        raise UserError(
            f"--ckpt_path last is ambiguous: {len(found)} runs have a last.ckpt: "
            f"{', '.join(map(str, found))}; pass the one to resume as --ckpt_path."
        )
    return found[0]


@dataclass
class RunDir:
    """What one run created: its claimed run dir, the dirs it had to make, its config file."""

    claimed: Path | None = None
    new_dirs: list[Path] = field(default_factory=list)
    config_existed: bool = True

    @classmethod
    def prepare(cls, trainer: L.Trainer, resume: Path | None) -> "RunDir":
        """Claim this run's dir (rank 0) or adopt ``resume``'s; point checkpoints into it."""
        run = cls()
        if trainer.global_rank != 0:
            return run  # Lightning broadcasts rank 0's log and checkpoint dirs
        logger = trainer.loggers[0] if trainer.loggers else None
        base = Path(trainer.default_root_dir) if logger is None else _base(trainer, logger)
        watched = [Path(trainer.default_root_dir), base]
        watched += [Path(lg.save_dir) for lg in trainer.loggers if lg.save_dir is not None]
        watched += [Path(lg.save_dir) / "wandb" for lg in trainer.loggers if lg.save_dir]
        for path in {p.absolute() for p in watched}:
            run.new_dirs += [p for p in (path, *path.parents) if not p.exists()]
        if resume is not None and resume.parent.name == "checkpoints":
            run_dir = resume.parent.parent  # continue the resumed run in its own dir
            _adopt(logger, run_dir, base)
        elif isinstance(logger, WandbLogger):
            run_dir = None  # its dir is named by the (unique) W&B run id
        elif isinstance(logger, CSVLogger | TensorBoardLogger) and logger._version is not None:
            run_dir = Path(logger.log_dir)  # a version the user chose: theirs to share
        else:
            run_dir = run.claimed = claim_version(base)
            if logger is not None:
                logger._version = run_dir.name
        if run_dir is not None:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                    callback.dirpath = str(run_dir.absolute() / "checkpoints")
        log_dir = trainer.log_dir or trainer.default_root_dir
        run.config_existed = (Path(log_dir) / "config.yaml").exists()
        return run

    def remove(self, trainer: L.Trainer) -> None:
        """Delete what this run created (call on rank 0 when it failed before its first step)."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                run_files = Path(logger.experiment.dir).parent  # wandb/<this run's own dir>
                logger.experiment.finish(exit_code=1)  # an open W&B run would write on
                shutil.rmtree(run_files, ignore_errors=True)
                _unlink_links_into(run_files)
                self.new_dirs.append(_base(trainer, logger).absolute() / str(logger.version))
        if self.claimed is not None:
            shutil.rmtree(self.claimed, ignore_errors=True)
        for callback in trainer.callbacks:
            path = Path(trainer.log_dir or trainer.default_root_dir) / "config.yaml"
            saved = isinstance(callback, SaveConfigCallback) and callback.already_saved
            if saved and not self.config_existed and path.is_file():
                path.unlink()
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                self.new_dirs.append(Path(callback.dirpath).absolute())
        for path in sorted(set(self.new_dirs), key=lambda p: len(p.parts), reverse=True):
            try:
                path.rmdir()  # only if empty: a concurrent run may have written into it
            except OSError:
                pass


def _unlink_links_into(run_files: Path) -> None:
    """Remove W&B's ``latest-run``/``debug*.log`` links beside ``run_files`` that point into it."""
    for link in run_files.parent.iterdir() if run_files.parent.is_dir() else ():
        if link.is_symlink() and (run_files.parent / os.readlink(link)).absolute().is_relative_to(
            run_files.absolute()
        ):
            link.unlink()


def _adopt(logger, run_dir: Path, base: Path) -> None:
    """Make ``logger`` write into the resumed ``run_dir`` (when it is one of its run dirs)."""
    if logger is None or run_dir.parent.absolute() != base.absolute():
        return
    match logger:
        case WandbLogger():
            logger._id = logger._wandb_init["id"] = run_dir.name
            logger._wandb_init["resume"] = "allow"
        case CSVLogger():
            logger._version = run_dir.name
            _keep_metrics(logger)
        case TensorBoardLogger():
            logger._version = run_dir.name


def _keep_metrics(logger: CSVLogger) -> None:
    """Append to the resumed run's ``metrics.csv`` (Lightning's CSV writer would delete it)."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    aside = path.with_name(".metrics.csv.resumed")
    path.rename(aside)
    writer = logger.experiment  # created now, with no metrics.csv to delete
    aside.rename(path)
    with path.open(newline="") as file:
        writer.metrics_keys = next(csv.reader(file), [])
