r"""Chain progressive-distillation rounds (Salimans & Ho 2022, Alg. 2), halving N each round.

Round k is one ``cm fit`` of a config whose objective is ``cm.objectives.ProgressiveDistillation``
with ``student_steps = N_k`` and a ``cm.io.PretrainedDenoiser`` teacher, followed by ``cm export``;
the teacher of round k+1 is the export of round k. Rounds whose export exists are skipped, and an
interrupted round resumes from its last checkpoint, so rerunning the command continues the chain.

    python scripts/progressive_distillation.py --config configs/pd_digits.yaml \\
        --teacher runs/edm_digits/export --start_steps 64 --end_steps 1 --root runs/pd_digits

Arguments not listed in ``--help`` go to every ``cm fit`` (e.g. ``--trainer.max_steps=500``).
"""

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from cm.cli import main as cm_main

OBJECTIVE = "--model.init_args.objective.init_args"


def student_steps(start_steps: int, end_steps: int) -> list[int]:
    """Students' steps ``start/2, start/4, ..., end`` (Salimans & Ho 2022, Alg. 2, outer loop)."""
    ratio = start_steps // max(end_steps, 1)
    if end_steps < 1 or start_steps <= end_steps or start_steps != ratio * end_steps:
        raise ValueError(
            f"--start_steps ({start_steps}) must be end_steps ({end_steps}) times a power of two "
            "greater than 1, with end_steps >= 1, e.g. --start_steps 1024 --end_steps 1."
        )
    if 2 ** round(math.log2(ratio)) != ratio:
        raise ValueError(
            f"--start_steps / --end_steps must be a power of two, got {start_steps}/{end_steps}."
        )
    return [start_steps // 2**k for k in range(1, round(math.log2(ratio)) + 1)]


def last_checkpoint(root: Path) -> Path | None:
    """The newest ``.ckpt`` under ``root`` (a round's ``default_root_dir``), if any."""
    ckpts = sorted(root.glob("**/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    return ckpts[-1] if ckpts else None


def run_round(
    configs: Sequence[str], extra: Sequence[str], teacher: Path, steps: int, root: Path
) -> Path:
    """Fit the ``steps``-step student of ``teacher`` under ``root`` and export it to root/export."""
    resume = last_checkpoint(root)  # an interrupted round continues where it stopped
    cm_main(
        [
            "fit",
            *(arg for config in configs for arg in ("--config", config)),
            *extra,
            f"{OBJECTIVE}.student_steps={steps}",
            f"{OBJECTIVE}.teacher.init_args.path={teacher}",
            f"--model.init_args.sampler.init_args.num_steps={steps}",
            f"--trainer.default_root_dir={root}",
            *([f"--ckpt_path={resume}"] if resume else []),
        ]
    )
    ckpt = last_checkpoint(root)
    if ckpt is None:
        raise RuntimeError(
            f"cm fit wrote no checkpoint under '{root}': keep Lightning's checkpointing enabled "
            "(trainer.enable_checkpointing) so the round can be exported."
        )
    cm_main(["export", "--ckpt_path", str(ckpt), "--out", str(root / "export")])
    return root / "export"


def parser() -> argparse.ArgumentParser:
    """Arguments of the script; unknown ones go to ``cm fit``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        action="append",
        required=True,
        help="cm fit config with a ProgressiveDistillation objective (repeat for overrides).",
    )
    p.add_argument("--teacher", required=True, help="The first teacher: a `cm export` directory.")
    p.add_argument("--start_steps", type=int, default=1024, help="Sampling steps of the teacher.")
    p.add_argument("--end_steps", type=int, default=1, help="Sampling steps of the last student.")
    p.add_argument("--root", default="runs/pd", help="Round k runs in ROOT/steps_<N_k>.")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, str | int]]:
    """Run (or skip) every round and print a table; returns its rows for scripts and tests."""
    args, extra = parser().parse_known_args(argv)
    teacher, root = Path(args.teacher), Path(args.root)
    if not teacher.exists():
        raise FileNotFoundError(
            f"Teacher '{teacher}' does not exist: pass a directory written by `cm export` "
            "(model.safetensors + config.json) or a .ckpt from cm fit."
        )
    rows: list[dict[str, str | int]] = []
    for steps in student_steps(args.start_steps, args.end_steps):
        round_root = root / f"steps_{steps}"
        export = round_root / "export"
        done = (export / "model.safetensors").is_file() and (export / "config.json").is_file()
        if not done:
            export = run_round(args.config, extra, teacher, steps, round_root)
        rows.append(
            {
                "round": len(rows) + 1,
                "teacher_steps": 2 * steps,
                "student_steps": steps,
                "teacher": str(teacher),
                "export": str(export),
                "status": "skipped" if done else "trained",
            }
        )
        teacher = export  # the next round distils this round's student
    print_table(rows)
    return rows


def print_table(rows: Sequence[dict[str, str | int]]) -> None:
    """Print one line per round: steps, status, teacher and export paths."""
    if not rows:
        return
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r[k]).ljust(widths[k]) for k in keys))


if __name__ == "__main__":
    main()
