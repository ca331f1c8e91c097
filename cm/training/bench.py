"""``cm bench train`` and ``cm bench sample``: training throughput, FLOPs, MFU; sampling speed.

The module and data module are built from the YAML exactly as ``cm fit`` builds them (the same
LightningCLI parser: repeated ``--config``, dotted overrides, ``class_path`` objects), and the
timed step is the real Lightning training step: a ``Trainer`` with the config's accelerator,
devices, strategy, precision plugin and gradient accumulation runs ``warmup + steps`` steps with
a timing callback. Timing ``training_step`` + backward + ``optimizer.step`` by hand would skip
what Lightning adds per step (autocast and the precision plugin, DDP gradient all-reduce, manual
optimisation of Diffusion2GAN, the EMA update in ``optimizer_step``) and so would measure a
program that never trains anything. Only the loggers, checkpointing, validation and progress bar
of the config are left out.
"""

import math
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import ArgumentParser
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from cm.bench.report import markdown_rows, write_rows
from cm.bench.sampling import measure_peak_tflops, synchronize, time_sampling
from cm.errors import UserError
from cm.files import add_overwrite_argument, check_output
from cm.training.speed import Compile, CompileMode, prepare
from cm.trust import add_trust_option

# Trainer settings that change what one training step computes; the rest of the config's trainer
# (loggers, checkpoints, validation, max_steps) is replaced by the benchmark's own.
STEP_KEYS = (
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "benchmark",
)


class StepTimer(L.Callback):
    """Wall time between consecutive training-batch ends, FLOPs of the first step, peak memory.

    The interval between two ``on_train_batch_end`` calls is everything the loop does per
    (micro-)batch: data fetch, forward, backward, optimizer and EMA. FLOPs are counted by
    ``torch.utils.flop_counter.FlopCounterMode`` around the first step (matmuls, convolutions
    and attention of forward and backward, as MFU conventionally counts them).

    Args:
        warmup: untimed batches before the first interval (compilation, autotuning).
        count_flops: count FLOPs in the first batch (eager runs only).
    """

    def __init__(self, warmup: int, count_flops: bool = True) -> None:
        if warmup < 1:
            raise UserError("--warmup must be >= 1: the first timed interval starts at its end.")
        self.warmup, self.count_flops = warmup, count_flops
        self.ends: list[float] = []
        self.flops: int | None = None
        self.device = torch.device("cpu")
        self._counter: FlopCounterMode | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if self.count_flops and self.flops is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = self._counter.get_total_flops(), None
        # Kept: after fit, Lightning's teardown moves the module back to the CPU.
        self.device = pl_module.device
        synchronize(self.device)
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.warmup and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def seconds(self) -> list[float]:
        """Durations of the timed batches (after warm-up)."""
        timed = self.ends[self.warmup - 1 :]
        return [b - a for a, b in zip(timed, timed[1:], strict=False)]


class SyntheticData(L.LightningDataModule):
    """Random images and one-hot labels of a data module's shape: benchmarks without the data.

    Args:
        resolution: image height and width.
        channels: image channels.
        label_dim: one-hot label length (0: unlabelled).
        batch_size: global batch per optimizer step, as ``ImageDataModule.batch_size``.
        num_batches: distinct batches cycled through.
    """

    def __init__(
        self, resolution: int, channels: int, label_dim: int, batch_size: int, num_batches: int = 4
    ) -> None:
        super().__init__()
        self.resolution, self.channels, self.label_dim = resolution, channels, label_dim
        self.batch_size, self.num_batches = batch_size, num_batches

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        world, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
        micro = self.batch_size // (world * accumulate)
        n = micro * self.num_batches
        generator = torch.Generator().manual_seed(0)
        x0 = torch.rand(n, self.channels, self.resolution, self.resolution, generator=generator)
        classes = torch.randint(max(self.label_dim, 1), (n,), generator=generator)
        labels = torch.eye(self.label_dim)[classes] if self.label_dim else torch.empty(n, 0)
        return DataLoader(TensorDataset(2 * x0 - 1, labels), batch_size=micro, drop_last=True)


def _cli(args: Sequence[str]):
    """The config's module, data module and trainer settings, parsed as ``cm fit`` does."""
    from cm.cli import CMCLI

    class BenchCLI(CMCLI):
        """Parse and instantiate like ``cm fit``, but keep the trainer settings unbuilt."""

        def instantiate_trainer(self, **kwargs: Any) -> None:
            self.trainer_config = self._get(self.config_init, "trainer", default={})

    with warnings.catch_warnings():
        # `cm bench train` passes the config arguments explicitly, the rest of argv is its own.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from.*")
        return BenchCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=list(args),
            run=False,
            seed_everything_default=0,
            auto_configure_optimizers=False,
        )


