"""``cm edit``: zero-shot inpainting, colorization, super-resolution, SDEdit, denoising, slerp.

Reads PNG/JPEG images (a file or every ``.png``/``.jpg``/``.jpeg`` in a folder, sorted), runs
Song et al. 2023, Alg. 4 (:func:`cm.editing.edit`) and writes one PNG per result plus a
side-by-side ``input | result`` PNG per batch. Every output name is checked before any work: the
output folder is never an input folder, no input is ever written onto, and an existing file is
replaced only with ``--overwrite``.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import ArgumentParser
from torch import Tensor
from tqdm import tqdm

from cm.checkpoint import load_denoiser
from cm.commands.options import (
    add_device_argument,
    add_overwrite_argument,
    add_seed_argument,
    add_trust_option,
    resolve_device,
)
from cm.convert import Format
from cm.editing.images import (
    MASKS,
    check_images,
    list_images,
    read_image,
    read_mask,
    write_grid,
    write_png,
)
from cm.editing.loop import edit, interpolation_alphas, slerp, start
from cm.editing.operators import Colorize, Inpaint, Operator, SuperRes
from cm.errors import UserError
from cm.files import check_output_dir
from cm.protocols import image_spec
from cm.sample import import_solver, sampler_from
from cm.sample_files import to_uint8
from cm.solvers.consistency import multistep, onestep
from cm.solvers.flowmap import flowmap
from cm.solvers.sampling import SeededNoise

Task = Literal["inpaint", "colorize", "superres", "sdedit", "denoise", "interpolate"]


def edit_parser() -> ArgumentParser:
    """Arguments of ``cm edit``."""
    p = ArgumentParser(
        exit_on_error=False,
        prog="cm edit",
        description="Zero-shot image editing (CM paper, Alg. 4).",
    )
    p.add_argument("--ckpt_path", type=str, required=True, help="A .ckpt or exported denoiser.")
    p.add_argument("--task", type=Task, required=True, help="What to do with the input images.")
    p.add_argument(
        "--input",
        type=str | None,
        default=None,
        help="An image or a folder of PNG/JPEG images at the model's resolution (superres: "
        "also resolution / patch). Not used by interpolate.",
    )
    p.add_argument(
        "--mask",
        type=str | None,
        default=None,
        help="inpaint: a PNG at the model's resolution, white = fill, black = keep; or one of "
        "left, right, top, bottom, center (the region to fill).",
    )
    p.add_argument("--steps", type=int | None, default=None, help="Karras grid steps.")
    p.add_argument(
        "--sigmas",
        type=list[float] | None,
        default=None,
        help="Explicit decreasing grid, e.g. [80.0,24.0,5.0]; a trailing 0 is appended.",
    )
    p.add_argument(
        "--solver",
        type=str | None,
        default=None,
        help="A cm.solvers name or import path; default: the checkpoint's sampler (one-step "
        "consistency sampling becomes the multistep loop of Alg. 4).",
    )
    p.add_argument(
        "--resample", type=int, default=1, help="RePaint jump-backs per step (diffusion solvers)."
    )
    p.add_argument(
        "--sigma", type=float | None, default=None, help="sdedit/denoise: the starting sigma."
    )
    p.add_argument("--patch", type=int, default=4, help="superres: the upsampling factor p.")
    p.add_argument("--seed2", type=int | None, default=None, help="interpolate: second seed.")
    p.add_argument("--num_interp", type=int, default=8, help="interpolate: images per row.")
    p.add_argument(
        "--class_label",
        type=int | None,
        default=None,
        help="Class for a class-conditional model (default: all classes equally, 1/L each).",
    )
    add_seed_argument(p, "Seed of the first image (one per image).")
    p.add_argument("--batch_size", type=int, default=64, help="Images per batch.")
    add_device_argument(p)
    p.add_argument("--ema", type=bool, default=True, help="Use the EMA weights when present.")
    p.add_argument("--format", type=Format, default="auto", help="Checkpoint layout (cm sample).")
    p.add_argument("--denoiser", type=str | None, default=None, help="Architecture YAML (foreign).")
    p.add_argument(
        "--out",
        type=str,
        default="edits",
        help="Output folder (not an input folder): one PNG per input, named as the input.",
    )
    add_overwrite_argument(p)
    add_trust_option(p)
    return p


def task_operator(cfg, resolution: int) -> Operator | None:
    """The ``A``/``Omega`` of a replacement task; None for sdedit, denoise and interpolate."""
    match cfg.task:
        case "inpaint":
            return Inpaint(read_mask(cfg.mask, resolution))
        case "colorize":
            return Colorize()
        case "superres":
            if resolution % cfg.patch:
                raise UserError(f"--patch {cfg.patch} must divide the resolution {resolution}.")
            return SuperRes(cfg.patch)
        case _:
            return None


def main(args: Sequence[str]) -> Path:
    """``cm edit``: Song et al. 2023, Alg. 4 on images from disk; returns the output folder."""
    cfg = edit_parser().parse_args(list(args))
    device = resolve_device(cfg.device)
    files = [] if cfg.task == "interpolate" else list_images(_required(cfg.input, cfg.task))
    check_outputs(cfg, files)
    denoiser, hparams = load_denoiser(
        cfg.ckpt_path, cfg.denoiser, cfg.format, cfg.ema, cfg.trust_config
    )
    denoiser = denoiser.to(device)
    (channels, resolution, _), label_dim = image_spec(denoiser)
    if cfg.task == "colorize" and channels != 3:
        raise UserError(f"colorize needs a 3-channel (RGB) model; this one has {channels}.")
    operator = task_operator(cfg, resolution)

    sampler = sampler_from(hparams.get("sampler"))
    solver = import_solver(cfg.solver, cfg.trust_config) if cfg.solver else sampler.solver
    # Alg. 4 re-noises between steps; a flow map edits as its denoiser D(x, s) = Phi(x, s, 0).
    solver = multistep if solver in (onestep, flowmap) else solver
    if cfg.steps is not None:
        sampler.num_steps, sampler.sigmas = cfg.steps, None
    if cfg.sigmas is not None:
        sampler.sigmas = cfg.sigmas
    if cfg.task in ("sdedit", "denoise") and cfg.sigmas is None:
        if cfg.sigma is None:
            raise UserError(f"{cfg.task} needs --sigma, the noise level to start from.")
        sampler.sigma_max, sampler.sigmas = cfg.sigma, None
    sigmas = sampler.grid(denoiser)

    def labels_for(n: int) -> Tensor | None:
        if not label_dim:
            return None
        if cfg.class_label is None:  # the mean label embedding: no class preferred
            return torch.full((n, label_dim), 1 / label_dim, device=device)
        return torch.nn.functional.one_hot(
            torch.full((n,), cfg.class_label, device=device), label_dim
        ).float()

    sizes = [resolution, resolution // cfg.patch] if cfg.task == "superres" else [resolution]
    check_images(files, sizes)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"solver": solver, "resample": cfg.resample}
    if cfg.task == "interpolate":
        _interpolate(
            cfg,
            denoiser,
            sigmas,
            (channels, resolution, resolution),
            labels_for,
            out,
            device,
            kwargs,
        )
        print(f"Wrote {cfg.num_interp} interpolated images to {out}")
        return out

    batches = range(0, len(files), cfg.batch_size)
    for b, first in enumerate(tqdm(batches, desc="cm edit", unit="batch")):
        chunk = files[first : first + cfg.batch_size]
        y = torch.stack(
            [read_image(f, 3 if cfg.task == "colorize" else channels, sizes) for f in chunk]
        ).to(device)
        if cfg.task == "superres" and y.shape[-1] != resolution:  # low-res: patch means
            y = y.repeat_interleave(cfg.patch, -1).repeat_interleave(cfg.patch, -2)
        noise = SeededNoise(range(cfg.seed + first, cfg.seed + first + len(chunk)), device)
        sigma0 = float(sigmas[0])
        x = y if cfg.task == "denoise" else start(y, sigma0, noise.randn(y.shape[1:]), operator)
        result = edit(
            denoiser, x, sigmas, labels_for(len(chunk)), y, operator, noise=noise, **kwargs
        ).clamp(-1, 1)
        shown = y if operator is None else operator.project(y)  # what the model was given
        images = to_uint8(result)
        for f, image in zip(chunk, images, strict=True):
            write_png(image, out / f"{f.stem}.png")
        pairs = torch.stack([to_uint8(shown.clamp(-1, 1)), images], 1).flatten(0, 1)
        write_grid(pairs, out / f"side_by_side_{b:04d}.png", nrow=2)
    print(f"Wrote {len(files)} edited images to {out}")
    return out


def output_names(cfg, files: Sequence[Path]) -> list[str]:
    """The names ``edit_main`` writes into ``--out`` for these input ``files``."""
    if cfg.task == "interpolate":
        return [f"interp_{i:03d}.png" for i in range(cfg.num_interp)] + ["interpolation.png"]
    batches = range(0, len(files), max(cfg.batch_size, 1))
    return [f"{f.stem}.png" for f in files] + [
        f"side_by_side_{b:04d}.png" for b in range(len(batches))
    ]


def check_outputs(cfg, files: Sequence[Path]) -> None:
    """Refuse, before any work, an output folder that is an input's or would replace a file."""
    mask = cfg.mask if cfg.mask not in MASKS else None
    inputs = [cfg.ckpt_path, cfg.denoiser, mask, *files]
    # The folder the images are read from, and that of each named file: edits never go there.
    folders = [cfg.input, *(Path(f).parent for f in (*files, mask) if f is not None)]
    check_output_dir(cfg.out, output_names(cfg, files), inputs, folders, cfg.overwrite)


