"""ODE pairs for distillation: ``cm predict`` writes teacher (noise, image, label) shards.

``PairGenerator`` runs a frozen teacher with any ``cm`` solver from seeded noise,
``PairSeedDataModule`` hands each rank whole shards of seeds that are not on disk yet (so a
re-run resumes and never duplicates a seed), ``PairWriter`` writes each shard atomically and,
at the end, the index, and ``PairDataModule`` streams the pairs to a student.

Shard ``pairs-<first>-<last>.safetensors`` (seeds ``first..last`` inclusive, zero-padded) holds
``seeds`` int64 ``[N]``, ``z`` ``[N, C, H, W]`` (the unit-variance noise: the ODE starts at
``z * sigmas[0]``), ``x`` ``[N, C, H, W]`` (the teacher's endpoint, clamped to [-1, 1] as
``cm sample`` does before quantising) and, for class-conditional teachers, ``labels`` int64
``[N]`` (``seed % label_dim``); ``z`` and ``x`` in ``pair_dtype`` (float16 by default: half the disk
of float32, rounding error ~5e-4, below what a student regresses to). Its header metadata
repeats the generation settings, so every shard is self-describing. ``index.json`` lists the
finished shards of the planned seed range with their seed ranges and counts, plus the settings
(teacher, solver, sigma grid, CFG scale, image shape, label_dim, dtype); rank 0 writes it alone
after a barrier, from what is on disk, so ranks never race and a resumed run indexes all shards.

Text-to-image teachers (``captions``): seed ``s`` gets prompt ``s % len(prompts)`` of a captions
file, the teacher receives its token embeddings from a frozen ``TextEncoder`` as ``labels``
(CFG's unconditional branch gets the empty caption's), and each shard stores its prompts as a
JSON list in the header metadata key ``captions``; ``PairDataset`` yields them (or their
embeddings) in place of the one-hot label. For latent teachers set ``clamp: false``.
"""

import functools
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from cm.data.captions import read_prompts
from cm.errors import UserError
from cm.files import atomic_path
from cm.guidance import cfg
from cm.solvers.sampling import Sampler, SeededNoise, seed_labels

INDEX = "index.json"
SHARD_GLOB = "pairs-*.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def plan_shards(num: int, seed: int, shard_size: int) -> list[range]:
    """Seeds ``seed .. seed+num-1`` cut into consecutive shards of ``shard_size`` (last shorter)."""
    end = seed + num
    return [range(s, min(s + shard_size, end)) for s in range(seed, end, shard_size)]


def rank_shards(shards: list[range], rank: int, world_size: int) -> list[range]:
    """Rank ``rank``'s share of ``shards``: round-robin whole shards, disjoint and covering."""
    return shards[rank::world_size]


def shard_name(seeds: range) -> str:
    """File name of the shard holding ``seeds`` (zero-padded so names sort by seed)."""
    return f"pairs-{seeds[0]:09d}-{seeds[-1]:09d}.safetensors"


