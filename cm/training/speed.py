"""Speed callbacks: ``torch.compile`` of the networks and the channels-last memory format.

Everything here is configuration of PyTorch's own machinery (``nn.Module.compile``,
``memory_format``); mixed precision and DDP stay with Lightning's ``precision`` and ``strategy``.
"""

import functools
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

from cm.errors import UserError

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the image input ``args[0]`` (4-D) in channels-last layout."""
    x, *rest = args
    if isinstance(x, Tensor) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, *rest)


def find_submodule(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted attribute ``path`` of ``root`` (e.g. ``"denoiser.net"``)."""
    try:
        module = functools.reduce(getattr, path.split("."), root)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Module):
        raise UserError(
            f"Compile: {type(root).__name__} has no submodule {path!r}; list existing ones in "
            "Compile's modules, e.g. denoiser.net."
        )
    return module


def prepare(
    module: nn.Module,
    compile: bool = True,
    mode: CompileMode | None = "max-autotune-no-cudagraphs",
    fullgraph: bool = False,
    dynamic: bool | None = False,
    backend: str = "inductor",
    channels_last: bool = True,
) -> nn.Module:
    """Make ``module`` channels-last and compile it in place; returns ``module`` itself.

    ``nn.Module.compile`` compiles the module's ``__call__`` without wrapping it, so parameter
    names, ``state_dict`` keys and ``deepcopy`` (EMA, target networks) are those of the eager
    module and checkpoints written with or without compilation load into each other.
    """
    if channels_last:
        # Convolutions in NHWC use the tensor-core kernels of cuDNN directly (no transposes);
        # weights and the image input both need the layout, the rest propagates.
        module.to(memory_format=torch.channels_last)
        module.register_forward_pre_hook(_channels_last_input)
    if compile:
        # Inductor-only options (mode) are rejected by other backends such as "aot_eager".
        options = {"mode": mode} if backend == "inductor" else {}
        module.compile(fullgraph=fullgraph, dynamic=dynamic, backend=backend, **options)
    return module


class Compile(L.Callback):
    """``torch.compile`` the network(s) of the LightningModule in place before DDP wraps them.

    Only the raw networks are compiled (by default ``denoiser.net``): the preconditioner's fp32
    scalings, the objective, ``self.log`` and the EMA stay eager, so logging never breaks a
    graph and the compiled graph is exactly the UNet forward (and its backward, via AOTAutograd).

    Runs in the ``setup`` hook: in Lightning 2.6 ``Trainer._run`` calls ``setup`` (callbacks,
    then the module), then ``configure_model``, and only then ``strategy.setup``, which moves the
    module to the device and wraps it in DDP/FSDP. Compiling there compiles the bare network
    (DDP's communication hooks stay outside the graph, as PyTorch recommends for DDP with
    ``torch.compile``) and the memory-format change happens before the optimizer is created.

    Args:
        modules: dotted attribute paths of the networks to compile, relative to the
            LightningModule. Diffusion2GAN's ``discriminator`` can be added when R1 is off
            (``r1_gamma: 0``): compiled graphs do not support R1's double backward.
        mode: inductor mode; ``max-autotune-no-cudagraphs`` autotunes matmul/conv kernels
            without CUDA graphs (which would pin the EMA/optimizer's memory per shape).
        fullgraph: fail on any graph break instead of falling back to eager for that part.
        dynamic: dynamic shapes; ``False`` specialises on the (fixed) training batch shape.
        backend: ``inductor`` (default), or ``aot_eager``/``eager`` to debug tracing.
        channels_last: NHWC weights and inputs (pays for convolutions on tensor-core GPUs).
        compile: set False to keep only ``channels_last`` (eager baseline in benchmarks).
    """

    def __init__(
        self,
        modules: list[str] | None = None,
        mode: CompileMode | None = "max-autotune-no-cudagraphs",
        fullgraph: bool = False,
        dynamic: bool | None = False,
        backend: str = "inductor",
        channels_last: bool = True,
        compile: bool = True,
    ) -> None:
        self.modules = ["denoiser.net"] if modules is None else list(modules)
        self.mode, self.fullgraph, self.dynamic = mode, fullgraph, dynamic
        self.backend, self.channels_last, self.compile = backend, channels_last, compile
        self._done: set[int] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Compile each listed network once (``fit`` then ``validate`` reuse the same one)."""
        if "discriminator" in self.modules and getattr(pl_module, "r1_gamma", 0) > 0:
            if getattr(pl_module, "r1_interval", 0) > 0:
                raise UserError(
                    "Compile: a compiled discriminator cannot take R1's double backward; set "
                    "model.init_args.r1_gamma: 0 or drop 'discriminator' from Compile's modules."
                )
        for path in self.modules:
            module = find_submodule(pl_module, path)
            if id(module) in self._done:
                continue
            prepare(
                module,
                self.compile,
                self.mode,
                self.fullgraph,
                self.dynamic,
                self.backend,
                self.channels_last,
            )
            self._done.add(id(module))
