"""Guidance: turn a conditional denoiser into a guided denoiser ``D(x, sigma, labels)``.

Classifier-free guidance (Ho & Salimans 2022) mixes the conditional and unconditional outputs of
one network; classifier guidance (Dhariwal & Nichol 2021, Sec. 4) adds the gradient of a
noise-aware classifier's ``log p(y | x, sigma)``. In EDM form ``D(x) = x + sigma^2 grad log p(x)``
(Karras et al. 2022, Eq. 3), so both are shifts of ``D``. The result is again a denoiser: every
solver, CD teacher and sampler takes it unchanged.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from cm.errors import UserError

Classifier = Callable[[Tensor, Tensor], Tensor]


class GuidedDenoiser(nn.Module):
    """A guidance wrapper that still looks like its denoiser (``net``, ``sigmas``, ...).

    Unknown attributes fall through to the wrapped denoiser, so samplers round a discrete
    model's grid (``round_sigma``) and read its network exactly as without guidance; except a flow
    map's ``flow_map``, which would jump unguided: a wrapper that guides it defines its own.
    """

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name in ("denoiser", "flow_map"):
                raise
            return getattr(super().__getattr__("denoiser"), name)


class ClassifierFreeGuidance(GuidedDenoiser):
    """Ho & Salimans 2022, Eq. 6: ``D = D(x; sigma, 0) + s (D(x; sigma, y) - D(x; sigma, 0))``.

    ``scale`` 1 is the conditional denoiser, 0 the unconditional one, and ``s = 1 + w`` in the
    paper's ``w``. Both branches run as one batch of ``2N``. Unlabelled calls (``labels=None``)
    pass through unguided.

    Args:
        denoiser: a conditional denoiser trained with label dropout (``p_uncond`` in the
            objectives), whose all-zero label rows mean "no class".
        scale: the guidance scale ``s``.
        uncond_labels: the "no class" label vector ``[L]``; None uses all zeros.
    """

    def __init__(
        self, denoiser: nn.Module, scale: float = 1.0, uncond_labels: Tensor | None = None
    ) -> None:
        super().__init__()
        self.denoiser, self.scale = denoiser, scale
        self.uncond_labels = uncond_labels

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """Guided ``D(x; sigma, labels)``."""
        return self._guided(self.denoiser, x, labels, sigma)

    def flow_map(
        self,
        x: Tensor,
        sigma: Tensor | float,
        sigma_to: Tensor | float,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Guided jump ``Phi_u + s (Phi_c - Phi_u)`` of a flow map (``Phi`` is affine in ``u``)."""
        flow_map = getattr(self.denoiser, "flow_map", None)
        if flow_map is None:
            raise UserError(
                "Guided flow-map sampling needs a flow map (e.g. cm.flowmap.MeanFlowPrecond); "
                "use a consistency or ODE solver for this denoiser."
            )
        return self._guided(flow_map, x, labels, sigma, sigma_to)

    def _guided(self, fn, x: Tensor, labels: Tensor | None, *levels: Tensor | float) -> Tensor:
        """``fn_u + s (fn_c - fn_u)`` of ``fn(x, *levels, labels)``, both as one batch of ``2N``."""
        if labels is None:
            return fn(x, *levels, None)
        uncond = torch.zeros_like(labels) if self.uncond_labels is None else self.uncond_labels
        uncond = uncond.to(labels).expand_as(labels)
        n = x.shape[0]
        doubled = [torch.as_tensor(s, device=x.device).reshape(-1).expand(n) for s in levels]
        doubled = [torch.cat([s, s]) for s in doubled]
        out = fn(torch.cat([x, x]), *doubled, torch.cat([labels, uncond]))
        cond, unconditional = out.chunk(2)
        return unconditional + self.scale * (cond - unconditional)


def cfg(denoiser: nn.Module, scale: float, uncond_labels: Tensor | None = None) -> nn.Module:
    """Ho & Salimans 2022: the classifier-free guided denoiser (``ClassifierFreeGuidance``)."""
    return ClassifierFreeGuidance(denoiser, scale, uncond_labels)


class ClassifierGuidance(GuidedDenoiser):
    """Dhariwal & Nichol 2021, Alg. 1 in EDM form: ``D + s sigma^2 grad_x log p(y | x, sigma)``.

    With ``D(x) = E[y | x] = x + sigma^2 grad log p(x)``, adding ``s grad log p(y | x)`` to the
    score gives ``D_guided = D + s sigma^2 grad_x log p(y | x, sigma)``; ``s = 1`` is exactly the
    class-conditional denoiser when the classifier is exact (tested with ``cm.oracle``).

    Args:
        denoiser: the (unconditional or conditional) denoiser to guide.
        classifier: a noise-aware classifier ``classifier(x, sigma) -> logits [N, L]`` at the
            noise level ``sigma`` of ``x`` (EDM coordinates).
        scale: the classifier scale ``s``.
        conditional: also pass the labels to ``denoiser`` (guiding a conditional model).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        classifier: nn.Module,
        scale: float = 1.0,
        conditional: bool = False,
    ) -> None:
        super().__init__()
        self.denoiser, self.classifier = denoiser, classifier
        self.scale, self.conditional = scale, conditional

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """Guided ``D(x; sigma, labels)``; unlabelled calls pass through unguided."""
        D = self.denoiser(x, sigma, labels if self.conditional else None)
        if labels is None:
            return D
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1).expand(len(x))
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_p = torch.log_softmax(self.classifier(x_in, sigma), dim=1)
            selected = (log_p * labels.to(log_p)).sum()  # sum_i log p(y_i | x_i)
            (grad,) = torch.autograd.grad(selected, x_in)
        return D + self.scale * sigma.view(-1, 1, 1, 1).to(D) ** 2 * grad.to(D)
