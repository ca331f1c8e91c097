"""Sampling speed: 1-step consistency sampling vs N-step Heun at the same batch, and matmul peak.

``time_sampling`` times the solvers alone on noise already scaled to ``sigma_max`` (no seeding,
no uint8 conversion), so the ratio is the cost of the network evaluations (Song et al. 2023
compare 1 NFE with EDM's 79-NFE Heun, Karras et al. 2022, Alg. 1 with 40 steps).
"""

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from cm.errors import UserError
from cm.protocols import Denoiser
from cm.schedules import karras_sigmas
from cm.solvers import heun
from cm.solvers.consistency import onestep


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA is asynchronous; CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def measure_peak_tflops(
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    n: int = 8192,
    repeats: int = 20,
) -> float:
    """Achieved TFLOP/s of an ``n x n`` matmul in ``dtype`` (``2 n^3`` FLOPs): the MFU peak."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, 3, repeats, device)
    return 2 * n**3 / statistics.median(seconds) / 1e12


def time_sampling(
    denoiser: Denoiser,
    shape: tuple[int, int, int],
    label_dim: int,
    batch_size: int,
    heun_steps: int = 40,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    warmup: int = 2,
    repeats: int = 5,
    autocast: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Images/s of 1-step sampling and of ``heun_steps``-step Heun (``2 n - 1`` NFE).

    Args:
        denoiser: any ``D(x, sigma, labels)`` on its device (weights do not matter for speed).
        shape: ``(C, H, W)`` of one image.
        label_dim: one-hot label length (0: unconditional).
        batch_size: images per solver call, the same for both solvers.
        heun_steps: steps of the Karras grid for Heun; 40 gives EDM's 79 NFE.
        sigma_min: smallest nonzero sigma of the grid.
        sigma_max: starting noise level.
        rho: Karras grid exponent.
        warmup: untimed calls of each solver first (compilation, cuDNN autotuning).
        repeats: timed calls of each solver.
        autocast: run under ``torch.autocast`` with this dtype (e.g. bfloat16), or None.
    """
    if batch_size < 1 or heun_steps < 1 or repeats < 1 or warmup < 0:
        raise UserError("batch_size, heun_steps and repeats must be >= 1 and warmup >= 0.")
    device = next(iter(denoiser.parameters())).device
    generator = torch.Generator(device).manual_seed(0)
    x = sigma_max * torch.randn(batch_size, *shape, device=device, generator=generator)
    labels = None
    if label_dim:
        labels = torch.eye(label_dim, device=device)[torch.arange(batch_size) % label_dim]
    grid = karras_sigmas(heun_steps, sigma_min, sigma_max, rho).to(device)
    runs = [
        ("onestep", 1, lambda: onestep(denoiser, x, grid[:1], labels)),
        ("heun", 2 * heun_steps - 1, lambda: heun(denoiser, x, grid, labels)),
    ]
    rows = []
    amp = (
        torch.autocast(device.type, autocast) if autocast is not None else contextlib.nullcontext()
    )
    with torch.no_grad(), amp:
        for name, nfe, fn in runs:
            seconds = timed(fn, warmup, repeats, device)
            mean = statistics.mean(seconds)
            rows.append(
                {
                    "solver": name,
                    "nfe": nfe,
                    "batch": batch_size,
                    "ms_mean": 1000 * mean,
                    "ms_median": 1000 * statistics.median(seconds),
                    "images_per_s": batch_size / mean,
                }
            )
    for row in rows:  # medians: one preempted call on a shared machine does not skew the ratio
        row["speedup_vs_heun"] = rows[1]["ms_median"] / row["ms_median"]
    return rows
