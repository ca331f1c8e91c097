"""Streaming ODE pairs to a student: ``PairDataset`` and ``PairDataModule`` (Kang et al. 2024).

The shards and ``index.json`` are written by ``cm predict`` with ``cm.training.pairs``
(``PairGenerator``, ``PairSeedDataModule``, ``PairWriter``); their layout is described there.
"""

import bisect
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cm.errors import UserError
from cm.training.datamodule import step_loader
from cm.training.pairs import INDEX


class PairDataset(Dataset):
    """Map-style view of the shards of an index: item ``i`` is ``(z, x, one-hot label)``.

    Rows are read through safetensors' memory map, so only the touched rows are loaded; the
    few most recent shard handles stay open (per process: they are dropped when pickled).
    Pairs of a text-to-image teacher give ``(z, x, caption)``, or ``(z, x, tokens [L, D])``
    with a ``text_encoder``.

    Args:
        root: the shard directory.
        index: its parsed ``index.json``.
        max_open: shard files kept open at once.
        text_encoder: turns captions into the student's ``labels``; None yields the strings.
    """

    def __init__(
        self,
        root: Path,
        index: dict[str, Any],
        max_open: int = 64,
        text_encoder: nn.Module | None = None,
    ) -> None:
        self.root, self.label_dim, self.max_open = root, int(index["label_dim"]), max_open
        self.has_captions, self.text_encoder = "captions" in index, text_encoder
        self._captions: dict[int, list[str]] = {}  # per shard, parsed once from its header
        self.files = [s["file"] for s in index["shards"]]
        self.starts = [0]
        for s in index["shards"]:
            self.starts.append(self.starts[-1] + int(s["count"]))
        self._open: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        """Number of pairs."""
        return self.starts[-1]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open file handles (DataLoader workers reopen their own)."""
        return {**self.__dict__, "_open": OrderedDict()}

    def _shard(self, k: int) -> Any:
        """The open safetensors handle of shard ``k`` (least recently used ones are closed)."""
        if k not in self._open:
            if len(self._open) >= self.max_open:
                self._open.popitem(last=False)
            self._open[k] = safe_open(str(self.root / self.files[k]), framework="pt")
        self._open.move_to_end(k)
        return self._open[k]

    def caption(self, i: int) -> str:
        """The prompt of pair ``i`` (text-to-image pairs only)."""
        if not self.has_captions:
            raise UserError(f"The pairs in {self.root} have class labels, not captions.")
        k = bisect.bisect_right(self.starts, i) - 1
        if k not in self._captions:
            self._captions[k] = json.loads(self._shard(k).metadata()["captions"])
        return self._captions[k][i - self.starts[k]]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor | str]:
        """``z [C,H,W]``, ``x [C,H,W]`` as float32 and the one-hot label ``[label_dim]``."""
        k = bisect.bisect_right(self.starts, i) - 1
        j, f = i - self.starts[k], self._shard(k)
        z, x = (f.get_slice(n)[j : j + 1][0].float() for n in ("z", "x"))
        if self.has_captions:
            caption = self.caption(i)
            if self.text_encoder is None:
                return z, x, caption
            return z, x, self.text_encoder([caption])[0]
        label = torch.zeros(self.label_dim)
        if self.label_dim:
            label[int(f.get_slice("labels")[j : j + 1][0])] = 1.0
        return z, x, label


class PairDataModule(L.LightningDataModule):
    """ODE pairs ``(z, x, label)`` written by ``cm predict --config configs/pairs_*.yaml``.

    As ``ImageDataModule``: ``batch_size`` is the global batch of one optimizer step (split over
    devices and accumulation), training is a resumable ``StepStream`` in which every pair comes
    exactly once per epoch (when the global batch divides the pair count), and ``resolution``,
    ``channels`` and ``label_dim`` are known before ``setup`` (from the index).

    Args:
        root: the shard directory with ``index.json``.
        batch_size: pairs per optimizer step over all devices.
        num_workers: DataLoader worker processes (0 loads in the main process).
        seed: fixes the shuffling.
        text_encoder: for text-to-image pairs, encodes each caption into the ``labels``
            (``cm.networks.text.TextEncoder``, the teacher's); None yields the strings.
    """

    def __init__(
        self,
        root: str = "pairs",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        text_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.root, self.batch_size = Path(root), batch_size
        self.num_workers, self.seed = num_workers, seed
        self._index: dict[str, Any] | None = None
        self.train_set: PairDataset | None = None

    @property
    def index(self) -> dict[str, Any]:
        """The parsed ``index.json`` of ``root``."""
        if self._index is None:
            path = self.root / INDEX
            if not path.is_file():
                raise FileNotFoundError(
                    f"No ODE pairs index at {path}: run cm predict --config "
                    "configs/pairs_*.yaml (with data.init_args.root there) first."
                )
            self._index = json.loads(path.read_text())
            if not self._index["shards"]:
                raise UserError(f"{path} lists no finished shards: re-run its cm predict.")
        return self._index

    @property
    def resolution(self) -> int:
        """Image height and width."""
        return int(self.index["image_shape"][-1])

    @property
    def channels(self) -> int:
        """Image channels C."""
        return int(self.index["image_shape"][0])

    @property
    def label_dim(self) -> int:
        """Number of classes (0 when the teacher was unconditional)."""
        return int(self.index["label_dim"])

    def setup(self, stage: str | None = None) -> None:
        """Open the pairs listed in the index."""
        if self.train_set is None:
            self.train_set = PairDataset(self.root, self.index, text_encoder=self.text_encoder)

    def contexts(self, seeds: Sequence[int]) -> Tensor:
        """Text contexts ``[N, L, D]`` for sampling: seed ``s`` gets pair ``s % len``'s prompt.

        A text-to-image student's sample grids thus show the prompts it was distilled on.
        """
        if self.text_encoder is None or "captions" not in self.index:
            raise UserError(
                "Sampling a text-to-image student needs text pairs and data.init_args."
                "text_encoder (the teacher's cm.networks.text.TextEncoder)."
            )
        self.setup("predict")
        n = len(self.train_set)
        return self.text_encoder([self.train_set.caption(int(s) % n) for s in seeds])

    def train_dataloader(self) -> DataLoader:
        """An endless, resumable stream of this rank's micro-batches, as ``ImageDataModule``'s."""
        self.setup("fit")
        return step_loader(self, self.train_set)