def read_shard_header(path: Path) -> dict[str, Any] | None:
    """Count and metadata of a shard; None when missing or unreadable (truncated, half-copied)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {"count": f.get_slice("seeds").get_shape()[0], **(f.metadata() or {})}
    except (OSError, SafetensorError):
        return None


def is_complete(root: Path, seeds: range) -> bool:
    """Whether the shard of ``seeds`` is on disk with all ``len(seeds)`` pairs."""
    header = read_shard_header(root / shard_name(seeds))
    return header is not None and header["count"] == len(seeds)


class PairGenerator(L.LightningModule):
    """Teacher ODE pairs ``(z, x = solver(teacher, z * sigma_max), label)`` for a seed batch.

    The teacher is frozen and, as a ``cm.io.PretrainedDenoiser``, never enters checkpoints.
    ``x`` for a seed equals ``Sampler.generate`` (``cm sample``) for that seed before uint8.

    Args:
        teacher: the denoiser, e.g. ``cm.io.PretrainedDenoiser`` (any format ``cm`` loads).
        sampler: solver and sigma grid (e.g. ``cm.solvers.heun`` with 18 steps, EDM Alg. 1, or
            ``cm.solvers.ddim``); stochastic solvers draw their extra noise from the seed too.
        cfg_scale: classifier-free guidance scale ``s`` (``cm.guidance.cfg``; 1 conditional);
            None: no guidance. The teacher must have been trained with label dropout.
        batch_size: seeds per forward pass (a shard is generated in chunks of this size).
        pair_dtype: storage type of ``z`` and ``x``.
        resolution: image size; None reads ``teacher.net.img_resolution``.
        channels: image channels; None reads ``teacher.net.in_channels``.
        label_dim: number of classes (0: unconditional); None reads ``teacher.net.label_dim``.
        captions: a prompts file (``.jsonl`` with ``text``/``caption``, or one per line) for a
            text-to-image teacher; seed ``s`` gets prompt ``s % len(prompts)``.
        text_encoder: encodes the prompts into the teacher's ``labels`` (``captions[N, L, D]``),
            e.g. ``cm.networks.text.TextEncoder``; required with ``captions``.
        uncond_caption: the caption of CFG's unconditional branch (``""`` for Stable
            Diffusion); None gives an all-zero context, as ``cm``'s label dropout trains.
        clamp: clamp ``x`` to [-1, 1] (pixels); false for latent teachers (Stable Diffusion).
    """

    def __init__(
        self,
        teacher: nn.Module,
        sampler: Sampler,
        cfg_scale: float | None = None,
        batch_size: int = 256,
        pair_dtype: Literal["float16", "bfloat16", "float32"] = "float16",
        resolution: int | None = None,
        channels: int | None = None,
        label_dim: int | None = None,
        captions: str | None = None,
        text_encoder: nn.Module | None = None,
        uncond_caption: str | None = "",
        clamp: bool = True,
    ) -> None:
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval()
        self.sampler, self.cfg_scale = sampler, cfg_scale
        self.batch_size, self.pair_dtype = batch_size, pair_dtype
        net = getattr(teacher, "net", None)
        sizes = {"resolution": resolution, "channels": channels, "label_dim": label_dim}
        keys = {"resolution": "img_resolution", "channels": "in_channels", "label_dim": "label_dim"}
        for name, key in keys.items():
            if sizes[name] is None:
                sizes[name] = getattr(net, key, 0 if name == "label_dim" else None)
            if sizes[name] is None:
                raise UserError(
                    f"The teacher has no net.{key}: set model.init_args.{name} explicitly."
                )
        res = int(sizes["resolution"])
        self.image_shape = (int(sizes["channels"]), res, res)
        self.label_dim = int(sizes["label_dim"])
        self.captions, self.uncond_caption, self.clamp = captions, uncond_caption, clamp
        self.prompts = read_prompts(captions) if captions else None
        if self.prompts is not None and text_encoder is None:
            raise UserError("captions need a text_encoder (e.g. cm.networks.text.TextEncoder).")
        # Frozen, and no submodule: it stays out of checkpoints and of the teacher's dtype casts.
        self._text_encoder = [text_encoder] if self.prompts is not None else []
        if self.prompts is not None:
            self.label_dim = 0  # the labels are text embeddings, not classes
        if cfg_scale is not None and self.label_dim == 0 and self.prompts is None:
            raise UserError("cfg_scale needs a class-conditional teacher: set it to null.")

    @property
    def denoiser(self) -> nn.Module:
        """The teacher, wrapped in classifier-free guidance when ``cfg_scale`` is set."""
        if self.cfg_scale is None:
            return self.teacher
        uncond = None  # all-zero labels
        if self.prompts is not None and self.uncond_caption is not None:
            uncond = self._encode([self.uncond_caption])[0]
        return cfg(self.teacher, self.cfg_scale, uncond)

    def _encode(self, prompts: list[str]) -> Tensor:
        """Token embeddings ``[N, L, D]`` of ``prompts`` on this module's device."""
        encoder = self._text_encoder[0].to(self.device)
        return encoder(prompts).to(self.device)

    def settings(self) -> dict[str, Any]:
        """What determines the pairs (recorded in every shard and the index; checked on resume)."""
        path = getattr(self.teacher, "path", None)
        text = {}
        if self.prompts is not None:  # only then: earlier shards' settings stay comparable
            encoder = self._text_encoder[0]
            name = getattr(encoder, "name", type(encoder).__name__)
            text = {"captions": os.path.realpath(self.captions), "text_encoder": name}
            if self.cfg_scale is not None:
                text["uncond_caption"] = self.uncond_caption
        if not self.clamp:
            text["clamp"] = False
        return {
            **text,
            "teacher": os.path.realpath(path) if path else type(self.teacher).__name__,
            "solver": _describe(self.sampler.solver),
            "sigmas": [round(s, 8) for s in self.sampler.grid(self.teacher).tolist()],
            "cfg_scale": self.cfg_scale,
            "image_shape": list(self.image_shape),
            "label_dim": self.label_dim,
            "dtype": self.pair_dtype,
        }

    def on_predict_start(self) -> None:
        """Refuse to run without a ``PairWriter``: the pairs would be generated and discarded."""
        if not any(isinstance(c, PairWriter) for c in self.trainer.callbacks):
            raise UserError(
                "Add cm.training.pairs.PairWriter to trainer.callbacks to save the pairs."
            )

    def predict_step(self, batch: Tensor, batch_idx: int) -> dict[str, Any]:
        """Pairs for one shard of seeds: ``seeds``, ``z``, ``x`` and ``labels`` or ``captions``."""
        seeds = batch.tolist()
        out: dict[str, list[Tensor]] = {"z": [], "x": [], "labels": []}
        dtype = DTYPES[self.pair_dtype]
        denoiser = self.denoiser  # built once per shard (CFG encodes the empty caption)
        prompts = [self.prompts[s % len(self.prompts)] for s in seeds] if self.prompts else None
        for first in range(0, len(seeds), self.batch_size):
            chunk = seeds[first : first + self.batch_size]
            labels = seed_labels(chunk, self.label_dim) if self.label_dim else None
            if prompts is not None:
                labels = self._encode(prompts[first : first + self.batch_size])
            x = self.sampler(denoiser, chunk, self.image_shape, labels, self.device)
            x = x.clamp(-1, 1) if self.clamp else x
            out["x"].append(x.to(dtype).cpu())
            # The sampler's first draw per seed is z (x_T = z * sigmas[0]); redraw it on the CPU.
            out["z"].append(SeededNoise(chunk).randn(self.image_shape).to(dtype))
            if labels is not None and prompts is None:
                out["labels"].append(labels.argmax(1))
        pairs: dict[str, Any] = {k: torch.cat(v) for k, v in out.items() if v}
        if prompts is not None:
            pairs["captions"] = prompts
        return {"seeds": torch.as_tensor(seeds, dtype=torch.int64), **pairs}


