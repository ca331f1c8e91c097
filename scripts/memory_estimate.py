"""Memory per rank of Diffusion2GAN on SD 1.5 under DDP vs FSDP2, estimated on the meta device.

    python scripts/memory_estimate.py [--world_sizes 1 4 8 16] [--out table.md]

Builds ``configs/d2g_sd15.yaml``'s ``Diffusion2GANModule`` with cm's own classes
(``StableDiffusionDenoiser``, ``SDDiscriminator``, ``ELatentLPIPS``, ``cm.vae.VAE``, the EMA copy)
on the ``meta`` device from SD 1.5's published ``config.json`` files (no weights: diffusers'
``from_pretrained`` is replaced by ``from_config`` on meta while building), then:

- counts the model state per rank (arithmetic on the real parameter counts): trainable fp32
  parameters, fp32 gradients, Adam's two fp32 moments, the EMA copy of G and the frozen modules
  in their dtype (both replicated under both strategies); DDP adds its gradient buckets (one more
  fp32 gradient copy); FSDP2 full sharding (``cm.training.FSDP``, ``configs/strategies/fsdp.yaml``)
  divides parameters, gradients and moments by the world size and adds its unsharded buffers:
  every root's own parameters (roots stay gathered), plus three copies of the largest unit (one
  gathered, one prefetched, one unsharded gradient before its reduce-scatter), the units being
  those ``cm.training.FSDP`` makes (``fsdp_units``);
- measures the tensors autograd saves for backward in the real ``generator_loss`` and
  ``discriminator_loss`` (with lazy R1) at the config's per-rank batch, with a saved-tensor hook
  (unique storages, parameters excluded), under an emulation of bf16 autocast (meta has none):
  matmuls, convolutions and attention in bf16, norms and softmax in fp32, bf16 weight copies
  cached like autocast's; attention saves what a fused (flash) kernel saves, R1 runs the math
  kernel as in training. Then again with diffusers' gradient checkpointing on both U-Nets
  (``enable_gradient_checkpointing``; ``SDDiscriminator`` calls the resnets itself, so in D
  only the transformer blocks are checkpointed), adding the checkpoints' inputs and the largest
  block recomputed in backward.

Not counted: the CUDA context, allocator fragmentation, backward's transient gradients and
kernel workspaces, the CLIP text encoder (in the data workers, on the CPU).
"""

import argparse
import contextlib
import importlib
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import diffusers
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.fx.experimental import _config as fx_config
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import checkpoint

from cm.networks import stable_diffusion
from cm.networks.stable_diffusion import scheduler_betas
from cm.schedules import vp_sigmas
from cm.training.sharding import trainable_networks
from cm.training.sharding import units as sharding_units

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "d2g_sd15.yaml"
GiB = 2**30

# stable-diffusion-v1-5 unet/config.json, vae/config.json, scheduler/scheduler_config.json.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
)
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
)
TEXT_TOKENS = 77  # CLIP ViT-L/14 token embeddings [77, 768] per caption


# -- building the configured module on meta -----------------------------------------------------


def write_pipeline(root: Path, unet: dict, vae: dict, scheduler: dict) -> Path:
    """A diffusers pipeline folder of config files only (an empty placeholder weights file)."""
    for sub, name, config in [
        ("unet", "config.json", unet),
        ("vae", "config.json", vae),
        ("scheduler", "scheduler_config.json", scheduler),
    ]:
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / name).write_text(json.dumps(config))
    (root / "vae" / "diffusion_pytorch_model.safetensors").touch()
    return root


@contextlib.contextmanager
def weightless_diffusers() -> Iterator[None]:
    """``from_pretrained`` builds diffusers' U-Net and VAE from ``config.json`` on meta.

    No weights are read; the DDPM betas stay on the CPU (cm reads sigmas from them while
    building).
    """

    def from_pretrained(cls, path, torch_dtype=torch.float32, **_: Any) -> nn.Module:
        config = json.loads((Path(path) / "config.json").read_text())
        with torch.device("meta"):
            model = cls.from_config(config)
        return model if torch_dtype == torch.float32 else model.to(torch_dtype)

    def betas(config: dict) -> Tensor:
        with torch.device("cpu"):
            return scheduler_betas(config)

    with contextlib.ExitStack() as stack:
        for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL):
            patch = mock.patch.object(cls, "from_pretrained", classmethod(from_pretrained))
            stack.enter_context(patch)
        stack.enter_context(mock.patch.object(stable_diffusion, "scheduler_betas", betas))
        yield


