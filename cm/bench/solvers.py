"""Solver benchmarks: error vs NFE of the training-free ODE solvers against a converged reference.

``bench_solvers`` is a pure function (no Lightning, no files); ``write_csv``, ``write_markdown``
and ``write_plot`` (``cm.bench.report``) turn its records into ``solvers.csv``, ``solvers.md`` and
``solvers.png``.
Every solver starts from the same seeded noise (``SeededNoise``) as the reference, Heun's method
(Karras et al. 2022, Alg. 1) on a fine Karras grid, so the RMSE is the discretisation error alone.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cm.errors import UserError
from cm.protocols import Denoiser
from cm.sample_files import to_uint8
from cm.schedules import Schedule
from cm.solvers import amed, amed_plugin, dpm2, dpmpp_2m, dpmpp_3m, euler, heun, ipndm, unipc
from cm.solvers.sampling import Sampler, SeededNoise, seed_labels


@dataclass(frozen=True)
class BenchSolver:
    """A solver with its options and the grid steps that spend a given NFE budget.

    ``steps(nfe)`` returns None when the solver cannot spend exactly ``nfe`` evaluations.
    """

    fn: Callable[..., Tensor]
    steps: Callable[[int], int | None]
    options: dict[str, Any] = field(default_factory=dict)


def _one_per_step(nfe: int) -> int:
    """Multistep and Euler: one evaluation per step."""
    return nfe


def _afs(nfe: int) -> int:
    """Analytical first step: the first step is free, so one step more than the budget."""
    return nfe + 1


def _two_per_step(nfe: int) -> int | None:
    """Heun and DPM-Solver-2: ``2n - 1`` evaluations (Euler to 0), so only odd budgets."""
    return (nfe + 1) // 2 if nfe % 2 == 1 else None


# Every cm.solvers ODE solver without learned parameters. DDIM (eta = 0) is Euler in EDM form,
# so it appears once, as "euler (ddim)".
SOLVERS: dict[str, BenchSolver] = {
    "euler (ddim)": BenchSolver(euler, _one_per_step),
    "heun": BenchSolver(heun, _two_per_step),
    "dpm2": BenchSolver(dpm2, _two_per_step),
    "dpmpp_2m": BenchSolver(dpmpp_2m, _one_per_step),
    "dpmpp_3m": BenchSolver(dpmpp_3m, _one_per_step),
    "ipndm": BenchSolver(ipndm, _one_per_step),
    "unipc": BenchSolver(unipc, _one_per_step),
    "dpmpp_2m+afs": BenchSolver(dpmpp_2m, _afs, {"afs": True}),
    "ipndm+afs": BenchSolver(ipndm, _afs, {"afs": True}),
    "unipc+afs": BenchSolver(unipc, _afs, {"afs": True}),
}
ALIASES = {"euler": "euler (ddim)", "ddim": "euler (ddim)"}


def solver_names(names: Sequence[str] | None = None) -> list[str]:
    """Canonical names of ``names`` (all of ``SOLVERS`` if None); an unknown name is an error."""
    if names is None:
        return list(SOLVERS)
    out = []
    for name in names:
        canonical = ALIASES.get(name, name)
        if canonical not in SOLVERS:
            raise UserError(
                f"Unknown solver {name!r}: choose from {', '.join(['euler', 'ddim', *SOLVERS])}."
            )
        out.append(canonical)
    return list(dict.fromkeys(out))


class CountingDenoiser:
    """A denoiser that counts its calls (one call = one NFE for the whole batch)."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """``D(x; sigma)``, counted."""
        self.calls += 1
        return self.denoiser(x, sigma, labels)


def per_sample_rmse(x: Tensor, ref: Tensor) -> Tensor:
    """``sqrt(mean over C, H, W of (x - ref)^2)`` per sample, ``[N]`` float64."""
    return (x.double() - ref.double()).pow(2).flatten(1).mean(1).sqrt()


@torch.no_grad()
def bench_solvers(
    denoiser: Denoiser,
    shape: Sequence[int],
    label_dim: int = 0,
    nfes: Sequence[int] = (3, 5, 7, 9),
    solvers: Sequence[str] | None = None,
    seeds: Sequence[int] = range(1000),
    schedule: Schedule = "karras",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    ref_steps: int = 512,
    batch_size: int = 1000,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    predictors: Sequence[Any] = (),
    suite: Any | None = None,
) -> list[dict[str, Any]]:
    """RMSE to a converged Heun solution at each NFE budget for each solver (one dict per cell).

    Args:
        denoiser: any ``D(x, sigma, labels)`` on ``device``.
        shape: ``(C, H, W)`` of one sample.
        label_dim: one-hot label size; labels are ``seed % label_dim`` (``seed_labels``); 0: none.
        nfes: NFE budgets (each >= 1).
        solvers: names from ``SOLVERS`` (or ``euler``/``ddim``); None: all.
        seeds: one sample per seed, the same noise for every solver and the reference.
        schedule: grid of the solvers: ``karras`` (EDM Eq. 5), ``logsnr`` or ``time_uniform``.
        sigma_min: smallest nonzero sigma of every grid.
        sigma_max: the starting noise level.
        rho: Karras grid exponent (solvers and reference).
        ref_steps: Heun steps of the reference on the Karras grid.
        batch_size: samples per call.
        dtype: dtype of the states (float64 for exact oracles).
        device: where the samples live.
        predictors: trained ``AMEDPredictor``s, each run at its own NFE on its own grid as
            ``amed`` or ``amed_plugin(<base>)``.
        suite: a ``cm.metrics.MetricSuite`` with ``fid``: each cell's samples (clamped to
            ``[-1, 1]``) are also scored against its reference statistics.

    Returns:
        dicts with ``solver``, ``nfe``, ``steps``, ``rmse`` (the mean over samples of the
        per-sample RMSE) and ``fid`` (None without ``suite``); ``steps``, ``rmse`` and ``fid``
        are None where the solver cannot spend exactly ``nfe`` evaluations (Heun and
        DPM-Solver-2 at even budgets).
    """
    names = solver_names(solvers)
    if not nfes or min(nfes) < 1:
        raise UserError(f"NFE budgets must be integers >= 1, got {list(nfes)}.")
    if ref_steps < 2:
        raise UserError(f"The reference needs at least 2 Heun steps, got {ref_steps}.")
    seeds = list(seeds)
    if not seeds:
        raise UserError("The benchmark needs at least one seed (--num >= 1).")
    grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    counter = CountingDenoiser(denoiser)
    plan = [(name, nfe, SOLVERS[name].steps(nfe)) for name in names for nfe in nfes]
    learned = {(_learned_name(p), p.nfe): p for p in predictors}
    plan += [(name, nfe, learned[name, nfe].num_steps - 1) for name, nfe in learned]
    sums = {(name, nfe): 0.0 for name, nfe, steps in plan if steps is not None}
    ref_sigmas = Sampler(num_steps=ref_steps, **grid).grid(denoiser)
    batches = []  # (labels, x_T, reference solution): the reference runs once per batch
    for first in range(0, len(seeds), batch_size):
        chunk = seeds[first : first + batch_size]
        labels = seed_labels(chunk, label_dim).to(device, dtype) if label_dim else None
        x_T = SeededNoise(chunk, device).randn(shape).to(dtype) * ref_sigmas[0].item()
        batches.append((labels, x_T, heun(denoiser, x_T, ref_sigmas, labels)))
    fids: dict[tuple[str, int], float] = {}
    for name, nfe, steps in plan:  # cells outer: one metric state at a time
        if steps is None:
            continue
        if suite is not None:
            suite.reset()
        for labels, x_T, ref in batches:
            counter.calls = 0
            if (name, nfe) in learned:
                x = _run_learned(learned[name, nfe], counter, x_T.clone(), labels)
            else:
                spec = SOLVERS[name]
                sigmas = Sampler(num_steps=steps, schedule=schedule, **grid).grid(denoiser)
                x = spec.fn(counter, x_T.clone(), sigmas, labels, **spec.options)
            if counter.calls != nfe:  # the table must be honest about its NFE column
                raise AssertionError(
                    f"{name} with {steps} steps spent {counter.calls} NFE, not the budget {nfe}."
                )
            sums[name, nfe] += per_sample_rmse(x, ref).sum().item()
            if suite is not None:
                suite.update(to_uint8(x.float().clamp(-1, 1)))
        if suite is not None:
            fids[name, nfe] = suite.compute()["fid"]
    return [
        {
            "solver": name,
            "nfe": nfe,
            "steps": steps,
            "rmse": None if steps is None else sums[name, nfe] / len(seeds),
            "fid": fids.get((name, nfe)),
        }
        for name, nfe, steps in plan
    ]


def _learned_name(predictor: Any) -> str:
    """``amed`` (AMED-Solver) or ``amed_plugin(<base solver>)``."""
    return "amed" if predictor.solver == "amed" else f"amed_plugin({predictor.solver})"


def _run_learned(predictor: Any, denoiser: Denoiser, x: Tensor, labels: Tensor | None) -> Tensor:
    """A trained AMED predictor's solver on the grid it was trained for."""
    fn = amed if predictor.solver == "amed" else amed_plugin
    return fn(denoiser, x, predictor.grid(), labels, predictor=predictor.to(x.device))
