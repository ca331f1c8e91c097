"""Improved precision and recall (Kynkäänniemi et al. 2019, Eqs. 1-3), k-NN manifolds.

As OpenAI's guided-diffusion evaluator: the manifold of a feature set is the union of balls around
its points, each with radius the distance to its k-th nearest neighbour in the same set (itself
excluded). Precision is the fraction of generated features inside the real manifold, recall the
fraction of real features inside the generated manifold.
"""

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from cm.errors import UserError


def cat_state(state: list[Tensor] | Tensor) -> Tensor | None:
    """A ``cat`` state as one tensor: a list before a DDP sync, a tensor after; None if empty."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if len(state) else None


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``[A, B]`` between rows of ``a`` and ``b``."""
    # ||a||^2 + ||b||^2 - 2 a.b: one matmul, as guided-diffusion; clamp the rounding below 0.
    d = a.square().sum(1, keepdim=True) + b.square().sum(1)[None] - 2 * a @ b.T
    return d.clamp_min(0)


def _common(*features: Tensor) -> list[Tensor]:
    """The features in one dtype of at least float32 (float64 stays float64)."""
    dtype = torch.promote_types(features[0].dtype, torch.float32)
    return [f.to(dtype) for f in features]


def knn_radii(features: Tensor, k: int = 3, batch_size: int = 1024) -> Tensor:
    """Squared distance of each row of ``features`` ``[N, D]`` to its k-th nearest other row.

    Args:
        features: the feature set ``[N, D]``, ``N > k``.
        k: which neighbour (the paper's and guided-diffusion's default is 3).
        batch_size: rows per distance block (memory ``batch_size x N``).

    Returns:
        Squared radii ``[N]``.
    """
    n = features.shape[0]
    if n <= k:
        raise UserError(
            f"Precision/recall with k={k} needs more than {k} samples in each set, got {n}: "
            "evaluate more images or lower pr_k."
        )
    (features,) = _common(features)
    radii = []
    for start in range(0, n, batch_size):
        d = _sq_dists(features[start : start + batch_size], features)
        # the smallest value of each row is the point itself (0): the k-th other is index k
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(
    queries: Tensor, points: Tensor, radii: Tensor, batch_size: int = 1024
) -> Tensor:
    """Fraction of ``queries`` ``[M, D]`` inside at least one ball (``points``, squared ``radii``).

    Args:
        queries: features to test ``[M, D]``.
        points: ball centres ``[N, D]``.
        radii: squared radii ``[N]`` (``knn_radii(points)``).
        batch_size: queries per distance block.

    Returns:
        A scalar tensor in ``[0, 1]``.
    """
    queries, points = _common(queries, points)
    radii = radii.to(points.dtype)
    inside = []
    for start in range(0, queries.shape[0], batch_size):
        d = _sq_dists(queries[start : start + batch_size], points)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside).double().mean()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    """Improved precision and recall of ``fake`` ``[M, D]`` against ``real`` ``[N, D]``.

    Args:
        real: reference features.
        fake: generated features.
        k: neighbour defining each ball's radius.

    Returns:
        ``(precision, recall)`` as scalar tensors.
    """
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


class PrecisionRecall(Metric):
    """Improved precision/recall (Kynkäänniemi et al. 2019) of generated features vs a bank.

    Generated features are a ``cat`` state (gathered from all ranks by ``compute``); the reference
    bank is a non-persistent buffer, identical on every rank, whose radii are computed once.

    Args:
        reference: real features ``[N, D]``.
        k: neighbour defining each ball's radius.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, reference: Tensor, k: int = 3) -> None:
        super().__init__()
        self.k = k
        self.register_buffer("reference", reference.float(), persistent=False)
        self._ref_radii: Tensor | None = None
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, features: Tensor) -> None:
        """Store generated features ``[N, D]``."""
        self.fake_features.append(features.float())

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(precision, recall)`` of all generated features seen against the reference."""
        fake = cat_state(self.fake_features)
        if fake is None or fake.shape[0] <= self.k:
            n = 0 if fake is None else fake.shape[0]
            raise UserError(
                f"Precision/recall with k={self.k} needs more than {self.k} generated samples, "
                f"got {n}."
            )
        real = self.reference.to(fake.device)
        if self._ref_radii is None or self._ref_radii.device != real.device:
            self._ref_radii = knn_radii(real, self.k)  # O(N^2) once, reused for every evaluation
        precision = manifold_coverage(fake, real, self._ref_radii)
        recall = manifold_coverage(real, fake, knn_radii(fake, self.k))
        return precision.float(), recall.float()