def _split(argv: Sequence[str], names: set[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into the benchmark's own options (``names``) and the config arguments."""
    own, rest, argv = [], [], list(argv)
    while argv:
        token = argv.pop(0)
        name = token.split("=", 1)[0]
        if name in names or name in ("-h", "--help"):
            own.append(token)
            if "=" not in token and name not in ("-h", "--help", "--overwrite") and argv:
                own.append(argv.pop(0))
        else:
            rest.append(token)
    return own, rest


def _configs(args: Sequence[str]) -> list[str]:
    """The ``--config`` files among the config arguments (inputs the CSV must not replace)."""
    found = [value for a, value in zip(args, args[1:], strict=False) if a == "--config"]
    return found + [a.removeprefix("--config=") for a in args if a.startswith("--config=")]


def _device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} x{torch.get_num_threads()} threads"


def _peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """CUDA ``max_memory_allocated`` since warm-up, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu peak rss"


def train_parser() -> ArgumentParser:
    """Options of ``cm bench train`` (every other argument goes to the ``cm fit`` parser)."""
    p = ArgumentParser(
        prog="cm bench train",
        description="Time the real training step of a config: images/s, step time, peak memory, "
        "FLOPs per step, TFLOP/s and MFU, eager and compiled. All other arguments (--config, "
        "--model..., --trainer..., --data...) are those of cm fit.",
    )
    p.add_argument("--warmup", type=int, default=5, help="Untimed steps first (>= 1).")
    p.add_argument("--steps", type=int, default=20, help="Timed (micro-batch) steps.")
    p.add_argument(
        "--compile",
        type=CompileMode | Literal["none"] | None,
        default=None,
        help="Also time the network under torch.compile with this mode; none: eager only "
        "(default: the mode of the config's cm.training.speed.Compile callback, if any).",
    )
    p.add_argument("--backend", type=str, default="inductor", help="torch.compile backend.")
    p.add_argument(
        "--channels_last",
        type=bool | None,
        default=None,
        help="NHWC network in both runs (default: as the config's Compile callback, else off).",
    )
    p.add_argument(
        "--peak_tflops",
        type=float | None,
        default=None,
        help="Device peak for MFU; default: measured bf16 matmul on CUDA, unknown (n/a) on CPU.",
    )
    p.add_argument(
        "--synthetic",
        type=bool,
        default=False,
        help="Random images of the data module's shape and batch instead of reading the data.",
    )
    p.add_argument("--out", type=str, default="bench/train.csv", help="CSV file written.")
    add_overwrite_argument(p)
    return p


def _run(cli, opts, speed: Compile, count_flops: bool) -> dict[str, Any] | None:
    """Run the timed fit of a freshly built ``_cli``; rank 0 returns its row."""
    model, data = cli.model, cli.datamodule
    if opts.synthetic:
        if not hasattr(data, "resolution"):
            raise UserError(
                f"--synthetic replaces image data modules only, not {type(data).__name__}: "
                "drop --synthetic and point the config at its data."
            )
        data = SyntheticData(data.resolution, data.channels, data.label_dim, data.batch_size)
    settings = {k: v for k, v in cli.trainer_config.items() if k in STEP_KEYS and v is not None}
    accumulate = settings.get("accumulate_grad_batches", 1)
    timer = StepTimer(opts.warmup, count_flops)
    trainer = L.Trainer(
        **settings,
        max_steps=math.ceil((opts.warmup + opts.steps) / accumulate),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[speed, timer],
    )
    trainer.fit(model, datamodule=data)
    if not trainer.is_global_zero:
        return None
    seconds = timer.seconds()
    if not seconds:
        raise UserError("No timed steps ran: the data ran out; lower --warmup/--steps.")
    device = timer.device
    mean = statistics.mean(seconds)
    micro = data.batch_size // (trainer.world_size * trainer.accumulate_grad_batches)
    memory, memory_kind = _peak_memory_gib(device)
    return {
        "run": f"compiled ({speed.mode})" if speed.compile else "eager",
        "device": _device_name(device),
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
        "channels_last": speed.channels_last,
        "batch_per_device": micro,
        "step_ms_mean": 1000 * mean,
        "step_ms_median": 1000 * statistics.median(seconds),
        "images_per_s": micro * trainer.world_size / mean,
        "peak_mem_gib": memory,
        "mem": memory_kind,
        "_flops": timer.flops,
        "_seconds": mean,
        "_device": device,
    }


def train_main(argv: Sequence[str]) -> list[dict[str, Any]]:
    """``cm bench train``: eager (and compiled) rows as a Markdown table and a CSV file."""
    own, args = _split(argv, {f"--{a.dest}" for a in train_parser()._actions})
    opts = train_parser().parse_args(own)
    if opts.steps < 1:
        raise UserError(f"--steps must be >= 1, got {opts.steps}.")
    check_output(opts.out, _configs(args), opts.overwrite)
    # The eager run's build also tells which Compile callback the config has; the compiled run
    # gets a fresh build (compilation is in place), made after the eager one is released.
    cli = _cli(args)
    configured = next(
        (c for c in cli.trainer_config.get("callbacks") or [] if isinstance(c, Compile)), None
    )
    channels_last = opts.channels_last
    if channels_last is None:
        channels_last = configured is not None and configured.channels_last
    mode = opts.compile or (configured.mode if configured is not None else None)
    mode = None if mode == "none" else mode
    rows = [_run(cli, opts, Compile(compile=False, channels_last=channels_last), True)]
    del cli
    if mode is not None:
        compiled = Compile(mode=mode, backend=opts.backend, channels_last=channels_last)
        rows.append(_run(_cli(args), opts, compiled, False))
    if rows[0] is None:  # not global rank 0
        return []
    peak, device = opts.peak_tflops, rows[0]["_device"]
    if peak is None and device.type == "cuda":
        peak = measure_peak_tflops(device, torch.bfloat16)
    flops = rows[0]["_flops"]
    for row in rows:
        seconds = row.pop("_seconds")
        row.pop("_flops"), row.pop("_device")
        row["tflop_per_step"] = flops / 1e12
        row["tflops_per_s"] = flops / seconds / 1e12
        row["peak_tflops"] = peak
        row["mfu"] = None if peak is None else row["tflops_per_s"] / peak
    if len(rows) == 2:
        rows[1]["speedup_vs_eager"] = rows[0]["step_ms_mean"] / rows[1]["step_ms_mean"]
        rows[0]["speedup_vs_eager"] = 1.0
    print(markdown_rows(rows))
    print(f"Wrote {write_rows(rows, opts.out)}", file=sys.stderr)
    return rows


def sample_parser() -> ArgumentParser:
    """Options of ``cm bench sample`` (other arguments build the model as ``cm fit`` does)."""
    p = ArgumentParser(
        prog="cm bench sample",
        description="Images/s of 1-step sampling vs N-step Heun at the same batch, for the "
        "denoiser of a checkpoint (--ckpt_path) or of a config (--config ..., random weights).",
    )
    p.add_argument("--ckpt_path", type=str | None, default=None, help="A .ckpt or export dir.")
    p.add_argument("--batch_size", type=int, default=64, help="Images per solver call.")
    p.add_argument("--heun_steps", type=int, default=40, help="Heun steps (2n - 1 NFE; 40: 79).")
    p.add_argument("--warmup", type=int, default=2, help="Untimed calls of each solver.")
    p.add_argument("--repeats", type=int, default=5, help="Timed calls of each solver.")
    p.add_argument("--precision", type=Literal["32", "bf16"], default="32", help="bf16: autocast.")
    p.add_argument(
        "--compile", type=CompileMode | None, default=None, help="torch.compile mode of the net."
    )
    p.add_argument("--backend", type=str, default="inductor", help="torch.compile backend.")
    p.add_argument("--channels_last", type=bool, default=False, help="NHWC network.")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:1 or auto.")
    p.add_argument("--out", type=str, default="bench/sample.csv", help="CSV file written.")
    add_overwrite_argument(p)
    add_trust_option(p)
    return p


def sample_main(argv: Sequence[str]) -> list[dict[str, Any]]:
    """``cm bench sample``: 1-step vs N-step rows as a Markdown table and a CSV file."""
    from cm.io import image_spec, load_denoiser, resolve_device

    own, args = _split(argv, {f"--{a.dest}" for a in sample_parser()._actions})
    opts = sample_parser().parse_args(own)
    if (opts.ckpt_path is None) == (not args):
        raise UserError("cm bench sample needs either --ckpt_path or --config (not both).")
    check_output(opts.out, [opts.ckpt_path, *_configs(args)], opts.overwrite)
    if opts.ckpt_path is not None:
        denoiser, _ = load_denoiser(opts.ckpt_path, None, "auto", True, opts.trust_config)
    else:
        denoiser = _cli(args).model.eval_denoiser
    device = resolve_device(opts.device)
    denoiser = denoiser.to(device).eval().requires_grad_(False)
    shape, label_dim = image_spec(denoiser)
    net = getattr(denoiser, "net", denoiser)
    prepare(net, opts.compile is not None, opts.compile, backend=opts.backend,
            channels_last=opts.channels_last)  # fmt: skip
    autocast = torch.bfloat16 if opts.precision == "bf16" else None
    rows = time_sampling(
        denoiser, shape, label_dim, opts.batch_size, opts.heun_steps,
        warmup=opts.warmup, repeats=opts.repeats, autocast=autocast,
    )  # fmt: skip
    for row in rows:
        row["device"] = _device_name(device)
        row["precision"], row["compile"] = opts.precision, opts.compile or "eager"
    print(markdown_rows(rows))
    print(f"Wrote {write_rows(rows, opts.out)}", file=sys.stderr)
    return rows
