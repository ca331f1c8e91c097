"""Benchmarks: ``cm bench solvers`` (error vs NFE), ``cm bench sample`` and ``cm bench train``.

``solvers`` and ``sampling`` are Lightning-free; the training benchmark and the ``--config``
loading of both speed benchmarks live in ``cm.training.bench`` (the Lightning layer), and
``cm.cli`` dispatches the three subcommands.
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
    bench_main,
    bench_parser,
    bench_solvers,
    per_sample_rmse,
    solver_names,
)

__all__ = [
    "ALIASES",
    "SOLVERS",
    "BenchSolver",
    "CountingDenoiser",
    "bench_main",
    "bench_parser",
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
