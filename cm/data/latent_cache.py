"""The latent cache: a dataset's VAE posteriors, encoded once, atomically and resumably.

The latent-diffusion recipe of DiT/SiT/REPA and EDM2: encode the images once with the frozen VAE
(Rombach et al. 2022), keep the posterior's mean and std, and draw ``z = mean + std * n`` per
training sample (``cm.data.latents.LatentDataset``). A cache is a folder of three files:

- ``moments.npy``: ``[V, N, 2, c, h, w]`` (float32, or float16 to halve the disk), the VAE
  posterior's unscaled mean and std (``cm.vae.VAE.moments``) of every image; ``V = 2`` when
  flips are on: variant 1 holds the latents of the horizontally flipped images (a flip of the
  image is not a flip of its latents), and training picks a variant per sample;
- ``labels.npy``: ``[N, L]`` float32, the dataset's labels (``L = 0`` unlabelled);
- ``manifest.json``: what the cache was built from: the VAE (its path, scaling factor and the
  SHA-256 of its encoder, which alone decides the latents), the source dataset (class, options,
  size, shape and a digest of its first and last items), flips and dtype. A cache built from
  another encoder or dataset is refused with one sentence, never reused; the scaling factors are
  applied when reading, so they may change.

Writing is atomic and resumable: the cache is built in ``.<name>.partial/`` next to it, one
chunk of ``batch_size`` images at a time, each chunk marked done in ``done/`` once its rows are
on disk; a restarted encode does only the chunks not marked, and the folder takes the cache's
name only when complete. Chunks are fixed by the index, so an interrupted, resumed or multi-rank
encode gives the same bytes as one uninterrupted pass. Under ``torch.distributed`` each rank
encodes chunks ``rank, rank + world, ...`` into the shared files (``pwrite`` of its own byte
ranges, safe on network file systems), then rank 0 checks and finalises the cache.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from cm.errors import UserError
from cm.files import atomic_path
from cm.vae import VAE

FORMAT = "cm-latents-1"
CacheDtype = Literal["float32", "float16"]


def dataset_identity(images: Dataset, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """What a cache is built from: class, options, size, item shape, digest of first/last items."""
    first, label = images[0]
    digest = hashlib.sha256()
    for x, y in (images[0], images[len(images) - 1]):
        digest.update(np.ascontiguousarray(x.numpy()).tobytes())
        digest.update(np.ascontiguousarray(y.numpy()).tobytes())
    return {
        "class": name,
        "options": options,
        "num_images": len(images),
        "image_shape": list(first.shape),
        "label_shape": list(label.shape),
        "digest": digest.hexdigest(),
    }


def read_json(path: Path) -> dict:
    """A small JSON file written by this module; an unreadable one is a clear error."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot read '{path}' ({e}): delete the latent cache folder.") from None


class _Writer:
    """Writes chunks of moments and labels into the ``.npy`` files of a partial cache."""

    def __init__(self, part: Path) -> None:
        self.files = {}
        for name in ("moments", "labels"):
            array = np.load(part / f"{name}.npy", mmap_mode="r")  # header: shape, dtype, offset
            self.files[name] = (part / f"{name}.npy", array.offset, array.shape, array.dtype)
            del array

    def write(self, name: str, index: tuple[int, ...], rows: np.ndarray) -> None:
        """``array[index][:len(rows)] = rows`` by ``pwrite`` of exactly those bytes, then fsync."""
        path, offset, shape, dtype = self.files[name]
        if rows.size == 0:
            return
        first = np.ravel_multi_index((*index, *[0] * (len(shape) - len(index))), shape)
        start = offset + int(first) * dtype.itemsize
        data = memoryview(np.ascontiguousarray(rows, dtype=dtype).tobytes())
        fd = os.open(path, os.O_WRONLY)
        try:
            while data:  # pwrite may write less (a full disk): write the rest, or raise
                written = os.pwrite(fd, data, start)
                if written == 0:
                    raise OSError(f"no space left to write the latent cache file '{path}'")
                data, start = data[written:], start + written
            os.fsync(fd)
        finally:
            os.close(fd)


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(error: str | None, src: int | None = 0) -> None:
    """Raise on every rank the error of rank ``src`` (None: of any rank), if there was one."""
    _, world = _world()
    errors = [error]
    if world > 1 and src is not None:
        dist.broadcast_object_list(errors, src=src)
    elif world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    found = next((e for e in errors if e is not None), None)
    if found is not None:
        raise UserError(found)


