"""What ``cm eval`` reads and writes: samples ``.npz`` files, feature choices, JSON results.

Library functions only; the command line (``cm eval``, ``cm eval ref``) is
``cm.commands.eval``.
"""

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch import nn

from cm.errors import UserError
from cm.files import atomic_path
from cm.metrics.features import import_feature

FEATURE_HELP = (
    "Feature extractor: inception (torch-fidelity Inception v3, as published tables), clip "
    "(open_clip image embeddings of --clip_model/--clip_pretrained), or the import path of an "
    "nn.Module class with num_features built with no arguments, e.g. pkg.module.Features."
)


def resolve_feature(feature: str) -> str | nn.Module:
    """``inception``/``clip`` as they are; an import path ``pkg.module.Class`` instantiated."""
    return feature if feature in ("inception", "clip") else import_feature(feature)


def read_samples(path: Path, hint: str = "write one with `cm sample --out FILE`") -> np.ndarray:
    """``arr_0`` of a samples ``.npz`` (uint8 NHWC), with one clear error when missing."""
    if not path.is_file():
        raise FileNotFoundError(f"Images file '{path}' not found: {hint}.")
    if not zipfile.is_zipfile(path):  # an .npy, an image, text: np.load would not give an npz
        raise UserError(
            f"Cannot read samples '{path}': not an .npz (truncated, or another format); {hint}."
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise UserError(f"'{path}' has no arr_0 (uint8 images [N, H, W, C]).")
            images = data["arr_0"]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:  # truncated, objects
        raise UserError(
            f"Cannot read samples '{path}' as an .npz ({error}): write it again with cm sample."
        ) from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(
            f"arr_0 of '{path}' is {images.dtype} {list(images.shape)}, not uint8 [N, H, W, C] "
            "with C = 1 or 3: save images as cm sample does (cm.io.save_npz)."
        )
    return images


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically (``cm.io.atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    return path


def npz_batches(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of ``arr_0`` of an images ``.npz``."""
    images = read_samples(path, "give an .npz of uint8 images arr_0 or a training YAML")
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


# The private names of the module before the command moved to cm.commands.eval.
_read_samples, _write_json, _npz_batches = read_samples, write_json, npz_batches