def _describe(fn: Any) -> str:
    """A stable name for a solver (``module.function``, with a partial's keywords)."""
    if isinstance(fn, functools.partial):
        kwargs = ", ".join(f"{k}={v!r}" for k, v in sorted(fn.keywords.items()))
        return f"{_describe(fn.func)}({kwargs})"
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


class PairSeedDataModule(L.LightningDataModule):
    """Seeds for ``cm predict`` of ODE pairs: one batch per shard still missing from ``root``.

    Rank 0 lists the unfinished shards and broadcasts the list before anyone writes; each rank
    takes whole shards round-robin (``rank_shards``). A crashed run re-run with the same
    arguments generates only the missing or incomplete shards.

    Args:
        root: the shard directory (``PairDataModule``'s ``root``).
        num: number of pairs (seeds ``seed .. seed+num-1``).
        seed: first seed.
        shard_size: pairs per shard file.
    """

    def __init__(
        self, root: str = "pairs", num: int = 1024, seed: int = 0, shard_size: int = 1024
    ) -> None:
        super().__init__()
        if num < 1 or shard_size < 1:
            raise UserError(f"num and shard_size must be positive, got {num} and {shard_size}.")
        self.root, self.num, self.seed, self.shard_size = Path(root), num, seed, shard_size

    def plan(self) -> list[range]:
        """All shards of this run, in seed order."""
        return plan_shards(self.num, self.seed, self.shard_size)

    def predict_dataloader(self) -> DataLoader:
        """Unfinished shards of this rank, each one batch of seeds."""
        world, rank, todo = 1, 0, None
        if self.trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
        if rank == 0:
            todo = [s for s in self.plan() if not is_complete(self.root, s)]
            rank_zero_info(f"ODE pairs: {len(todo)} of {len(self.plan())} shards to generate")
        if self.trainer is not None:
            todo = self.trainer.strategy.broadcast(todo, src=0)
        # An iterable dataset: Lightning would split a map-style one over ranks a second time.
        return DataLoader(_ShardSeeds(rank_shards(todo, rank, world)), batch_size=None)