def _check_manifest(manifest: dict, expected: dict, cache: Path, flip: bool) -> None:
    """Refuse a cache built from another VAE encoder, dataset or dtype, or without flips."""
    fix = "delete it, or give another cache path (data.init_args.dataset.init_args.cache)"
    if manifest.get("format") != FORMAT:
        raise UserError(f"'{cache}' is not a latent cache of this cm version: {fix}.")
    for key, what in (("encoder", "VAE encoder"), ("dataset", "dataset"), ("dtype", "dtype")):
        if manifest[key] != expected[key]:
            old, new = manifest[key], expected[key]
            if key == "dataset":
                old, new = old["class"] + str(old["options"]), new["class"] + str(new["options"])
                if old == new:
                    old, new = "other images", "these"
            elif key == "encoder":
                old, new = manifest["vae"]["path"], expected["vae"]["path"]
                if old == new:
                    old, new = "its weights then", "now"
            raise UserError(
                f"The latent cache '{cache}' was built from another {what} ({old}, not {new}): "
                f"{fix}."
            )
    if flip and manifest["shape"][0] < 2:
        raise UserError(
            f"The latent cache '{cache}' holds no latents of flipped images but "
            f"data.init_args.flip is true: {fix} to encode them too, or set flip to false."
        )


def _prepare_partial(part: Path, manifest: dict, chunk: int) -> None:
    """Create the partial cache (files sized, nothing encoded), unless one of it can resume."""
    stamp = {**manifest, "chunk": chunk}
    if (part / "partial.json").is_file() and read_json(part / "partial.json") == stamp:
        (part / "done").mkdir(exist_ok=True)  # resume
        return
    if part.exists():
        print(f"Discarding the unfinished latent cache '{part}' (built with other settings).")
        shutil.rmtree(part)
    (part / "done").mkdir(parents=True)
    dtype = np.dtype(manifest["dtype"])
    moments = np.lib.format.open_memmap(part / "moments.npy", "w+", dtype, tuple(manifest["shape"]))
    labels = np.lib.format.open_memmap(
        part / "labels.npy", "w+", np.float32, (manifest["shape"][1], *manifest["label_shape"])
    )
    del moments, labels  # sparse files of the final size; rows are written by pwrite
    with atomic_path(part / "partial.json") as tmp:  # last: the partial exists only once complete
        tmp.write_text(json.dumps(stamp, indent=1))


def _encode_chunks(
    images: Dataset, vae: VAE, part: Path, todo: list[int], chunk: int, variants: int, workers: int
) -> None:
    """Encode chunks ``todo`` (each ``chunk`` consecutive images) and mark each one done."""
    n = len(images)
    writer = _Writer(part)
    batches = [list(range(i * chunk, min((i + 1) * chunk, n))) for i in todo]
    cuda = torch.cuda.is_available()  # under DDP, each rank's current device
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    loader = DataLoader(images, batch_sampler=batches, num_workers=workers)
    for i, (x, y) in zip(todo, loader, strict=True):
        x = x.to(device)
        for v in range(variants):
            mean, std = vae.moments(x.flip(-1) if v else x)
            rows = torch.stack([mean, std], dim=1).cpu().numpy()  # [B, 2, c, h, w]
            writer.write("moments", (v, i * chunk), rows)
        writer.write("labels", (i * chunk,), y.to(torch.float32).numpy())
        (part / "done" / f"{i:08d}").touch()


