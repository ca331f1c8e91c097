"""``cm consolidate DIR --out FILE``: a sharded checkpoint (``cm.training.FSDP``) as one file."""

from collections.abc import Sequence

from jsonargparse import ArgumentParser

from cm.commands.options import add_overwrite_argument
from cm.files import check_output
from cm.sharded import consolidate


def main(args: Sequence[str]) -> None:
    """Write a sharded checkpoint directory as one ``.ckpt`` (full tensors, CPU, one process).

    The file is what a single-device or DDP run writes: ``cm export``, ``cm sample`` and
    ``--ckpt_path`` under any strategy read it. The whole state must fit in CPU memory.
    """
    p = ArgumentParser(
        exit_on_error=False,
        prog="cm consolidate",
        description="Write a sharded checkpoint directory (cm fit under cm.training.FSDP, e.g. "
        "checkpoints/last.ckpt/) as one .ckpt file for cm export, cm sample or a resume under "
        "another strategy.",
    )
    p.add_argument("ckpt", type=str, help="The checkpoint directory (holds meta.pt and shards).")
    p.add_argument("--out", type=str, required=True, help="The .ckpt file to write.")
    add_overwrite_argument(p)
    cfg = p.parse_args(list(args))
    out = check_output(cfg.out, [cfg.ckpt], cfg.overwrite)
    print(consolidate(cfg.ckpt, out))
