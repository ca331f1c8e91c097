"""One-step error of a CD student on the Gaussian mixture against the exact PF-ODE endpoints.

For seeds ``0..M-1`` the student's one-step samples (``cm.solvers.Sampler``, same per-seed noise
and labels as ``cm sample``) are compared with the endpoints of the SAME noise under the exact
mixture denoiser (``cm.solvers.heun`` on a fine Karras grid, float64). Prints the mean per-sample
RMSE, and for scale that of a trivial baseline: the mean of the sample's component.

    python scripts/cd_mixture_rmse.py --ckpt_path runs/cd_mixture/version_0/checkpoints/last.ckpt
"""

import argparse

import torch

from cm.bench import per_sample_rmse
from cm.io import build, load_any
from cm.oracle import GaussianMixture, RandomGaussianMixture
from cm.schedules import karras_sigmas
from cm.solvers import Sampler, SeededNoise, heun
from cm.solvers.sampling import seed_labels


def teacher_of(hparams: dict, args: argparse.Namespace) -> GaussianMixture:
    """The checkpoint's mixture teacher when it has one, else one from the command line."""
    teacher = hparams.get("objective", {}).get("init_args", {}).get("teacher")
    if isinstance(teacher, dict) and teacher.get("class_path", "").startswith("cm.oracle."):
        return build(teacher)
    return RandomGaussianMixture(args.num_components, args.resolution, args.channels, args.std)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print (and return) the student's and the baseline's mean RMSE."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="cm fit .ckpt or exported directory")
    parser.add_argument("--num", type=int, default=1000, help="seeds 0..num-1")
    parser.add_argument("--steps", type=int, default=256, help="Heun steps of the exact ODE")
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--sigma_max", type=float, default=80.0)
    # Only for exported directories, whose config holds no teacher (cd_mixture.yaml's data).
    parser.add_argument("--num_components", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--std", type=float, default=0.1)
    args = parser.parse_args(argv)

    student, hparams = load_any(args.ckpt_path)
    mixture = teacher_of(hparams, args)
    shape = tuple(mixture.means.shape[1:])
    net = getattr(student, "net", student)
    conditional = getattr(net, "label_dim", 0) > 0
    sampler = Sampler(num_steps=1, sigma_max=args.sigma_max)  # one-step consistency sampling
    grid = karras_sigmas(args.steps, sigma_max=args.sigma_max)
    errors, baseline = [], []
    for first in range(0, args.num, args.batch_size):
        seeds = list(range(first, min(first + args.batch_size, args.num)))
        labels = seed_labels(seeds, net.label_dim) if conditional else None  # as cm sample
        with torch.no_grad():
            x_student = sampler(student, seeds, shape, labels)
            x_T = SeededNoise(seeds).randn(shape).double() * args.sigma_max
            x_exact = heun(mixture, x_T, grid, labels)
        k = (
            labels.argmax(1)
            if conditional
            else torch.cdist(x_exact.flatten(1), mixture.means.flatten(1)).argmin(1)
        )
        errors.append(per_sample_rmse(x_student, x_exact))
        baseline.append(per_sample_rmse(mixture.means[k], x_exact))
    result = {
        "rmse": torch.cat(errors).mean().item(),
        "baseline": torch.cat(baseline).mean().item(),
    }
    print(
        f"one-step RMSE {result['rmse']:.4f} vs exact PF-ODE endpoints over {args.num} seeds; "
        f"component-mean baseline {result['baseline']:.4f}"
    )
    return result


if __name__ == "__main__":
    main()
