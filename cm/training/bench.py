"""The timed training step of ``cm bench train``: a step timer and the timed Lightning fit.

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
import time
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from cm.bench.sampling import synchronize
from cm.errors import UserError
from cm.training.speed import Compile

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


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} x{torch.get_num_threads()} threads"


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """CUDA ``max_memory_allocated`` since warm-up, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu peak rss"


def run_timed(cli, opts, speed: Compile, count_flops: bool) -> dict[str, Any] | None:
    """Run the timed fit of a freshly built bench CLI; rank 0 returns its row (else None)."""
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
    memory, memory_kind = peak_memory_gib(device)
    return {
        "run": f"compiled ({speed.mode})" if speed.compile else "eager",
        "device": device_name(device),
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
