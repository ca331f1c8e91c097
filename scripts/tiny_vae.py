"""Save a tiny random diffusers ``AutoencoderKL`` (SD's VAE layout) for CPU tests and toy configs.

configs/latent_digits.yaml reads it from ``runs/tiny_vae``; the tests write one with
``save_tiny_vae``. Random weights: the latent path (encode once, train on latents, decode samples)
runs end to end, but the decoded images mean nothing. Same layout as
``stabilityai/sd-vae-ft-ema`` (``config.json`` + ``diffusion_pytorch_model.safetensors``, 0.18215
scaling), with 8/16 channels and one resolution halving instead of four blocks and three.

    python scripts/tiny_vae.py runs/tiny_vae
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch

from cm.files import umask


def save_tiny_vae(path: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny random VAE to the folder ``path`` (atomically) and return it.

    Args:
        path: the output folder; it must not exist unless ``overwrite``.
        seed: fixes the random weights.
        overwrite: replace an existing folder.
    """
    from diffusers import AutoencoderKL  # optional extra: cm[sd]

    path = Path(path)
    if path.exists() and not overwrite:
        raise SystemExit(f"'{path}' already exists: pass another folder, or --overwrite.")
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        vae.save_pretrained(tmp)
        for file in (tmp, *tmp.iterdir()):  # mkdtemp's 0700 -> the umask's, as cm's outputs
            os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def main() -> None:
    """``python scripts/tiny_vae.py DIR [--seed S] [--overwrite]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="output folder, e.g. runs/tiny_vae")
    parser.add_argument("--seed", type=int, default=0, help="fixes the random weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args()
    print(f"Wrote a tiny random VAE to {save_tiny_vae(args.path, args.seed, args.overwrite)}")


if __name__ == "__main__":
    main()
