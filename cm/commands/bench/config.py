"""The config side of ``cm bench train/sample``: the ``cm fit`` parser, and argv splitting."""

import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L

from cm.commands.fit import CMCLI


def fit_cli(args: Sequence[str]):
    """The config's module, data module and trainer settings, parsed as ``cm fit`` does."""

    class BenchCLI(CMCLI):
        """Parse and instantiate like ``cm fit``, but keep the trainer settings unbuilt."""

        def instantiate_trainer(self, **kwargs: Any) -> None:
            self.trainer_config = self._get(self.config_init, "trainer", default={})

    with warnings.catch_warnings():
        # `cm bench train` passes the config arguments explicitly, the rest of argv is its own.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from.*")
        return BenchCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=list(args),
            run=False,
            seed_everything_default=0,
            auto_configure_optimizers=False,
        )


def split_argv(argv: Sequence[str], names: set[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into the benchmark's own options (``names``) and the config arguments."""
    own, rest, argv = [], [], list(argv)
    while argv:
        token = argv.pop(0)
        name = token.split("=", 1)[0]
        if name in names or name in ("-h", "--help"):
            own.append(token)
            if "=" not in token and name not in ("-h", "--help", "--overwrite") and argv:
                own.append(argv.pop(0))
        else:
            rest.append(token)
    return own, rest


def config_files(args: Sequence[str]) -> list[str]:
    """The ``--config`` files among the config arguments (inputs the CSV must not replace)."""
    found = [value for a, value in zip(args, args[1:], strict=False) if a == "--config"]
    return found + [a.removeprefix("--config=") for a in args if a.startswith("--config=")]
