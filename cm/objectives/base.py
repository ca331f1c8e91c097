"""The objective interface: ``objective(denoiser, x0, labels, step, total_steps) -> loss[N]``."""

import torch
from torch import Tensor, nn

from cm.errors import UserError


class SampleDraws:
    """Per-sample random draws that are a function of the global sample index, not of the rank.

    A rank trains on the slice ``[offset, offset + n)`` of the ``total`` samples of one optimizer
    step (all ranks, all accumulated micro-batches). Once ``set`` with a seed shared by all ranks,
    a scalar draw (sigmas, indices, label masks) generates the ``total`` values of the whole
    step's batch and keeps this slice, and an image-sized draw (``randn_like``) generates each
    sample's noise from a seed of ``(seed, draw, global index)``, so memory stays per rank. Two
    ranks thus draw exactly the noise, sigmas and label masks of one process with the doubled
    batch (or with gradient accumulation). Unset (objectives called directly, evaluation), draws
    come from the global RNG at the local size. Network dropout masks do not come from here:
    they stay per rank (global RNG, seeded per rank by the module).
    """

    def __init__(self) -> None:
        self.set(None)

    def set(self, seed: int | None, offset: int = 0, total: int | None = None) -> None:
        """Draw the slice ``[offset, offset + n)`` of ``total`` values from ``seed`` from now on."""
        self.seed, self.offset, self.total = seed, offset, total
        self._generators: dict[torch.device, torch.Generator] = {}
        self._noise_draws = 0

    def _args(self, n: int, device: torch.device | str | None) -> tuple[int, dict]:
        """How many values to draw and the ``generator``/``device`` keywords of the draw."""
        device = torch.device(device if device is not None else "cpu")
        if self.seed is None:
            return n, {"device": device}
        if self.total is None or self.offset + n > self.total:
            raise UserError(
                f"A local batch of {n} at offset {self.offset} does not fit in the global batch "
                f"of {self.total}: every rank and micro-batch must have the same batch size."
            )
        return self.total, {"device": device, "generator": self._generator(device)}

    def _generator(self, device: torch.device) -> torch.Generator:
        """The step's generator on ``device``, seeded alike on every rank."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def shared(self) -> torch.Generator | None:
        """A CPU generator for draws over the step's whole batch, alike on every rank.

        For choices that involve several samples at once (which rows of the global batch, a
        partner row, one sample of the batch): every rank draws the same values and keeps what
        concerns its rows ``[offset, offset + n)``. None when unset: the global RNG.
        """
        return None if self.seed is None else self._generator(torch.device("cpu"))

    def _slice(self, values: Tensor, n: int) -> Tensor:
        """The local ``n`` values of a global draw (all of them when unset)."""
        return values if self.seed is None else values[self.offset : self.offset + n]

    def local(self, values: Tensor, n: int) -> Tensor:
        """The local ``n`` rows of a ``whole`` draw (``randn(..., whole=True)``) ``[n, ...]``."""
        return self._slice(values, n)

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal noise shaped like ``x`` ``[N, ...]``, sample by sample when set."""
        if self.seed is None:
            return torch.randn_like(x)
        self._args(x.shape[0], x.device)  # checks the slice
        # One reseeded generator per sample: only this rank's samples are ever materialised.
        generator = torch.Generator(x.device)
        noise = torch.empty_like(x, memory_format=torch.contiguous_format)
        for i in range(x.shape[0]):
            generator.manual_seed(_seed(self.seed, self._noise_draws, self.offset + i))
            noise[i].normal_(generator=generator)
        self._noise_draws += 1
        return noise

    def randn(
        self, n: int, device: torch.device | str | None = None, whole: bool = False
    ) -> Tensor:
        """``n`` standard normal float32 values ``[n]``.

        With ``whole`` the values of the step's whole batch ``[total]`` (alike on every rank;
        ``local`` takes this rank's), for a decision every rank must take alike.
        """
        total, kw = self._args(n, device)
        values = torch.randn(total, **kw)
        return values if whole else self._slice(values, n)

    def rand(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """``n`` uniform float32 values in ``[0, 1)`` ``[n]``."""
        total, kw = self._args(n, device)
        return self._slice(torch.rand(total, **kw), n)

    def randint(self, low: int, high: int, n: int, device: torch.device | str | None = None):
        """``n`` integers uniform in ``[low, high)`` ``[n]``."""
        total, kw = self._args(n, device)
        return self._slice(torch.randint(low, high, (total,), **kw), n)

    def multinomial(self, probs: Tensor, n: int) -> Tensor:
        """``n`` indices drawn with replacement from the weights ``probs`` ``[K]``."""
        total, kw = self._args(n, probs.device)
        generator = kw.get("generator")
        return self._slice(torch.multinomial(probs, total, True, generator=generator), n)


def _seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (Python hashes int tuples the same in every process)."""
    return hash(keys) & 0x7FFFFFFFFFFFFFFF


class Objective(nn.Module):
    """A training loss of one denoiser; curricula are pure functions of ``step``.

    Objectives own what the loss needs besides the trained denoiser (a teacher, a target network)
    so it is saved in the checkpoint with them. Every per-sample random draw goes through
    ``self.draws`` (``SampleDraws``), which makes it a function of the global sample index.
    """

    def __init__(self) -> None:
        super().__init__()
        self.draws = SampleDraws()

    def train(self, mode: bool = True) -> "Objective":
        """Switch the objective's modules, keeping a frozen ``teacher`` (CD, PD) in eval mode."""
        super().train(mode)
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            teacher.eval()
        return self

    def bind(self, denoiser: nn.Module) -> None:
        """Create state that copies the trained denoiser (e.g. a target network) before training."""

    def forward(
        self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None, step: int, total_steps: int
    ) -> Tensor:
        """Per-sample loss ``[N]`` of ``denoiser`` on clean data ``x0`` at training ``step``."""
        raise NotImplementedError

    def evaluate(
        self, denoiser: nn.Module, x0: Tensor, labels: Tensor | None, step: int, total_steps: int
    ) -> dict[str, Tensor]:
        """Held-out scalars (``cm validate``/``cm test``); by default the mean loss."""
        return {"loss": self(denoiser, x0, labels, step, total_steps).mean()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the objective that train with the denoiser (sCM's weighting head)."""
        return []

    def after_optimizer_step(self, denoiser: nn.Module, step: int, total_steps: int) -> None:
        """Update internal state (e.g. the target EMA) after the optimizer stepped at ``step``."""

    def metrics(self) -> dict[str, float]:
        """Scalars worth logging from the last call (e.g. the current N(k))."""
        return {}


@torch.no_grad()
def copy_net_weights(student: nn.Module, teacher: nn.Module) -> None:
    """Initialise ``student``'s raw network from ``teacher``'s (CD: Song et al. 2023, Sec. 6; PD).

    Preconditioners may differ (EDM teacher, consistency student); the networks behind them must
    have the same architecture, or this raises one error saying so.
    """
    s_net, t_net = getattr(student, "net", student), getattr(teacher, "net", teacher)
    s_state, t_state = s_net.state_dict(), t_net.state_dict()
    mismatch = [k for k in s_state if k not in t_state or t_state[k].shape != s_state[k].shape]
    if mismatch or len(s_state) != len(t_state):
        raise UserError(
            f"Cannot initialise the student from the teacher: their networks differ (e.g. at "
            f"'{(mismatch or sorted(set(t_state) - set(s_state)))[0]}'); give the student the "
            "teacher's network config or set init_from_teacher to false."
        )
    s_net.load_state_dict(t_state)


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Start ``student`` from ``teacher``'s network (CD, and CT as openai's ``cm_train.py``).

    Both preconditioners must feed their networks the same ``c_noise``, else the copied network
    would see a noise conditioning it was not trained on; this raises one error saying so.
    """
    s_scale = getattr(student, "noise_scale", None)
    t_scale = getattr(teacher, "noise_scale", None)
    if None not in (s_scale, t_scale) and s_scale != t_scale:
        raise UserError(
            f"The student's noise_scale ({s_scale}) differs from the teacher's "
            f"({t_scale}): set the student's noise_scale to {t_scale} so the copied "
            "network sees the c_noise it was trained on."
        )
    probe = torch.tensor([0.1, 1.0, 10.0])
    s_noise, t_noise = _c_noise(student, probe), _c_noise(teacher, probe)
    if s_noise is not None and t_noise is not None and not torch.allclose(s_noise, t_noise):
        raise UserError(
            f"The student's preconditioner ({type(student).__name__}) feeds the network "
            f"another c_noise than the teacher's ({type(unwrap_denoiser(teacher)).__name__}): "
            "give the student a preconditioner with the teacher's noise conditioning, or "
            "do not initialise it from the teacher."
        )
    copy_net_weights(student, teacher)


def unwrap_denoiser(denoiser: nn.Module) -> nn.Module:
    """The denoiser behind a ``PretrainedDenoiser`` (its ``module``), else itself."""
    return getattr(denoiser, "module", denoiser)


def _c_noise(denoiser: nn.Module, sigma: Tensor) -> Tensor | None:
    """What a preconditioner feeds its network at ``sigma`` (``[N]``); None when unknown."""
    denoiser = unwrap_denoiser(denoiser)
    if hasattr(denoiser, "scalings"):  # EDM-style: c_noise = noise_scale * ln(sigma)
        return denoiser.scalings(sigma.view(-1, 1, 1, 1))[3].flatten().float()
    if hasattr(denoiser, "timestep"):  # discrete DDPM: the nearest trained timestep
        return denoiser.timestep(sigma).float()
    return None


def drop_labels(
    labels: Tensor | None, p_uncond: float, draws: SampleDraws | None = None
) -> Tensor | None:
    """Ho & Salimans 2022, Alg. 1: zero each label row with probability ``p_uncond``.

    All-zero rows (class one-hots ``[N, L]`` or text contexts ``[N, L, D]``) are the networks'
    "no condition", so one model learns the conditional and the unconditional denoiser that
    ``cm.guidance.cfg`` combines. The mask comes from ``draws`` (the objective's, so it depends
    on the global sample index), else from the global RNG.
    """
    if labels is None or p_uncond == 0:
        return labels
    keep = (draws or SampleDraws()).rand(labels.shape[0], labels.device) >= p_uncond
    return labels * keep.view(-1, *[1] * (labels.ndim - 1)).to(labels.dtype)