def encode_cache(
    images: Dataset,
    vae: VAE,
    cache: str | Path,
    identity: dict[str, Any],
    flip: bool = False,
    batch_size: int = 64,
    dtype: CacheDtype = "float32",
    num_workers: int = 0,
) -> Path:
    """Encode ``images`` with ``vae`` once into the latent cache folder ``cache`` (module doc).

    A finished cache of the same encoder, dataset and dtype is reused (one with flips also
    serves ``flip=False``); another one is refused. Called on every rank of an initialised
    process group, the ranks share the chunks.

    Args:
        images: ``(image [C, H, W] in [-1, 1], label)`` items, deterministic (no augmentation).
        vae: the frozen VAE; it runs on the current CUDA device when there is one.
        cache: the cache folder; it must not exist yet or be a cache of these images.
        identity: the source dataset's identity (``dataset_identity``), kept in the manifest.
        flip: also encode the horizontally flipped images.
        batch_size: images per chunk (the unit of progress and of the split over ranks).
        dtype: storage dtype of the moments.
        num_workers: DataLoader workers reading the images.
    """
    cache = Path(cache).expanduser()
    rank, world = _world()
    channels, side = identity["image_shape"][0], identity["image_shape"][-1]
    if side % vae.downsample:
        raise UserError(
            f"Images of {side} px do not divide into the VAE's {vae.downsample}x downsampling: "
            f"give images whose size is a multiple of {vae.downsample}."
        )
    vae.check_channels(channels)  # a mismatch fails before any work
    shape = [2 if flip else 1, len(images), 2, vae.latent_channels, *[side // vae.downsample] * 2]
    manifest = {
        "format": FORMAT,
        "encoder": vae.encoder_digest(),
        "vae": {
            "path": vae.path,
            "scaling_factor": vae.scaling_factor,
            "shift_factor": vae.shift_factor,
        },
        "dataset": identity,
        "dtype": dtype,
        "shape": shape,
        "label_shape": identity["label_shape"],
    }
    if (cache / "manifest.json").is_file():
        _check_manifest(read_json(cache / "manifest.json"), manifest, cache, flip)
        return cache
    if cache.exists() and (not cache.is_dir() or any(cache.iterdir())):
        raise UserError(
            f"'{cache}' exists and is not a finished latent cache (no manifest.json): give "
            "another cache path, or remove it."
        )
    part = cache.with_name(f".{cache.name}.partial")
    num_chunks = -(-len(images) // batch_size)
    error = None
    if rank == 0:
        try:
            if (part / "manifest.json").is_file() and read_json(part / "manifest.json") == manifest:
                error = _rename(part, cache)  # a crash after finishing, before the rename
                _agree(error)
                return cache
            _prepare_partial(part, manifest, batch_size)
        except (UserError, OSError) as e:
            error = str(e)
    _agree(error)
    if world > 1 and rank and (cache / "manifest.json").is_file():
        return cache  # rank 0 renamed a cache finished before a crash
    try:
        done = {int(p.name) for p in (part / "done").iterdir()}
    except OSError as e:  # e.g. a cache on a disk this rank does not see
        done, error = set(), f"Rank {rank} cannot read the latent cache '{part}': {e}."
    if world > 1:
        _agree(error, None)  # every rank sees the partial cache, or all stop with one error
    elif error:
        raise UserError(error)
    todo = [i for i in range(rank, num_chunks, world) if i not in done]
    if rank == 0:
        print(f"Encoding {len(images)} images into the latent cache '{cache}' ...")
    try:
        _encode_chunks(images, vae, part, todo, batch_size, shape[0], num_workers)
    except Exception as e:
        if world == 1:
            raise
        _agree(f"Rank {rank} failed to encode its latents ({type(e).__name__}: {e}).", None)
    finally:
        vae.to("cpu")  # free the accelerator for training
    if world > 1:
        _agree(None, None)  # every rank finished its chunks
    if rank == 0:
        try:
            error = _finalise(part, cache, manifest, num_chunks)
        except OSError as e:
            error = f"Could not finish the latent cache '{cache}': {e}."
    _agree(error)
    return cache


def _finalise(part: Path, cache: Path, manifest: dict, num_chunks: int) -> str | None:
    """Write the manifest and give the partial cache its name; an error message, or None."""
    missing = [i for i in range(num_chunks) if not (part / "done" / f"{i:08d}").exists()]
    if missing:
        return (
            f"Chunk {missing[0]} of the latent cache '{cache}' was not written by its rank: put "
            "the cache on a file system that every rank sees."
        )
    with atomic_path(part / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return _rename(part, cache)


def _rename(part: Path, cache: Path) -> str | None:
    """Give a finished partial cache (its manifest written) its name, then drop its progress."""
    if cache.is_dir():
        cache.rmdir()  # empty (checked above): rename(2) would replace it, but be explicit
    os.replace(part, cache)
    # Progress markers are not part of a finished cache; a crash here leaves harmless extras.
    shutil.rmtree(cache / "done", ignore_errors=True)
    (cache / "partial.json").unlink(missing_ok=True)
    return None