def instantiate(config: Any) -> Any:
    """Build a ``{class_path, init_args}`` config of this repository's YAML (nested ones too)."""
    if isinstance(config, dict) and "class_path" in config:
        module, name = config["class_path"].rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: instantiate(v) for k, v in config.get("init_args", {}).items()})
    if isinstance(config, dict):
        return {k: instantiate(v) for k, v in config.items()}
    return config


def build_d2g(config: dict, pipeline: Path) -> nn.Module:
    """The config's ``Diffusion2GANModule`` on meta, its U-Nets and VAE read from ``pipeline``.

    The optimizer factories are left out (their two Adam moments are counted by
    ``model_state``) and E-LatentLPIPS gets no weights file (the same modules, untrained).
    """
    model = json.loads(json.dumps(config["model"]))  # a deep copy
    args = model["init_args"]
    for key in ("optimizer", "discriminator_optimizer"):
        args.pop(key, None)
    args["denoiser"]["init_args"]["path"] = str(pipeline)
    args["discriminator"]["init_args"]["path"] = str(pipeline)
    args["distance"]["init_args"]["path"] = None
    with weightless_diffusers(), torch.device("meta"):
        module = instantiate(model)
    return module.to("meta")  # the betas and sigma tables too


@dataclass
class Parts:
    """The networks of one run by role: trained (fp32), EMA copies, frozen (replicated)."""

    trainable: dict[str, nn.Module]
    ema: dict[str, nn.Module]
    frozen: dict[str, nn.Module]


def d2g_parts(module: nn.Module) -> Parts:
    """G, D, G's EMA copy, E-LatentLPIPS and G's VAE (held outside the module tree)."""
    frozen = {"E-LatentLPIPS": module.distance}
    if getattr(module.denoiser, "vae", None) is not None:
        frozen["VAE"] = module.denoiser.vae
    ema = {"EMA of G": module.ema_denoiser} if module.ema_denoiser is not None else {}
    trainable = {"G": module.denoiser, "D": module.discriminator}
    # What cm.training.FSDP shards: exactly these two networks.
    assert {id(n) for n in trainable_networks(module)} == {id(n) for n in trainable.values()}
    return Parts(trainable, ema, frozen)


# -- model state: arithmetic on the parameter counts ---------------------------------------------


def trainable_bytes(net: nn.Module) -> int:
    """Bytes of the parameters that train (fp32 master weights)."""
    return sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)


def all_bytes(net: nn.Module) -> int:
    """Bytes of every parameter and buffer in its own dtype."""
    return sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])


def fsdp_units(net: nn.Module) -> tuple[int, list[int]]:
    """Trainable bytes of the root's own parameters and of each FSDP2 unit inside ``net``.

    The units of ``cm.training.FSDP`` (``cm.training.sharding.units``, ``min_block_params: 0``):
    the network's blocks, then every other layer with weights of its own and a forward; a
    parameter belongs to its innermost unit.
    """
    units = sharding_units(net)
    owner: dict[int, int] = {}
    # A unit inside another has no more parameters: assigning the largest first leaves each
    # parameter with its innermost unit.
    for i, unit in sorted(enumerate(units), key=lambda u: -sum(1 for _ in u[1].parameters())):
        owner |= {id(p): i for p in unit.parameters()}
    sizes: dict[int, int] = {}
    root = 0
    for p in net.parameters():
        if p.requires_grad:
            n = p.numel() * p.element_size()
            if id(p) in owner:
                sizes[owner[id(p)]] = sizes.get(owner[id(p)], 0) + n
            else:
                root += n
    return root, list(sizes.values())


def model_state(parts: Parts, world_size: int, strategy: str, adam_moments: int = 2) -> dict:
    """Bytes per rank of the model state under ``strategy`` (``ddp`` or ``fsdp``).

    Parameters, gradients, Adam moments, EMA, the strategy's buffers and the frozen modules; the
    module docstring says what DDP and FSDP2 add.
    """
    params = sum(trainable_bytes(net) for net in parts.trainable.values())
    rows = {"parameters": params, "gradients": params, "Adam": adam_moments * params}
    match strategy:
        case "ddp":
            rows["buffers"] = params  # gradient buckets: one more flat fp32 gradient copy
        case "fsdp":
            rows = {k: v / world_size for k, v in rows.items()}
            units = [fsdp_units(net) for net in parts.trainable.values()]
            largest = max(max(sizes, default=0) for _, sizes in units)
            rows["buffers"] = sum(root for root, _ in units) + 3 * largest
        case _:
            raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    # cm.training.FSDP keeps the evaluation EMA replicated, like the frozen networks.
    ema = sum(p.numel() * p.element_size() for net in parts.ema.values() for p in net.parameters())
    rows["EMA"] = ema
    rows["frozen"] = sum(all_bytes(net) for net in parts.frozen.values())
    return rows


