"""``cm fit``, ``validate``, ``test``, ``predict``: the LightningCLI (``CMCLI``) of cm.

Subclass mode for model and data (any LightningModule/DataModule named in the YAML), the trust
check of ``--ckpt_path`` hyperparameters, exclusive run directories and the clean-up of a run that
fails before its first step (issue 14).
"""

import zipfile
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

from cm.checkpoint import load_weights_only
from cm.errors import UserError
from cm.sharded import check_metadata, is_sharded, read_meta
from cm.training.overrides import compare
from cm.training.resilience import Preemption
from cm.training.rundir import RunDir, resolve_last
from cm.training.sharding import FSDP
from cm.trust import add_trust_option, check_config

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


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
        path = config.get("ckpt_path") if config is not None else None
        if path and is_sharded(path) and not isinstance(trainer.strategy, FSDP):
            raise UserError(
                f"'{path}' is a sharded checkpoint (a directory written under cm.training.FSDP): "
                "resume it under the same strategy (--config configs/strategies/fsdp.yaml), or "
                f"write it as one file with `cm consolidate {path} --out FILE.ckpt` and pass that."
            )
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
        if path and is_sharded(path):  # cm.training.FSDP's checkpoint directory
            ckpt = read_meta(path)
        elif not path or not Path(path).is_file():
            return
        else:
            ckpt = load_weights_only(path)
        hparams = dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
        check_config(hparams, path, bool(config.get("trust_config")))
        model = config.get("model")
        model = model.as_dict() if hasattr(model, "as_dict") else dict(model or {})
        self.resume_overrides = compare(path, hparams, model)

    def before_fit(self) -> None:
        """Refuse what cannot train sharded; apply overrides given beside ``--ckpt_path``.

        Under ``cm.training.FSDP`` the module's ``check_sharding`` runs here, before the other
        ranks start, so that a refusal is one error line rather than a rank's crash.
        """
        if isinstance(self.trainer.strategy, FSDP) and hasattr(self.model, "check_sharding"):
            self.model.check_sharding()
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
    if is_sharded(path):  # a directory of shards (cm.training.FSDP): its index is checked
        check_metadata(path)
        return
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"Checkpoint '{path}' does not exist: pass a .ckpt written by cm fit (or 'last')."
        )
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
            "exit_on_error": False,
            **{c: {"exit_on_error": False} for c in LIGHTNING_COMMANDS},
        },
        auto_configure_optimizers=False,
    )
