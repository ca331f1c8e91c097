"""Options every ``cm`` command shares, defined once: device, seed, checkpoint, outputs, trust."""

from typing import Any

from cm.device import resolve_device
from cm.files import add_overwrite_argument
from cm.trust import add_trust_option

__all__ = [
    "add_ckpt_path_argument",
    "add_device_argument",
    "add_overwrite_argument",
    "add_seed_argument",
    "add_trust_option",
    "resolve_device",
]


def add_device_argument(parser: Any) -> None:
    """Add ``--device`` (``auto``: CUDA when available, else the CPU; see ``resolve_device``)."""
    parser.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:1 or auto.")


def add_seed_argument(parser: Any, help: str = "First seed.") -> None:
    """Add ``--seed``: the first of the consecutive per-sample seeds ``seed..seed+num-1``."""
    parser.add_argument("--seed", type=int, default=0, help=help)


def add_ckpt_path_argument(parser: Any, required: bool, help: str) -> None:
    """Add ``--ckpt_path`` (a ``cm fit`` .ckpt, an export directory or a published file)."""
    if required:
        parser.add_argument("--ckpt_path", type=str, required=True, help=help)
    else:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help=help)