class _ShardSeeds(IterableDataset):
    """Yield one int64 seed tensor per shard."""

    def __init__(self, shards: list[range]) -> None:
        self.shards = shards

    def __iter__(self) -> Iterator[Tensor]:
        """Seeds of each shard in turn."""
        for shard in self.shards:
            yield torch.tensor(shard, dtype=torch.int64)


class PairWriter(BasePredictionWriter):
    """Write each predicted shard atomically into ``PairSeedDataModule.root``, then the index.

    A shard goes to a temporary file and is renamed into place, so a file under its final name
    is always complete; predictions are not also kept in memory. At the end rank 0 checks the
    settings of every planned shard and writes ``index.json`` (also atomically).
    """

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the pieces fit: a ``PairSeedDataModule`` and a ``PairGenerator``."""
        # Shards carry their seeds; Lightning's per-batch dataset indices are not needed.
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched")
        if stage == "predict" and not (
            isinstance(trainer.datamodule, PairSeedDataModule)
            and isinstance(pl_module, PairGenerator)
        ):
            raise UserError(
                "PairWriter needs model cm.training.pairs.PairGenerator and data "
                "cm.training.pairs.PairSeedDataModule (see configs/pairs_digits.yaml)."
            )

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse to mix pairs of other settings into ``root``; keep no copy of predictions."""
        # Every shard already goes to disk; the loop's list would grow with the whole data set.
        trainer.predict_loop.return_predictions = False
        root, settings = trainer.datamodule.root, pl_module.settings()
        for path in sorted(root.glob(SHARD_GLOB)):
            header = read_shard_header(path)
            if header is not None:
                _check_settings(root, json.loads(header["settings"]), settings)
                break
        root.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(  # noqa: D102 - Lightning hook
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        seeds = prediction["seeds"].cpu()
        first, last = int(seeds[0]), int(seeds[-1])
        metadata = {"settings": json.dumps(pl_module.settings())}
        if "captions" in prediction:  # strings go to the header, next to the settings
            metadata["captions"] = json.dumps(prediction["captions"])
        tensors = {
            k: v.detach().cpu().contiguous() for k, v in prediction.items() if k != "captions"
        }
        path = trainer.datamodule.root / shard_name(range(first, last + 1))
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank 0 writes ``index.json`` once every rank has finished its shards."""
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            index = build_index(trainer.datamodule, pl_module.settings())
            rank_zero_info(
                f"ODE pairs: {index['num_pairs']} in {len(index['shards'])} shards in "
                f"{trainer.datamodule.root}"
            )
        trainer.strategy.barrier()


def _check_settings(root: Path, found: dict, wanted: dict) -> None:
    """Raise if ``root`` holds pairs made with other settings than this run's."""
    if found != wanted:
        diff = sorted(k for k in wanted.keys() | found.keys() if found.get(k) != wanted.get(k))
        raise UserError(
            f"{root} holds pairs made with other settings ({', '.join(diff)}): "
            "choose another data.init_args.root or delete that directory."
        )


def build_index(data: PairSeedDataModule, settings: dict[str, Any]) -> dict[str, Any]:
    """Write ``root/index.json`` from the complete planned shards on disk; return it."""
    shards = []
    for seeds in data.plan():
        header = read_shard_header(data.root / shard_name(seeds))
        if header is None or header["count"] != len(seeds):
            continue
        _check_settings(data.root, json.loads(header["settings"]), settings)
        name, count = shard_name(seeds), len(seeds)
        shards.append(
            {"file": name, "first_seed": seeds[0], "last_seed": seeds[-1], "count": count}
        )
    num_pairs = sum(s["count"] for s in shards)
    index = {
        "format": "cm-ode-pairs",
        "version": 1,
        "seed": data.seed,
        "num": data.num,
        "shard_size": data.shard_size,
        "num_pairs": num_pairs,
        "complete": num_pairs == data.num,
        **settings,
        "shards": shards,
    }
    with atomic_path(data.root / INDEX) as tmp:
        tmp.write_text(json.dumps(index, indent=1))
    return index
