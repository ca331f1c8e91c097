"""Zero-shot editing with the digits models: class-keeping rates and the docs' pictures.

Runs Song et al. 2023, Alg. 4 (``cm.editing``) with the consistency-distilled digits model
(``runs/cd_digits``) and the EDM digits model (``runs/edm_digits``) on the 360 held-out digits of
``cm.metrics.digits.digits_split`` (never seen by the classifier; cm's generators train on all
1797 digits, there is no split they did not see). A digit "keeps its class" when the
``DigitsFeatures`` classifier gives the edited image the true label. Writes docs/editing_*.png::

    python scripts/editing_digits.py --steps 20
"""

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor

from cm.editing import Inpaint, SuperRes, edit, half_mask, slerp, start
from cm.editing.images import write_grid
from cm.io import load_denoiser, to_uint8
from cm.metrics.digits import DigitsFeatures, digits_split, load_digits_uint8
from cm.schedules import karras_sigmas
from cm.solvers import SeededNoise, heun
from cm.solvers.consistency import multistep

ROOT = Path(__file__).parents[1]
CD = ROOT / "runs/cd_digits/version_1/checkpoints/epoch=0-step=1500.ckpt"
EDM = ROOT / "runs/edm_digits/version_0/checkpoints/epoch=0-step=3000.ckpt"


def heldout() -> tuple[Tensor, Tensor]:
    """The held-out digits in [-1, 1] ``[360, 1, 8, 8]`` and their classes."""
    images, classes = load_digits_uint8()
    idx = torch.from_numpy(digits_split()[1])
    return images[idx].float() / 127.5 - 1, classes[idx]


def labels(classes: Tensor, informed: bool) -> Tensor:
    """One-hot true labels, or the mean label (1/10 each: no class information)."""
    if informed:
        return torch.nn.functional.one_hot(classes, 10).float()
    return torch.full((len(classes), 10), 0.1)


def accuracy(clf: DigitsFeatures, x: Tensor, classes: Tensor) -> float:
    """The fraction of ``x`` classified as ``classes``."""
    return (clf.logits(to_uint8(x).permute(0, 3, 1, 2)).argmax(1) == classes).float().mean().item()


def run(denoiser, y, op, sigmas, lab, solver, resample=1, x=None) -> Tensor:
    """Alg. 4 with per-image seeds 0..N-1 (``x``: a start state instead of Alg. 4's)."""
    noise = SeededNoise(range(len(y)))
    if x is None:
        x = start(y, float(sigmas[0]), noise.randn(y.shape[1:]), op)
    out = edit(denoiser, x, sigmas, lab, y, op, solver=solver, noise=noise, resample=resample)
    return out.clamp(-1, 1)


