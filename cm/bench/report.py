"""Benchmark output: Markdown tables, CSV files and the RMSE-vs-NFE plot of the solvers table.

Every file is written atomically (``cm.files.atomic_path``): complete or absent, umask modes.
"""

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cm.files import atomic_path


def _cell(value: Any) -> str:
    """Floats with 4 significant digits, None as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub Markdown table with the keys of the first row as columns."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_rows(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` as CSV (None as an empty cell), creating the parent directory."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return path


def _columns(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[int]]:
    """Solver names and NFE budgets in first-seen order."""
    names = list(dict.fromkeys(r["solver"] for r in records))
    nfes = list(dict.fromkeys(r["nfe"] for r in records))
    return names, nfes


def markdown_table(records: Sequence[dict[str, Any]], key: str = "rmse") -> str:
    """Rows NFE, columns solvers, ``key`` (rmse or fid) to 4 significant digits; ``—``: not run."""
    names, nfes = _columns(records)
    cell = {(r["solver"], r["nfe"]): r.get(key) for r in records}
    lines = ["| NFE | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for nfe in nfes:
        values = [cell.get((n, nfe)) for n in names]
        lines.append(
            f"| {nfe} | " + " | ".join("—" if v is None else f"{v:.4g}" for v in values) + " |"
        )
    return "\n".join(lines) + "\n"


def write_csv(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One row per (solver, NFE): ``solver,nfe,steps,rmse,fid`` (empty where not run)."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["solver", "nfe", "steps", "rmse", "fid"])
        writer.writeheader()
        for r in records:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in writer.fieldnames})
    return path


def write_markdown(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``markdown_table`` to ``path``: RMSE, then FID when it was measured."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(solver_tables(records))
    return path


def solver_tables(records: Sequence[dict[str, Any]]) -> str:
    """The RMSE table, and the FID table under it when any cell has one."""
    text = "RMSE to the reference solution\n\n" + markdown_table(records)
    if any(r.get("fid") is not None for r in records):
        text += "\nFID\n\n" + markdown_table(records, "fid")
    return text


def write_plot(records: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Log-scale RMSE vs NFE, one line per solver (matplotlib's Agg canvas, no pyplot state)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    names, _ = _columns(records)
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = matplotlib.colormaps["tab20"].colors  # 20 distinct colours; learned solvers dashed
    for i, name in enumerate(names):
        points = [(r["nfe"], r["rmse"]) for r in records if r["solver"] == name and r["rmse"]]
        points = [(n, v) for n, v in points if math.isfinite(v)]
        style = "--" if name.startswith("amed") else "-"
        if points:
            ax.plot(*zip(*points, strict=True), style, marker="o", label=name, color=colors[i % 20])
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMSE to reference")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")  # the format by name, not by path's suffix
    return path
