"""``cm bench solvers``: RMSE vs NFE of every solver (and AMED predictors): table and plot."""

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import ArgumentParser

from cm.bench.report import solver_tables, write_csv, write_markdown, write_plot
from cm.bench.solvers import SOLVERS, bench_solvers, solver_names
from cm.checkpoint import load_denoiser, load_predictor
from cm.commands.options import (
    add_ckpt_path_argument,
    add_device_argument,
    add_overwrite_argument,
    add_seed_argument,
    add_trust_option,
    resolve_device,
)
from cm.convert import Format
from cm.errors import UserError
from cm.files import check_output_dir
from cm.metrics import MetricSuite
from cm.metrics.evaluate import resolve_feature
from cm.oracle import RandomGaussianMixture
from cm.protocols import image_spec
from cm.schedules import Schedule

OUTPUTS = ("solvers.csv", "solvers.md", "solvers.png")  # written into --out


def parser() -> ArgumentParser:
    """Arguments of ``cm bench solvers``."""
    p = ArgumentParser(
        prog="cm bench solvers",
        description="RMSE vs NFE of every training-free ODE solver against a converged Heun "
        "reference from the same seeded noise: writes solvers.csv, solvers.md and solvers.png.",
    )
    add_ckpt_path_argument(
        p,
        False,
        "A .ckpt from cm fit, an exported denoiser directory, or a published state dict "
        "(with --format and --denoiser); or use --oracle.",
    )
    p.add_argument(
        "--oracle",
        type=Literal["mixture"] | None,
        default=None,
        help="Benchmark the exact Gaussian-mixture denoiser (cm.oracle.RandomGaussianMixture, "
        "float64) instead of a checkpoint.",
    )
    p.add_argument("--num_components", type=int, default=10, help="Oracle: mixture components.")
    p.add_argument("--resolution", type=int, default=8, help="Oracle: image height and width.")
    p.add_argument("--channels", type=int, default=1, help="Oracle: image channels.")
    p.add_argument("--std", type=float, default=0.1, help="Oracle: std of every component.")
    p.add_argument(
        "--mixture_seed", type=int | None, default=None, help="Oracle: seed of the means (--seed)."
    )
    p.add_argument(
        "--conditional", action="store_true", help="Oracle: condition on the component label."
    )
    p.add_argument("--nfe", type=int, nargs="+", default=[3, 5, 7, 9], help="NFE budgets.")
    p.add_argument(
        "--fid_ref",
        type=str | None,
        default=None,
        help="Also score each cell's samples by FID against this reference (cm eval ref).",
    )
    p.add_argument(
        "--feature",
        type=str,
        default="inception",
        help="FID features (with --fid_ref): inception, clip or pkg.module.Class (cm eval).",
    )
    p.add_argument(
        "--predictor",
        type=str,
        nargs="+",
        default=[],
        help="Trained AMED predictors (.ckpt of cm fit --config configs/amed_*.yaml), each "
        "added at its own NFE as amed or amed_plugin(<base>).",
    )
    p.add_argument(
        "--solvers",
        type=str,
        nargs="+",
        default=None,
        help=f"Solvers to run (default all): euler (= ddim), {', '.join(list(SOLVERS)[1:])}.",
    )
    p.add_argument(
        "--schedule",
        type=Schedule,
        default="karras",
        help="Sigma grid of the solvers: karras, logsnr or time_uniform.",
    )
    p.add_argument("--sigma_min", type=float, default=0.002, help="Smallest nonzero sigma.")
    p.add_argument("--sigma_max", type=float, default=80.0, help="Starting noise level.")
    p.add_argument("--rho", type=float, default=7.0, help="Karras grid exponent.")
    p.add_argument(
        "--ref_steps", type=int, default=512, help="Heun steps of the reference (Karras grid)."
    )
    p.add_argument("--num", type=int, default=1000, help="Samples (seeds seed..seed+num-1).")
    add_seed_argument(p)
    p.add_argument("--batch_size", type=int, default=1000, help="Samples per forward pass.")
    add_device_argument(p)
    p.add_argument(
        "--out", type=str, default="bench", help=f"Output directory (of {', '.join(OUTPUTS)})."
    )
    add_overwrite_argument(p)
    p.add_argument("--ema", type=bool, default=True, help="Use the EMA weights when present.")
    add_trust_option(p)
    p.add_argument("--format", type=Format, default="auto", help="Checkpoint layout (cm sample).")
    p.add_argument(
        "--denoiser",
        type=str | None,
        default=None,
        help="YAML/JSON denoiser config for openai/edm checkpoints (cm sample --denoiser).",
    )
    return p


def main(args: Sequence[str]) -> Path:
    """``cm bench solvers``: the solver table and plot for a checkpoint or the mixture oracle."""
    cfg = parser().parse_args(list(args))
    if (cfg.ckpt_path is None) == (cfg.oracle is None):
        raise UserError("cm bench solvers needs exactly one of --ckpt_path or --oracle mixture.")
    names = solver_names(cfg.solvers)
    if min(cfg.nfe) < 1:
        raise UserError(f"--nfe budgets must be integers >= 1, got {cfg.nfe}.")
    if cfg.num < 1:
        raise UserError(f"--num must be >= 1, got {cfg.num}.")
    inputs = [cfg.ckpt_path, cfg.denoiser, cfg.fid_ref, *cfg.predictor]
    check_output_dir(cfg.out, OUTPUTS, inputs, overwrite=cfg.overwrite)
    device = resolve_device(cfg.device)
    if cfg.oracle == "mixture":
        seed = cfg.seed if cfg.mixture_seed is None else cfg.mixture_seed
        denoiser = RandomGaussianMixture(
            cfg.num_components, cfg.resolution, cfg.channels, cfg.std, seed
        )
        shape = (cfg.channels, cfg.resolution, cfg.resolution)
        label_dim = cfg.num_components if cfg.conditional else 0
        dtype, title = torch.float64, f"mixture K={cfg.num_components} std={cfg.std}"
    else:
        denoiser, _ = load_denoiser(
            cfg.ckpt_path, cfg.denoiser, cfg.format, cfg.ema, cfg.trust_config
        )
        (shape, label_dim), dtype = image_spec(denoiser), torch.float32
        title = Path(cfg.ckpt_path).name
    predictors = [load_predictor(path, trust_config=cfg.trust_config) for path in cfg.predictor]
    suite = None
    if cfg.fid_ref is not None:
        feature = resolve_feature(cfg.feature)
        suite = MetricSuite(("fid",), feature, cfg.fid_ref).to(device)
    records = bench_solvers(
        denoiser.to(device),
        shape,
        label_dim,
        cfg.nfe,
        names,
        range(cfg.seed, cfg.seed + cfg.num),
        cfg.schedule,
        cfg.sigma_min,
        cfg.sigma_max,
        cfg.rho,
        cfg.ref_steps,
        cfg.batch_size,
        dtype,
        device,
        predictors,
        suite,
    )
    out = Path(cfg.out)
    table, markdown, plot = (out / name for name in OUTPUTS)
    write_csv(records, table)
    write_markdown(records, markdown)
    write_plot(records, plot, f"{title}, {cfg.schedule} grid, {cfg.num} seeds")
    print(solver_tables(records))
    print(f"Wrote {', '.join(OUTPUTS)} to {out}")
    return out


bench_main, bench_parser = main, parser  # the names cm.bench had