def _required(value: str | None, task: str) -> str:
    """``--input``, which every task but interpolate needs."""
    if value is None:
        raise UserError(f"{task} needs --input: an image or a folder of images.")
    return value


def _interpolate(cfg, denoiser, sigmas, shape, labels_for, out, device, kwargs) -> None:
    """Song et al. 2023, Sec. 6.1: slerp the noises of ``--seed`` and ``--seed2``, then sample."""
    seed2 = cfg.seed + 1 if cfg.seed2 is None else cfg.seed2
    z0 = SeededNoise([cfg.seed], device).randn(shape)
    z1 = SeededNoise([seed2], device).randn(shape)
    alphas = interpolation_alphas(cfg.num_interp).to(device)
    z = slerp(z0.expand(len(alphas), *shape), z1.expand(len(alphas), *shape), alphas)
    # Re-noising draws come from one seed for the row, so every alpha sees the same noise.
    noise = SeededNoise([cfg.seed] * len(alphas), device)
    x = edit(
        denoiser,
        z.float() * float(sigmas[0]),
        sigmas,
        labels_for(len(alphas)),
        noise=noise,
        **kwargs,
    ).clamp(-1, 1)
    images = to_uint8(x)
    for i, image in enumerate(images):
        write_png(image, out / f"interp_{i:03d}.png")
    write_grid(images, out / "interpolation.png", nrow=len(images))


edit_main = main  # the name cm.editing.cli had
