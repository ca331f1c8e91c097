"""Sharded training checkpoints on disk: read one without pickled code, write it as one file.

Under ``cm.training.FSDP`` each checkpoint (``last.ckpt``, ``epoch=E-step=S.ckpt``) is a
*directory*: PyTorch Distributed Checkpoint (DCP) files with every rank's shards
(``__<rank>_0.distcp``, indexed by ``.metadata``) and Lightning's ``meta.pt`` (step, loops,
callbacks, hyperparameters: all but weights and optimizer states). ``read_sharded`` assembles it
into the dict of a single-file ``.ckpt`` (``state_dict`` of full tensors, ``optimizer_states``
keyed by parameter index) in one process, without a process group; ``consolidate`` writes that
as one ``.ckpt``, which ``cm export``, ``cm sample`` and ``--ckpt_path`` under any strategy read.
DCP unpickles its ``.metadata`` and its non-tensor entries; here the index may only name DCP's
own classes and the entries are read with ``weights_only=True``.
"""

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from cm.errors import UserError
from cm.files import atomic_path

META = "meta.pt"  # Lightning's name (lightning.fabric.utilities.load._METADATA_FILENAME)
INDEX = ".metadata"  # DCP's index of the shards


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint directory written by ``cm fit`` (Lightning)."""
    path = Path(path)
    return path.is_dir() and (path / META).is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata``: its own dataclasses and enums, torch dtypes and sizes; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:  # a dotted name would reach any attribute of the module
            if (module == "torch" and name in _TORCH_NAMES) or (module, name) in _OTHERS:
                return super().find_class(module, name)
            if module.startswith(_DCP):
                found = super().find_class(module, name)
                if isinstance(found, type) and found.__module__.startswith(_DCP):
                    return found  # a class defined by DCP (not, e.g., a module it imports)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


_TORCH_NAMES = {
    "Size",
    "layout",
    "strided",
    "sparse_coo",
    "memory_format",
    "contiguous_format",
    "preserve_format",
    "channels_last",
    *(str(d).removeprefix("torch.") for d in vars(torch).values() if isinstance(d, torch.dtype)),
}
_DCP = "torch.distributed.checkpoint."
_OTHERS = {  # what else DCP pickles: layouts by name, the checkpoint id (a path)
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


def read_index(path: str | Path) -> Metadata:
    """DCP's ``.metadata`` of checkpoint directory ``path``, refusing pickled code."""
    file = Path(path) / INDEX
    try:
        metadata = _MetadataUnpickler(io.BytesIO(file.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as error:
        raise UserError(
            f"Cannot read '{file}' as a sharded checkpoint's index ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'unreadable'}): pass a checkpoint "
            "directory written by cm fit under cm.training.FSDP, from a source you trust."
        ) from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"'{file}' is not a sharded checkpoint's index: pass a cm fit checkpoint.")
    return metadata


def check_metadata(path: str | Path) -> None:
    """Refuse a sharded checkpoint whose ``.metadata`` names anything but DCP's classes."""
    read_index(path)


class _Reader(FileSystemReader):
    """DCP's file reader with the index read by ``read_index`` (no pickled code)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_index(self.path)
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(_EmptyStateDictLoadPlanner):
    """Load every entry of the checkpoint; non-tensor entries with ``weights_only``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, without pickled code
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def read_meta(path: str | Path) -> dict[str, Any]:
    """Lightning's ``meta.pt`` of a sharded checkpoint: all but weights and optimizer states."""
    file = Path(path) / META
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickled code, ...
        raise UserError(
            f"Cannot load '{file}' with weights_only=True ({type(e).__name__}): pass a sharded "
            "checkpoint directory written by cm fit, from a source you trust."
        ) from None


def read_sharded(path: str | Path, optimizers: bool = True) -> dict[str, Any]:
    """A sharded checkpoint directory as the dict of a single-file ``.ckpt`` (CPU tensors).

    Args:
        path: the checkpoint directory.
        optimizers: read the optimizer states too, keyed by parameter index as ``torch.optim``
            saves them (the shards key them by name), so that the result resumes under any
            strategy; False reads weights and metadata alone (``cm export``, ``cm sample``).
    """
    path = Path(path)
    if not is_sharded(path):
        raise UserError(
            f"'{path}' is not a sharded checkpoint (a directory with {META}): pass a checkpoint "
            "directory written by cm fit under cm.training.FSDP."
        )
    checkpoint = read_meta(path)
    read_index(path)  # its errors, before DCP wraps them
    state: dict[str, Any] = {}
    planner = _Planner(keys=None if optimizers else {"state_dict"})
    try:  # as torch's own dcp_to_torch_save (format_utils), in this one process
        _load_state_dict(state, storage_reader=_Reader(path), planner=planner, no_dist=True)
    except Exception as e:  # a missing or truncated shard
        raise UserError(
            f"Cannot read the shards of '{path}' ({type(e).__name__}): the checkpoint is "
            "incomplete; pass another one (e.g. the previous periodic checkpoint)."
        ) from None
    checkpoint["state_dict"] = state.pop("state_dict")
    if optimizers:
        keys = sorted((k for k in state if k.startswith("optimizer_")), key=_index)
        checkpoint["optimizer_states"] = [_by_index(state.pop(k)) for k in keys]
    return checkpoint


def _index(key: str) -> int:
    """``optimizer_3`` -> 3."""
    return int(key.removeprefix("optimizer_"))


def _by_index(optimizer: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name, keyed by index in ``param_groups`` order."""
    names = [name for group in optimizer["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    state = {index[name]: value for name, value in optimizer.get("state", {}).items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optimizer["param_groups"]]
    return {"state": state, "param_groups": groups}


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write sharded checkpoint ``path`` as one ``.ckpt`` file ``out`` (atomically)."""
    checkpoint = read_sharded(path)
    with atomic_path(out) as tmp:
        torch.save(checkpoint, tmp)
    return Path(out)
