"""The AMED predictor: ~9k parameters choosing each interval's intermediate time (Zhou et al. 2024).

"Fast ODE-based sampling for diffusion models in around 5 steps", Sec. 4 and Fig. 3.

It reads the channel mean of the denoiser's bottleneck activation at ``t_n`` (captured by a forward
hook, average-pooled to 8x8) and embeddings of ``t_n`` and ``t_{n+1}``, and returns ``r_n`` in
(0, 1), the direction scale ``c_n`` in ``(1 - scale_dir, 1 + scale_dir)`` and the time scale
``a_n`` in ``(1 - scale_time, 1 + scale_time)``. It also records the grid and base solver it was
trained for, so a saved predictor samples exactly as trained. A denoiser without a known bottleneck
(the mixture oracle, a foreign network) gets the time-only predictor: the feature input is zeros,
so the outputs depend on ``(t_n, t_{n+1})`` alone, as diff-sampler does at the AFS step.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cm.errors import UserError
from cm.networks.adm import ADMUNet
from cm.networks.ncsnpp import NCSNpp
from cm.schedules import Schedule, schedule_sigmas

AMEDBase = Literal["amed", "euler", "ipndm", "dpmpp"]


def bottleneck_module(denoiser: Any) -> nn.Module | None:
    """The lowest-resolution activation of a cm UNet behind wrappers, None if there is none.

    ``NCSNpp`` (EDM's SongUNet): the last encoder block (EDM's ``8x8_block`` at 32 px);
    ``ADMUNet``: the middle block (diff-sampler's choice for ADM models). Wrappers are followed
    through ``net``, ``denoiser`` and ``module`` (preconditioners, guidance, pretrained teachers).
    """
    obj = denoiser
    for _ in range(16):
        if isinstance(obj, NCSNpp):
            return obj.enc[-1].blocks[-1] if len(obj.enc[-1].blocks) else obj.enc[-1]
        if isinstance(obj, ADMUNet):
            return obj.middle
        obj = next((getattr(obj, a) for a in ("net", "denoiser", "module") if _has(obj, a)), None)
        if obj is None:
            return None
    return None


def _has(obj: Any, name: str) -> bool:
    """Whether ``obj.name`` exists and is not None (``__getattr__`` fall-through included)."""
    try:
        return getattr(obj, name) is not None
    except AttributeError:
        return False


def _submodule(denoiser: Any, path: str) -> nn.Module:
    """The module at the dotted ``path`` of the denoiser or of a module it wraps."""
    obj = denoiser
    for _ in range(16):
        if isinstance(obj, nn.Module):
            try:
                return obj.get_submodule(path)
            except AttributeError:
                pass
        obj = next((getattr(obj, a) for a in ("net", "denoiser", "module") if _has(obj, a)), None)
        if obj is None:
            break
    raise UserError(
        f"AMEDPredictor.feature_module {path!r} is not a submodule of the denoiser: give the "
        "dotted path of its bottleneck block, 'auto', or null for the time-only predictor."
    )


class FeatureTap:
    """The last bottleneck activation since ``reset``, as ``[N, size^2]`` channel-mean features."""

    def __init__(self, size: int) -> None:
        self.size, self.last = size, None

    def hook(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        """Forward hook: keep the activation ``[B, C, h, w]``."""
        self.last = output.detach()

    def reset(self) -> None:
        """Forget the last activation (before a model evaluation, or an AFS step without one)."""
        self.last = None

    def take(self, n: int, device: torch.device) -> Tensor:
        """Features of the first ``n`` rows (the conditional half under CFG); zeros if none."""
        if self.last is None:
            return torch.zeros(n, self.size**2, device=device)
        h = self.last[:n].float().mean(1, keepdim=True)  # [n, 1, h, w]
        return F.adaptive_avg_pool2d(h, self.size).flatten(1)


class AMEDPredictor(nn.Module):
    """Zhou et al. 2024, Sec. 4.1: ``(r_n, c_n, a_n) = g_phi(h(x_n, t_n), t_n, t_{n+1})``.

    Args:
        num_steps: time points ``N`` of the grid it is trained for (``N - 1`` intervals, each two
            model evaluations: ``2 (N - 1)`` NFE, one fewer with ``afs``; ``N = 4`` is NFE 5).
        solver: ``amed`` (AMED-Solver) or the base solver of AMED-Plugin: ``euler``, ``ipndm``
            or ``dpmpp`` (DPM-Solver++ multistep).
        schedule: the grid family of the ``N`` points (``cm.schedules.schedule_sigmas``).
        sigma_min: the last point of the grid (sampling stops there, as diff-sampler's).
        sigma_max: the first point.
        rho: Karras grid exponent.
        afs: analytical first step (saves the first model evaluation).
        afs_history: keep the AFS slope ``x / sqrt(1 + t_0^2)`` in the multistep history, as
            diff-sampler does. AFS takes ``D(x; t_0) = 0``, i.e. zero-mean data; where the data
            mean is far from 0 (digits in [-1, 1]: mean -0.39) that slope is wrong by
            ``mean / t_0`` and the history carries the error into every later step. False: it
            serves the first substep only; the history starts at the first model evaluation.
        max_order: history length of ``ipndm`` (at most 4) and ``dpmpp`` (at most 3).
        scale_dir: half-width of ``c_n`` around 1 (0: no direction scale); the paper's 0.01.
        scale_time: half-width of ``a_n`` around 1 (0: no time scale).
        hidden_dim: width of the bottleneck encoder.
        feature_size: features are the bottleneck's channel mean pooled to this size squared.
        noise_channels: width of each time embedding.
        feature_module: dotted path of the hooked block, ``auto`` (the bottleneck of cm's UNets,
            else time-only), or None (time-only).
        normalize_features: standardise each sample's features to zero mean and unit variance
            before the encoder (diff-sampler feeds the raw channel mean: False).
    """

    def __init__(
        self,
        num_steps: int = 4,
        solver: AMEDBase = "amed",
        schedule: Schedule = "time_uniform",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        afs: bool = True,
        afs_history: bool = True,
        max_order: int = 4,
        scale_dir: float = 0.01,
        scale_time: float = 0.0,
        hidden_dim: int = 128,
        feature_size: int = 8,
        noise_channels: int = 8,
        feature_module: str | None = "auto",
        normalize_features: bool = False,
    ) -> None:
        super().__init__()
        if num_steps < 2:
            raise UserError(f"AMED needs num_steps >= 2 time points, got {num_steps}.")
        if not 1 <= max_order <= (3 if solver == "dpmpp" else 4):
            raise UserError(f"max_order {max_order} is out of range for solver {solver!r}.")
        if scale_dir < 0 or scale_time < 0:
            raise UserError("scale_dir and scale_time are half-widths and must be >= 0.")
        self.num_steps, self.solver, self.schedule = num_steps, solver, schedule
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.afs, self.afs_history, self.max_order = afs, afs_history, max_order
        self.scale_dir, self.scale_time = scale_dir, scale_time
        self.feature_size, self.noise_channels = feature_size, noise_channels
        self.feature_module, self.normalize_features = feature_module, normalize_features
        self.map_layer0 = nn.Linear(noise_channels, noise_channels)
        self.enc_layer0 = nn.Linear(feature_size**2, hidden_dim)
        self.enc_layer1 = nn.Linear(hidden_dim, 4)
        width = 2 * noise_channels + 4
        self.fc_r = nn.Linear(width, 1)
        self.fc_scale_dir = nn.Linear(width, 1) if scale_dir else None
        self.fc_scale_time = nn.Linear(width, 1) if scale_time else None
        # -1: not yet used; 0: trained time-only; 1: trained on bottleneck features.
        self.register_buffer("uses_features", torch.tensor(-1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """diff-sampler's init: Kaiming-normal weights (Xavier for the time layer), zero biases."""
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=1 / math.sqrt(layer.in_features))
                nn.init.zeros_(layer.bias)
        nn.init.xavier_uniform_(self.map_layer0.weight)

    @property
    def nfe(self) -> int:
        """Model evaluations of one sample: ``2 (N - 1)``, minus one with AFS."""
        return 2 * (self.num_steps - 1) - int(self.afs)

    def grid(self) -> Tensor:
        """The ``N`` time points it was trained for, then 0 (float64; AMED stops before the 0)."""
        return schedule_sigmas(
            self.schedule, self.num_steps, self.sigma_min, self.sigma_max, self.rho
        )

    def _embed(self, sigma: float, device: torch.device) -> Tensor:
        """EDM's positional embedding of raw ``sigma`` (endpoint, sin first), then a layer."""
        half = self.noise_channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, device=device) / max(half - 1, 1))
        args = sigma * freqs[None]
        return F.silu(self.map_layer0(torch.cat([args.sin(), args.cos()], dim=1)))

    def forward(self, features: Tensor, sigma: float, sigma_next: float) -> tuple[Tensor, ...]:
        """``r, c, a`` (each ``[N]``) for the interval ``sigma -> sigma_next``.

        Args:
            features: ``[N, feature_size^2]`` bottleneck features (zeros for time-only).
            sigma: ``t_n``.
            sigma_next: ``t_{n+1}``.
        """
        n, device = features.shape[0], features.device
        emb = torch.cat([self._embed(sigma, device), self._embed(sigma_next, device)], dim=1)
        features = features.to(emb.dtype)
        if self.normalize_features:  # zeros (time-only, AFS) stay zeros
            mean = features.mean(1, keepdim=True)
            features = (features - mean) / features.std(1, keepdim=True).clamp_min(1e-6)
        h = self.enc_layer1(F.silu(self.enc_layer0(features)))
        out = torch.cat([h, emb.expand(n, -1)], dim=1)
        r = torch.sigmoid(self.fc_r(out)).squeeze(1)
        c, a = torch.ones_like(r), torch.ones_like(r)
        if self.fc_scale_dir is not None:
            c = self._scale(self.fc_scale_dir(out), self.scale_dir)
        if self.fc_scale_time is not None:
            a = self._scale(self.fc_scale_time(out), self.scale_time)
        return r, c, a

    @staticmethod
    def _scale(logit: Tensor, half_width: float) -> Tensor:
        """A factor in ``(1 - half_width, 1 + half_width)``, 1 at logit 0."""
        return (1 + half_width * (2 * torch.sigmoid(logit) - 1)).squeeze(1)

    @contextmanager
    def watch(self, denoiser: Any) -> Iterator[FeatureTap]:
        """Hook the denoiser's bottleneck for the duration of one sampling run.

        The first run fixes whether the predictor uses features (stored in ``uses_features``);
        a predictor trained on features refuses a denoiser without them.
        """
        module = None
        if self.feature_module == "auto":
            module = bottleneck_module(denoiser)
        elif self.feature_module is not None:
            module = _submodule(denoiser, self.feature_module)
        if int(self.uses_features) == -1:
            self.uses_features.fill_(int(module is not None))
        elif int(self.uses_features) == 0:
            module = None
        elif module is None:
            raise UserError(
                "This AMED predictor was trained on bottleneck features, but the denoiser has no "
                "block at feature_module: sample with the denoiser it was trained for."
            )
        tap = FeatureTap(self.feature_size)
        handle = None if module is None else module.register_forward_hook(tap.hook)
        try:
            yield tap
        finally:
            if handle is not None:
                handle.remove()