# -- activations: tensors saved for backward, measured on meta -----------------------------------


def storage_key(t: Tensor) -> int:
    """Identity of ``t``'s storage (views share it); meta storages have one too."""
    return t.untyped_storage()._cdata


class SavedTensors:
    """Unique storages saved for backward (``saved_tensors_hooks``), by kind, minus ``exclude``.

    Holds a reference to every tensor it counts, so no storage key is reused while it lives.
    """

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.storages: dict[int, tuple[int, str, Tensor]] = {}
        self.recompute = 0

    def add(self, t: Tensor, kind: str = "activations") -> None:
        """Count ``t``'s storage once, under ``kind``, unless excluded or already counted."""
        key = storage_key(t)
        if key not in self.exclude and key not in self.storages:
            self.storages[key] = (t.untyped_storage().nbytes(), kind, t)

    def pack(self, t: Tensor) -> Tensor:
        """The pack hook."""
        self.add(t)
        return t

    def summary(self, mode: "MetaAutocast") -> dict[str, int]:
        """Bytes by kind: activations, weight copies, checkpoint inputs, recomputation.

        Weight copies are autocast's bf16 copies, saved for backward or alive in its cache.
        """
        out = dict.fromkeys(["activations", "weight copies", "checkpoint inputs"], 0)
        for key, (n, kind, _) in self.storages.items():
            out["weight copies" if key in mode.copies else kind] += n
        for copy in mode.cache.values():
            if storage_key(copy) not in self.storages:
                out["weight copies"] += copy.untyped_storage().nbytes()
        return out | {"recompute": self.recompute}


LOWER = {F.linear, F.conv2d, F.conv_transpose2d, torch.matmul, torch.bmm, torch.baddbmm}
LOWER |= {torch.mm, torch.addmm, torch.Tensor.matmul, torch.Tensor.__matmul__}
LOWER |= {F.scaled_dot_product_attention}
FLOAT32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax}


