"""Benchmarks: ``cm bench solvers`` (error vs NFE), ``cm bench sample`` and ``cm bench train``.

``solvers`` and ``sampling`` are Lightning-free library functions; the timed training step lives
in ``cm.training.bench`` (the Lightning layer) and the three commands in ``cm.commands.bench``.
"""

from cm.bench.report import (
    markdown_rows,
    markdown_table,
    solver_tables,
    write_csv,
    write_markdown,
    write_plot,
    write_rows,
)
from cm.bench.sampling import measure_peak_tflops, time_sampling
from cm.bench.solvers import (
    ALIASES,
    SOLVERS,
    BenchSolver,
    CountingDenoiser,
    bench_solvers,
    per_sample_rmse,
    solver_names,
)

__all__ = [
    "ALIASES",
    "SOLVERS",
    "BenchSolver",
    "CountingDenoiser",
    "bench_solvers",
    "markdown_rows",
    "markdown_table",
    "measure_peak_tflops",
    "per_sample_rmse",
    "solver_names",
    "solver_tables",
    "time_sampling",
    "write_csv",
    "write_markdown",
    "write_plot",
    "write_rows",
]
