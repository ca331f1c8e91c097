"""``cm weights check|fetch [NAME ...]``: the pretrained files cm uses, verified or downloaded."""

from collections.abc import Sequence

from jsonargparse import ArgumentParser

from cm.errors import UserError
from cm.weights import REGISTRY, check, fetch


def main(args: Sequence[str]) -> None:
    """``cm weights check [NAME ...]`` verifies what is present; ``cm weights fetch`` downloads.

    ``check`` ends with one error (exit 2) when a file is CORRUPT, or when a file named on the
    command line is MISSING; listing all files with some missing is not an error.
    """
    p = ArgumentParser(
        exit_on_error=False,
        prog="cm weights",
        description="Pretrained weights used by cm (Inception, VGG/AlexNet for LPIPS, CLIP): "
        "verify what is present against the published SHA-256 (check: exit 2 when a file is "
        "corrupt or a named file is missing) or download what is missing (fetch).",
    )
    p.add_argument("action", type=str, help="check or fetch.")
    p.add_argument(
        "names",
        type=str,
        nargs="*",
        default=[],
        help=f"Which weights (default all): {', '.join(REGISTRY)}, clip:MODEL:TAG.",
    )
    p.add_argument("--dir", type=str | None, default=None, help="fetch: where to put the files.")
    cfg = p.parse_args(list(args))
    names = cfg.names or list(REGISTRY)
    match cfg.action:
        case "check":
            rows = check(names)
            for row in rows:
                detail = f"  ({row.detail})" if row.detail else ""
                print(f"{row.name:12s} {row.status:9s} {row.path or row.filename}{detail}")
            bad = [r.name for r in rows if r.status == "CORRUPT"]
            bad += [r.name for r in rows if r.status == "MISSING" and cfg.names]
            if bad:
                raise UserError(
                    f"Weights not usable: {', '.join(bad)}; delete corrupt files and run "
                    f"`cm weights fetch {' '.join(bad)}` (or copy them in from their URLs)."
                )
        case "fetch":
            for name in names:
                print(f"{name:12s} {fetch(name, cfg.dir)}")
        case _:
            raise UserError(f"Unknown action {cfg.action!r}: use cm weights check or fetch.")


weights_main = main  # the name cm.weights had
