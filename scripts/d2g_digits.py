"""Diffusion2GAN on 8x8 digits (Kang et al. 2024, Sec. 3-4): regression vs. + GAN vs. CD.

The study of configs/d2g_digits.yaml on a CPU, every step through the ``cm`` CLI:

1. ODE pairs of the EDM digits teacher (4000 seeds, DPM-Solver++(2M), 10 steps);
2. the regression-only student (``lambda_gan = 0``, PseudoHuber), from the teacher;
3. the + GAN student: the regression student fine-tuned with the conditional GAN loss
   (``init_generator``; D from the teacher), i.e. the regression warm-up run as a separate stage;
4. 1000 one-step samples from seeds 0..999 (labels ``seed % 10``) of each student and of CD's
   one-step model; the teacher's own samples for those seeds are the first 1000 pairs;
5. FID / precision / recall in ``cm.metrics.digits.DigitsFeatures`` features against the real
   digits (``cm eval ref``), a markdown table and ``docs/d2g_digits*.png``.

Finished stages are skipped on a re-run (delete ``runs/d2g_digits`` to start over).

    OMP_NUM_THREADS=1 python scripts/d2g_digits.py --regression-steps 1500 --gan-steps 500

(one thread per process: on a shared 2-core machine more threads made training 10x slower).
"""

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from cm.io import to_uint8
from cm.metrics import MetricSuite
from cm.metrics.digits import DigitsFeatures

ROOT = Path("runs/d2g_digits")
CONFIG = "configs/d2g_digits.yaml"
TEACHER = "runs/edm_digits/version_0/checkpoints/epoch=0-step=3000.ckpt"
CD = "runs/cd_digits/version_1/checkpoints/epoch=0-step=1500.ckpt"
NUM = 1000


def cm(*args: str) -> float:
    """Run ``cm ARGS`` and return its wall time in seconds."""
    print("+ cm", " ".join(args), flush=True)
    start = time.time()
    subprocess.run(["cm", *args], check=True)
    return time.time() - start


def last_ckpt(root: Path) -> Path | None:
    """The newest checkpoint under ``root``, if any."""
    found = sorted(root.glob("**/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def train(name: str, steps: int, *extra: str) -> tuple[Path, float]:
    """``cm fit`` the digits config into ``ROOT/name`` unless a checkpoint is there."""
    root = ROOT / name
    seconds = 0.0
    if last_ckpt(root) is None:
        seconds = cm(
            "fit", "--config", CONFIG, f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            *extra,
        )  # fmt: skip
    return last_ckpt(root), seconds


def teacher_samples(pairs: Path, out: Path) -> None:
    """The teacher's images for seeds ``0..NUM-1``: the first pairs (same seeds and labels)."""
    shards = json.loads((pairs / "index.json").read_text())["shards"]
    parts = [load_file(pairs / s["file"]) for s in shards]
    x = torch.cat([p["x"] for p in parts]).float()[:NUM]
    labels = torch.cat([p["labels"] for p in parts])[:NUM]
    np.savez(out, to_uint8(x).numpy(), labels.numpy())


def grid(path: Path) -> Image.Image:
    """The first 100 samples as a 10x10 grid (row ``r``: class ``r``), 1 px gaps, upscaled 4x."""
    x = np.load(path)["arr_0"][:100, :, :, 0]  # seed i has label i % 10: column = i // 10
    x = np.pad(x, ((0, 0), (0, 1), (0, 1)), constant_values=96)  # [100, 9, 9]
    tiles = x.reshape(10, 10, 9, 9).transpose(1, 2, 0, 3).reshape(90, 90)
    return Image.fromarray(tiles).resize((360, 360), Image.NEAREST)


def main() -> None:
    """Run the study and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--regression-steps", type=int, default=1500)
    parser.add_argument("--gan-steps", type=int, default=500)
    parser.add_argument("--lambda-gan", type=float, default=0.3)
    args = parser.parse_args()
    pairs, times = ROOT / "pairs", {}
    if not (pairs / "index.json").is_file():
        times["pairs"] = cm(
            "predict", "--config", "configs/pairs_digits.yaml",
            f"--data.init_args.num={args.pairs}", f"--data.init_args.root={pairs}",
            "--model.init_args.sampler.init_args.solver=cm.solvers.dpmpp_2m",
            "--model.init_args.sampler.init_args.num_steps=10",
            f"--trainer.default_root_dir={ROOT / 'pairgen'}",
        )  # fmt: skip
    regression, times["regression"] = train(
        f"regression{args.regression_steps}", args.regression_steps,
        "--model.init_args.lambda_gan=0", "--model.init_args.discriminator=null",
    )  # fmt: skip
    gan, times["gan"] = train(
        f"gan{args.gan_steps}", args.gan_steps, f"--model.init_args.lambda_gan={args.lambda_gan}",
        "--model.init_args.init_generator=cm.io.PretrainedDenoiser",
        f"--model.init_args.init_generator.path={regression}",
    )  # fmt: skip
    ref = ROOT / "digits_ref.npz"
    if not ref.is_file():
        cm("eval", "ref", "--data", "configs/quickstart.yaml",
           "--feature", "cm.metrics.digits.DigitsFeatures", "--out", str(ref))  # fmt: skip
    samples = {}
    for name, ckpt in [("regression", regression), ("gan", gan), ("cd", Path(CD))]:
        samples[name] = ROOT / f"samples_{ckpt.parent.parent.parent.name}.npz"
        if not samples[name].is_file():
            cm("sample", "--ckpt_path", str(ckpt), "--num", str(NUM), "--out", str(samples[name]))
    samples["teacher"] = ROOT / "samples_teacher.npz"
    teacher_samples(pairs, samples["teacher"])

    suite_args = {"metrics": ("fid", "precision", "recall"), "reference": str(ref)}
    labels = {
        "regression": f"Regression only (PseudoHuber, {args.regression_steps} it)",
        "gan": f"+ GAN (lambda {args.lambda_gan}, +{args.gan_steps} it from regression)",
        "cd": "CD one-step (configs/cd_digits.yaml, 1500 it)",
        "teacher": "EDM teacher, DPM-Solver++(2M) 10 steps (= the pairs)",
    }
    print("| model | NFE | FID | precision | recall |\n|---|---|---|---|---|")
    for name, path in samples.items():
        suite = MetricSuite(feature=DigitsFeatures(), **suite_args)
        suite.update(torch.from_numpy(np.load(path)["arr_0"]))
        m = suite.compute()
        nfe = 10 if name == "teacher" else 1
        print(f"| {labels[name]} | {nfe} | {m['fid']:.2f} | {m['precision']:.3f} "
              f"| {m['recall']:.3f} |")  # fmt: skip
    print("wall seconds (0: reused):", {k: round(v) for k, v in times.items()})
    tiles = [grid(samples[n]) for n in ("teacher", "regression", "gan", "cd")]
    sheet = Image.new("L", (4 * 360 + 3 * 16, 360), 255)
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * 376, 0))
    Path("docs").mkdir(exist_ok=True)
    sheet.save("docs/d2g_digits.png")
    print("wrote docs/d2g_digits.png (teacher 10 NFE | regression | + GAN | CD; rows = class)")


if __name__ == "__main__":
    main()