@torch.no_grad()
def chosen_label(cd, edm, y: Tensor, op: Inpaint, sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """Inpaint under each of the 10 labels; keep the completion the EDM model denoises best.

    A diffusion classifier (the denoising loss as a likelihood bound, Kingma et al. 2021) on the
    completed images: no true label and no classifier is used.
    """
    g = torch.Generator().manual_seed(0)
    probes = [(s, torch.randn((8, *y.shape), generator=g)) for s in (0.2, 0.5, 1.0)]
    outs, losses = [], []
    for k in range(10):
        lab = torch.nn.functional.one_hot(torch.full((len(y),), k), 10).float()
        out = run(cd, y, op, sigmas, lab, multistep)
        loss = sum(
            (edm(out + s * z, torch.full((len(y),), s), lab) - out).pow(2).flatten(1).sum(1) / s**2
            for s, zs in probes
            for z in zs
        )
        outs.append(out)
        losses.append(loss)
    best = torch.stack(losses, 1).argmin(1)
    return torch.stack(outs, 1)[torch.arange(len(y)), best], best


def rows(*xs: Tensor, n: int = 10) -> Tensor:
    """Interleave the first ``n`` images of each tensor into uint8 rows (one column each)."""
    return torch.stack([to_uint8(x[:n]) for x in xs], 1).flatten(0, 1)


def main() -> None:
    """Measure the class-keeping rates and write the pictures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="Consistency-loop steps.")
    p.add_argument("--edm_steps", type=int, default=18, help="Heun steps of the EDM model.")
    p.add_argument("--resample", type=int, default=4, help="RePaint jump-backs for EDM.")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    clf = DigitsFeatures()
    cd, _ = load_denoiser(CD)
    edm, _ = load_denoiser(EDM)
    y, c = heldout()
    n = len(y)
    print(f"{n} held-out digits; classifier accuracy on them: {accuracy(clf, y, c):.3f}")
    cm_sigmas, edm_sigmas = karras_sigmas(args.steps), karras_sigmas(args.edm_steps)

    # Inpainting: the right (or bottom) half is generated.
    pics = {}
    for side in ("right", "bottom"):
        op = Inpaint(half_mask(side, 8))
        print(f"inpaint {side} half (masked input alone: {accuracy(clf, op.project(y), c):.3f})")
        for informed in (True, False):
            tag = "true label" if informed else "mean label"
            t = time.time()
            out = run(cd, y, op, cm_sigmas, labels(c, informed), multistep)
            print(
                f"  CD, {args.steps}-step Alg. 4, {tag}: class kept {accuracy(clf, out, c):.3f}"
                f" ({time.time() - t:.0f} s)"
            )
            pics[side, informed] = out
        t = time.time()
        out, guess = chosen_label(cd, edm, y, op, cm_sigmas)
        print(
            f"  CD, {args.steps}-step Alg. 4, label chosen by the model: class kept "
            f"{accuracy(clf, out, c):.3f} (label right {(guess == c).float().mean():.3f}; "
            f"{time.time() - t:.0f} s)"
        )
        pics[side, None] = out
        for r in sorted({1, args.resample}) if side == "right" else ():
            t = time.time()
            out = run(edm, y, op, edm_sigmas, labels(c, True), heun, resample=r)
            print(
                f"  EDM, Heun {args.edm_steps} steps, resample {r}, true label: class kept "
                f"{accuracy(clf, out, c):.3f} ({time.time() - t:.0f} s)"
            )
    op = Inpaint(half_mask("right", 8))
    grid = rows(op.project(y), pics["right", None], pics["right", True], y)
    write_grid(grid, args.out / "editing_inpaint.png", nrow=4)

    # Super-resolution from 4x4 (patch 2) and 2x2 (patch 4).
    lab = labels(c, False)
    shown = []
    for patch in (2, 4):
        op = SuperRes(patch)
        out = run(cd, y, op, cm_sigmas, lab, multistep)
        print(
            f"superres x{patch} ({8 // patch}x{8 // patch} -> 8x8), CD, mean label: class kept "
            f"{accuracy(clf, out, c):.3f} (low-res input alone: "
            f"{accuracy(clf, op.project(y), c):.3f})"
        )
        shown += [op.project(y), out]
    write_grid(rows(*shown, y), args.out / "editing_superres.png", nrow=5)

    # SDEdit (Meng et al. 2022): 3-level strokes noised to sigma, then the consistency loop.
    stroke = y.clamp(-1, 1).add(1).round().sub(1)  # 3 gray levels {-1, 0, 1}
    outs = []
    for sigma in (0.5, 1.0, 2.0):
        sigmas = karras_sigmas(max(2, args.steps // 4), sigma_max=sigma)
        out = run(cd, stroke, None, sigmas, lab, multistep)
        print(
            f"sdedit sigma {sigma}: class kept {accuracy(clf, out, c):.3f} (strokes alone: "
            f"{accuracy(clf, stroke, c):.3f})"
        )
        outs.append(out)
    write_grid(rows(stroke, *outs), args.out / "editing_sdedit.png", nrow=4)

    # Denoising: y + sigma n with a known sigma, started at sigma.
    sigma = 0.5
    noisy = y + sigma * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    sigmas = karras_sigmas(4, sigma_max=sigma)
    out = run(cd, noisy, None, sigmas, lab, multistep, x=noisy)
    mse_in, mse_out = (noisy - y).pow(2).mean().item(), (out - y).pow(2).mean().item()
    print(
        f"denoise sigma {sigma}: MSE {mse_in:.3f} -> {mse_out:.3f}, class kept "
        f"{accuracy(clf, out, c):.3f} (noisy input: {accuracy(clf, noisy.clamp(-1, 1), c):.3f})"
    )
    write_grid(rows(noisy.clamp(-1, 1), out, y), args.out / "editing_denoise.png", nrow=3)

    # Interpolation (Sec. 6.1): slerp between the noises of two seeds, class 0..9 per row.
    k = 8
    z0, z1 = SeededNoise(range(10)).randn((1, 8, 8)), SeededNoise(range(10, 20)).randn((1, 8, 8))
    alphas = torch.linspace(0, 1, k)
    z = slerp(z0.repeat_interleave(k, 0), z1.repeat_interleave(k, 0), alphas.repeat(10))
    lab = torch.nn.functional.one_hot(torch.arange(10).repeat_interleave(k), 10).float()
    sigmas = karras_sigmas(2)
    noise = SeededNoise([i // k for i in range(10 * k)])
    out = edit(cd, z * float(sigmas[0]), sigmas, lab, noise=noise).clamp(-1, 1)
    write_grid(to_uint8(out), args.out / "editing_interpolation.png", nrow=k)
    print(f"wrote {', '.join(sorted(str(q.name) for q in args.out.glob('editing_*.png')))}")


if __name__ == "__main__":
    main()
