"""Plot logged metrics (``metrics/fid`` of ``GenerativeMetrics``, ...) against the step.

Usage: ``python scripts/plot_metrics.py runs/quickstart/version_0/metrics.csv --keys metrics/fid
metrics/precision metrics/recall --out docs/digits_fid_curve.png``.
"""

import argparse
import csv
from pathlib import Path


def read_columns(path: Path, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """``(step, value)`` pairs of each key of a ``CSVLogger`` file (empty cells skipped)."""
    rows = list(csv.DictReader(path.open()))
    missing = [k for k in keys if not rows or k not in rows[0]]
    if missing:
        raise SystemExit(f"{path} has no column {missing[0]!r}: was it logged by this run?")
    return {k: [(int(r["step"]), float(r[k])) for r in rows if r[k]] for k in keys}


def main() -> None:
    """Parse arguments and write one panel per key."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", type=Path, help="metrics.csv of a CSVLogger run.")
    p.add_argument("--keys", nargs="+", default=["metrics/fid"], help="Columns to plot.")
    p.add_argument("--out", type=Path, required=True, help="Output PNG.")
    p.add_argument("--title", default="", help="Figure title.")
    args = p.parse_args()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = read_columns(args.csv, args.keys)
    fig = Figure(figsize=(4 * len(args.keys), 3.2))
    FigureCanvasAgg(fig)
    for i, (key, points) in enumerate(columns.items()):
        ax = fig.add_subplot(1, len(columns), i + 1)
        ax.plot(*zip(*points, strict=True), marker="o")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(True, alpha=0.3)
        if key.endswith("fid"):
            ax.set_yscale("log")
    fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