class FusedAttention(torch.autograd.Function):
    """What a fused (flash) SDPA kernel keeps for backward: q, k, v, output, row log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # noqa: D102
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: D102
        return tuple(torch.zeros_like(t) for t in ctx.saved_tensors[:3])


class MetaAutocast(TorchFunctionMode):
    """bf16 autocast emulated on meta, which has none (CUDA autocast's lists, in short).

    Matmuls, convolutions and attention in bf16, norms and softmax in fp32, copies of trainable
    weights cached (as autocast's cache); attention goes through ``FusedAttention`` unless the
    math kernel is forced (R1's double backward).
    """

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.cache: dict[int, Tensor] = {}
        self.copies: set[int] = set()
        self.keep: list[Tensor] = []

    def cast(self, x: Any, dtype: torch.dtype) -> Any:
        """``x`` in ``dtype``; a parameter's copy is recorded (and cached if it trains)."""
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return x
        if not isinstance(x, nn.Parameter):
            return x.to(dtype)
        if id(x) not in self.cache:
            y = x.to(dtype)
            self.copies.add(storage_key(y))
            self.keep.append(y)
            if not x.requires_grad:
                return y
            self.cache[id(x)] = y
        return self.cache[id(x)]

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if self.enabled and (func in LOWER or func in FLOAT32):
            dtype = torch.bfloat16 if func in LOWER else torch.float32
            args, kwargs = tree_map(lambda x: self.cast(x, dtype), (args, kwargs))
            fused = torch.backends.cuda.flash_sdp_enabled()  # off under sdpa_kernel(MATH)
            attention = func is F.scaled_dot_product_attention
            if attention and fused and kwargs.get("attn_mask") is None and len(args) == 3:
                return FusedAttention.apply(*args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_autocast(mode: MetaAutocast) -> Iterator[None]:
    """``torch.autocast("meta", enabled=...)``, ``is_autocast_enabled("meta")`` drive ``mode``."""
    real_autocast, real_enabled = torch.autocast, torch.is_autocast_enabled

    @contextlib.contextmanager
    def autocast(device_type: str, *args: Any, enabled: bool = True, **kwargs: Any):
        if device_type != "meta":
            with real_autocast(device_type, *args, enabled=enabled, **kwargs):
                yield
            return
        before, mode.enabled = mode.enabled, enabled
        try:
            yield
        finally:
            mode.enabled = before

    def is_enabled(*args: Any) -> bool:
        return mode.enabled if args and str(args[0]) == "meta" else real_enabled(*args)

    with (
        mock.patch("torch.autocast", autocast),
        mock.patch("torch.is_autocast_enabled", is_enabled),
        mode,
    ):
        yield


def autocast_on(mode: MetaAutocast, block: nn.Module, *args: Any) -> Any:
    """``block(*args)`` under ``mode``, also when the backward pass recomputes it.

    R1's ``autograd.grad`` is a torch function, whose handler runs with the mode off; the
    recomputation of a checkpointed block must match its forward.
    """
    if any(m is mode for m in _get_current_function_mode_stack()):
        return block(*args)
    with mode:
        return block(*args)


def unets(module: nn.Module) -> list[nn.Module]:
    """The diffusers U-Nets of G and D."""
    return [m for m in module.modules() if type(m).__name__ == "UNet2DConditionModel"]


def measure(
    module: nn.Module, step: Callable[[], Any], checkpointing: bool, mode: MetaAutocast
) -> dict[str, int]:
    """Bytes saved for backward by ``step()`` of ``module`` (one graph) under ``mode``.

    ``mode`` is the training step's autocast region: its cache of weight copies carries over.
    """
    exclude = {storage_key(t) for t in [*module.parameters(), *module.buffers()]}
    saved = SavedTensors(exclude)

    def checkpointed(block: nn.Module, *args: Any) -> Any:
        for a in args:
            if isinstance(a, Tensor):
                saved.add(a, "checkpoint inputs")
        inner = SavedTensors(exclude | set(saved.storages) | mode.copies)
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, lambda t: t):
            block(*args)  # what the backward pass recomputes, live until the block's backward
        saved.recompute = max(saved.recompute, sum(n for n, _, _ in inner.storages.values()))
        return checkpoint(partial(autocast_on, mode, block), *args, use_reentrant=False)

    for unet in unets(module):
        if checkpointing:
            unet.enable_gradient_checkpointing(checkpointed)
        else:
            unet.disable_gradient_checkpointing()
    # mix-and-match's row indices depend on data: meta's nonzero() may assume all rows.
    nonzero = mock.patch.object(fx_config, "meta_nonzero_assume_all_nonzero", True)
    hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)
    with nonzero, meta_autocast(mode), hooks:
        out = step()
    del out
    return saved.summary(mode)


def d2g_activations(
    module: nn.Module, batch: int, checkpointing: bool, sigma_max: float
) -> dict[str, dict[str, int]]:
    """Saved bytes of the G step (with the GAN term) and of the D step (with lazy R1)."""
    net = module.denoiser.net
    res = net.img_resolution
    z, x, x_hat = (torch.empty(batch, net.in_channels, res, res, device="meta") for _ in range(3))
    labels = torch.empty(batch, TEXT_TOKENS, net.context_dim, device="meta")
    module.train()
    # After the GAN warm-up, on a lazy R1 iteration; one rank holds the whole batch and R1.
    module.iteration = -(-module.gan_start // module.r1_interval) * module.r1_interval
    module.draws.set(0, 0, batch)
    # The meta module cannot compute G's input noise level; it changes no shape.
    # One autocast region per training step (Lightning's precision plugin wraps training_step,
    # manual backward included): the cached bf16 copies of G's weights outlive the G step.
    mode = MetaAutocast()
    with mock.patch.object(type(module), "sigma_max", sigma_max):
        g = measure(module, lambda: module.generator_loss(z, x, labels), checkpointing, mode)
        d_loss = lambda: module.discriminator_loss(z, x, x_hat, labels)  # noqa: E731
        d = measure(module, d_loss, checkpointing, mode)
    return {"G step": g, "D step": d}


# -- the estimate and its table ------------------------------------------------------------------


@dataclass
class Row:
    """Memory per rank of one strategy at one world size (bytes)."""

    world_size: int
    batch: int
    strategy: str
    state: dict[str, float]
    steps: dict[bool, dict[str, dict[str, int]]]  # checkpointing -> step -> kind -> bytes

    def activations(self, checkpointing: bool) -> int:
        """The larger step's saved bytes (G's graph is freed before D's step)."""
        return max(sum(kinds.values()) for kinds in self.steps[checkpointing].values())

    def total(self, checkpointing: bool) -> float:
        """Model state plus the larger step's saved bytes."""
        return sum(self.state.values()) + self.activations(checkpointing)


def estimate(
    config: dict,
    unet: dict = SD15_UNET,
    vae: dict = SD15_VAE,
    scheduler: dict = SD15_SCHEDULER,
    world_sizes: Iterable[int] = (1, 4, 8, 16),
    global_batch: int | None = None,
) -> tuple[Parts, list[Row]]:
    """The parts of ``config``'s Diffusion2GAN run on meta and its rows, DDP and FSDP per size.

    Args:
        config: a Diffusion2GAN training config (``configs/d2g_sd15.yaml`` read as a dict).
        unet: the U-Net's diffusers ``config.json`` (G and D).
        vae: the VAE's ``config.json``.
        scheduler: the scheduler's config (its betas give G's input noise level).
        world_sizes: numbers of ranks.
        global_batch: pairs per optimizer step over all ranks; None: the config's.
    """
    global_batch = global_batch or int(config["data"]["init_args"]["batch_size"])
    with tempfile.TemporaryDirectory() as tmp:
        module = build_d2g(config, write_pipeline(Path(tmp), unet, vae, scheduler))
    parts = d2g_parts(module)
    sigma_max = float(vp_sigmas(scheduler_betas(scheduler))[-1])
    rows, steps = [], {}
    for world in world_sizes:
        if global_batch % world:
            raise SystemExit(f"error: the global batch {global_batch} does not split over {world}")
        batch = global_batch // world
        if batch not in steps:
            steps[batch] = {c: d2g_activations(module, batch, c, sigma_max) for c in (False, True)}
        for strategy in ("ddp", "fsdp"):
            state = model_state(parts, world, strategy)
            rows.append(Row(world, batch, strategy, state, steps[batch]))
    return parts, rows


def gib(n: float) -> str:
    """``n`` bytes in GiB, two decimals."""
    return f"{n / GiB:.2f}"


def markdown(parts: Parts, rows: list[Row]) -> str:
    """The tables of docs/benchmarks.md: parameters, memory per rank, the steps' saved tensors."""
    counts = [("trained (fp32, Adam)", parts.trainable), ("EMA (fp32)", parts.ema)]
    counts.append(("frozen, replicated", parts.frozen))
    lines = ["| network | role | parameters | GiB |", "|---|---|---:|---:|"]
    for role, nets in counts:
        for name, net in nets.items():
            n = sum(p.numel() for p in net.parameters())
            lines.append(f"| {name} | {role} | {n:,} | {gib(all_bytes(net))} |")
    head = ["ranks", "batch/rank", "strategy", "params", "grads", "Adam", "EMA", "buffers"]
    head += ["frozen", "state", "act.", "**total**", "act. (ckpt)", "**total (ckpt)**"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        cells = [str(r.world_size), str(r.batch), r.strategy.upper()]
        cells += [gib(r.state[k]) for k in ("parameters", "gradients", "Adam", "EMA", "buffers")]
        cells += [gib(r.state["frozen"]), gib(sum(r.state.values()))]
        for c in (False, True):
            cells += [gib(r.activations(c)), f"**{gib(r.total(c))}**"]
        lines.append("| " + " | ".join(cells) + " |")
    kinds = ["activations", "weight copies", "checkpoint inputs", "recompute"]
    lines += ["", "| batch/rank | checkpointing | step | " + " | ".join(kinds) + " | sum |"]
    lines.append("|---:|---|---|" + "---:|" * (len(kinds) + 1))
    seen = {}
    for r in rows:
        seen.setdefault(r.batch, r.steps)
    for batch, steps in seen.items():
        for c, by_step in steps.items():
            for step, k in by_step.items():
                cells = [gib(k[n]) for n in kinds] + [gib(sum(k.values()))]
                lines.append(
                    f"| {batch} | {'yes' if c else 'no'} | {step} | " + " | ".join(cells) + " |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Print (and with ``--out`` write) the tables for the given world sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG), help="a Diffusion2GAN SD config")
    parser.add_argument("--world_sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--global_batch", type=int, default=None, help="default: the config's")
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    text = markdown(*estimate(config, world_sizes=args.world_sizes, global_batch=args.global_batch))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
