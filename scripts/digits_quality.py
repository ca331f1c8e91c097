"""Score digit samples (``arr_0`` uint8 NHWC, 8x8) against scikit-learn's real digits.

Prints the Frechet distance in pixel space and in the hidden features of an MLP classifier
trained on the real digits, and the classifier's accuracy against ``arr_1`` labels when present.
For calibration it also scores held-out real digits and Gaussian-blurred real digits. This is a
benchmark aid for docs/benchmarks.md, not the project's acceptance metric.

    python scripts/digits_quality.py runs/quickstart/version_0/samples/samples.npz
"""

import argparse

import numpy as np
from scipy import linalg
from scipy.ndimage import gaussian_filter
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of ``a`` and ``b``."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def main() -> None:
    """Print the scores of the given sample files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", nargs="*", help=".npz files with arr_0 uint8 NHWC 8x8")
    args = parser.parse_args()
    digits = load_digits()
    real = digits.data / 16.0  # [1797, 64] in [0, 1]
    clf = MLPClassifier((128,), max_iter=2000, random_state=0).fit(real, digits.target)

    def features(x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0)

    def score(x: np.ndarray, labels: np.ndarray | None) -> str:
        acc = "" if labels is None else f"  class accuracy {np.mean(clf.predict(x) == labels):.3f}"
        return (
            f"pixel FD {frechet(x, real):8.3f}  "
            f"feature FD {frechet(features(x), features(real)):8.2f}"
            f"{acc}"
        )

    rng = np.random.default_rng(0)
    idx = rng.permutation(len(real))
    blurred = np.stack([gaussian_filter(r.reshape(8, 8), 1.0).ravel() for r in real])
    print(f"{'real (half)':>28}: {score(real[idx[:900]], digits.target[idx[:900]])}")
    print(f"{'blurred real (sigma 1 px)':>28}: {score(blurred, digits.target)}")
    print(f"{'uniform noise':>28}: {score(rng.random(real.shape), None)}")
    for path in args.samples:
        data = np.load(path)
        x = data["arr_0"].reshape(len(data["arr_0"]), -1) / 255.0
        labels = data["arr_1"] if "arr_1" in data else None
        print(f"{path[-28:]:>28}: {score(x, labels)}")


if __name__ == "__main__":
    main()
