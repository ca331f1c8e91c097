"""A frozen teacher from disk: ``PretrainedDenoiser`` (the distillation objectives' teacher).

Configs name it ``cm.teacher.PretrainedDenoiser``; its old path ``cm.io.PretrainedDenoiser``,
which older configs, checkpoints and exports name, stays an alias (``cm.trust`` accepts it).
"""

from typing import Any

from torch import Tensor, nn

from cm.checkpoint import load_denoiser
from cm.convert import Format


class PretrainedDenoiser(nn.Module):
    """A frozen eval-mode teacher from disk (Song et al. 2023, CD; Salimans & Ho 2022, PD).

    The loaded module is held outside ``_modules``, so it is invisible to ``state_dict()``,
    ``parameters()``, DDP and the EMA: a teacher never goes into training checkpoints, and
    resuming rebuilds it from ``path``. ``_apply`` still moves it (``.to(device)``, ``.cuda()``,
    dtype casts), ``train()`` keeps it in eval mode, and other attributes (``net``, ``sigmas``,
    ``predict``, ``learned_variance``, ...) fall through to it.

    Args:
        path: an exported directory, a ``cm fit`` ``.ckpt``, or a foreign checkpoint file.
        denoiser: the architecture for ``openai``/``openai_legacy``/``edm`` files (in YAML a
            ``class_path``/``init_args`` object, e.g. ``configs/teachers/*.yaml``).
        format: see ``load_denoiser``; ``auto`` handles directories and ``.ckpt`` files.
        ema: use the EMA weights of a ``.ckpt``.
        trust_config: build any class named in the teacher's ``config.json`` or ``.ckpt``
            hyperparameters; by default only cm's classes (the file is data, see README's
            Security section). Set it only for a teacher file you trust.
    """

    def __init__(
        self,
        path: str,
        denoiser: nn.Module | None = None,
        format: Format = "auto",
        ema: bool = True,
        trust_config: bool = False,
    ) -> None:
        super().__init__()
        self.path, self.format, self.ema = str(path), format, ema
        module, _ = load_denoiser(path, denoiser, format, ema, trust_config)
        # A plain list: nn.Module does not register what it holds.
        self._held = [module.requires_grad_(False).eval()]
        super().train(False)

    @property
    def module(self) -> nn.Module:
        """The loaded denoiser."""
        return self._held[0]

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """``D(x; sigma)`` of the loaded denoiser."""
        return self._held[0](x, sigma, labels)

    def train(self, mode: bool = True) -> "PretrainedDenoiser":
        """Stay in eval mode whatever ``mode`` (dropout off, as the teacher was sampled)."""
        self._held[0].eval()
        return super().train(False)

    def _apply(self, fn: Any, recurse: bool = True) -> "PretrainedDenoiser":
        self._held[0]._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            held = self.__dict__.get("_held")
            if not held or name.startswith("__"):
                raise
            return getattr(held[0], name)

    def __deepcopy__(self, memo: dict[int, Any]) -> "PretrainedDenoiser":
        # A copy (e.g. of an objective) shares the frozen teacher instead of duplicating it.
        new = type(self).__new__(type(self))
        nn.Module.__init__(new)
        new.path, new.format, new.ema, new._held = self.path, self.format, self.ema, self._held
        new.training = False
        return new

    def extra_repr(self) -> str:
        """Where the teacher came from."""
        return f"path={self.path!r}, format={self.format!r}, ema={self.ema}"
