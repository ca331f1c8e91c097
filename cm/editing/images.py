"""Images from and to disk for editing: read, size checks, masks, PNG writes (no parsing).

Reads PNG/JPEG images (a file or every ``.png``/``.jpg``/``.jpeg`` in a folder, sorted) as
``[C, H, W]`` in [-1, 1]; writes uint8 PNGs atomically. ``cm edit`` is ``cm.commands.edit``.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from cm.editing.operators import half_mask
from cm.errors import UserError
from cm.files import atomic_path
from cm.sample_files import save_grid

SUFFIXES = (".png", ".jpg", ".jpeg")
MASKS = ("left", "right", "top", "bottom", "center")


def list_images(path: str | Path) -> list[Path]:
    """An image file, or every PNG/JPEG in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in SUFFIXES)
        if not files:
            raise FileNotFoundError(f"No .png/.jpg images in '{path}': put the inputs there.")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"Input '{path}' does not exist: pass an image or a folder.")
    return [path]


def read_image(path: Path, channels: int, sizes: Sequence[int]) -> Tensor:
    """One image as ``[channels, H, W]`` in [-1, 1]; gray and RGB are converted, never resized."""
    with Image.open(path) as im:
        check_size(path, im.size, sizes)
        im = im.convert("L" if channels == 1 else "RGB")
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    x = x.reshape(im.size[1], im.size[0], channels).permute(2, 0, 1)
    return x.to(torch.float32) / 127.5 - 1


def check_size(path: Path, size: tuple[int, int], sizes: Sequence[int]) -> None:
    """Raise if an image of ``size = (W, H)`` is not square with a side in ``sizes``."""
    if size[0] != size[1] or size[0] not in sizes:
        want = " or ".join(f"{s}x{s}" for s in sizes)
        raise UserError(f"'{path}' is {size[0]}x{size[1]}; the model needs {want} (resize it).")


def check_images(files: Sequence[Path], sizes: Sequence[int]) -> None:
    """Check every input's size before anything is written (PIL reads only the headers)."""
    for f in files:
        with Image.open(f) as im:
            check_size(f, im.size, sizes)


def read_mask(mask: str | None, resolution: int) -> Tensor:
    """``Omega [H, W]`` (1 = fill) from a named region or a PNG (white = fill)."""
    if mask is None:
        raise UserError(f"inpaint needs --mask: a PNG (white = fill) or one of {MASKS}.")
    if mask in MASKS:
        return half_mask(mask, resolution)
    if not Path(mask).is_file():
        raise FileNotFoundError(f"Mask '{mask}' does not exist: pass a PNG or one of {MASKS}.")
    omega = read_image(Path(mask), 1, [resolution])[0] > 0  # >= 128 of 255
    return omega.to(torch.float32)


def write_png(image: Tensor, path: Path) -> None:
    """Write a uint8 ``[H, W, C]`` image atomically (temp file, then ``os.replace``)."""
    a = image.numpy()
    with atomic_path(path) as tmp:
        image = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))


def write_grid(images: Tensor, path: Path, nrow: int) -> None:
    """``cm.sample_files.save_grid`` (written atomically)."""
    save_grid(images, path, nrow=nrow)
