"""Evaluation EMA of a denoiser: constant decay or EDM's half-life in images."""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


class EMA:
    """Exponential moving average ``theta_ema <- beta theta_ema + (1 - beta) theta``.

    Either a constant ``decay`` (CM/iCT: 0.9999, 0.99993) or EDM's half-life (Karras et al. 2022,
    Appendix F.1: ``beta = 0.5^(batch / (halflife_kimg * 1000))``, with the half-life capped at
    ``rampup_ratio`` times the images seen before this step, so early averages do not lag; as
    NVlabs/edm's ``training_loop.py``, which updates the EMA before ``cur_nimg += batch_size``:
    the first update (0 images seen) copies the model).

    Args:
        decay: constant decay per optimizer step; used when ``halflife_kimg`` is None.
        halflife_kimg: half-life in thousands of training images.
        rampup_ratio: EDM's ramp-up; None disables it.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        halflife_kimg: float | None = None,
        rampup_ratio: float | None = 0.05,
    ) -> None:
        self.decay, self.halflife_kimg, self.rampup_ratio = decay, halflife_kimg, rampup_ratio

    def beta(self, step: int, batch_size: int) -> float:
        """The decay for the update after optimizer step ``step`` (0-based) of ``batch_size``."""
        if self.halflife_kimg is None:
            return self.decay
        nimg = self.halflife_kimg * 1000
        if self.rampup_ratio is not None:
            nimg = min(nimg, step * batch_size * self.rampup_ratio)  # cur_nimg before the step
        return 0.5 ** (batch_size / max(nimg, 1e-8))

    @torch.no_grad()
    def update(self, ema: nn.Module, model: nn.Module, step: int, batch_size: int) -> None:
        """Blend ``model`` into ``ema`` in place; buffers are copied."""
        lerp_(ema, model, 1 - self.beta(step, batch_size))


@torch.no_grad()
def lerp_(target: nn.Module, source: nn.Module, weight: float) -> None:
    """``target <- target + weight (source - target)`` over parameters; buffers are copied.

    A ``source`` sharded by FSDP2 (``cm.training.FSDP``) into a replicated ``target`` (the EMA,
    CD's target network) is gathered whole for the update (``full_weights``); a target sharded
    alike blends shard by shard.
    """
    params = list(target.parameters())
    gather = any(isinstance(p, DTensor) for p in source.parameters()) and not any(
        isinstance(p, DTensor) for p in params
    )
    with full_weights(source) if gather else contextlib.nullcontext():
        if params:
            torch._foreach_lerp_(params, [p.detach() for p in source.parameters()], weight)
    for b_t, b in zip(target.buffers(), source.buffers(), strict=True):
        b_t.copy_(b)


@contextlib.contextmanager
def full_weights(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``module``'s FSDP2-sharded parameters are whole (on every rank).

    One all-gather per FSDP unit (``FSDPModule.unshard``), so every rank must enter it; the
    shards are back in place on exit. Unsharded modules pass through unchanged.
    """
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield module
    finally:
        for unit in units:
            unit.reshard()
