"""Evaluation metrics: FID, IS, KID, precision/recall, CLIP score, as torchmetrics ``Metric``s.

``MetricSuite`` runs the feature network once per batch and feeds every metric; reference
statistics of real images are cached by ``compute_reference`` (``cm eval ref``) and read by
``load_reference``; ``cm eval samples.npz --ref ref.npz`` evaluates a samples file.
"""

from cm.metrics.clip import ClipEncoder, CLIPScore
from cm.metrics.features import InceptionFeatures, ModuleFeatures, build_extractor, to_nchw_uint8
from cm.metrics.precision_recall import PrecisionRecall, knn_radii, precision_recall
from cm.metrics.reference import (
    Reference,
    compute_reference,
    gaussian_stats,
    load_reference,
    save_reference,
)
from cm.metrics.suite import LogitsIS, MetricSuite, ReferenceFID, ReferenceKID

__all__ = [
    "CLIPScore",
    "ClipEncoder",
    "InceptionFeatures",
    "LogitsIS",
    "MetricSuite",
    "ModuleFeatures",
    "PrecisionRecall",
    "Reference",
    "ReferenceFID",
    "ReferenceKID",
    "build_extractor",
    "compute_reference",
    "gaussian_stats",
    "knn_radii",
    "load_reference",
    "precision_recall",
    "save_reference",
    "to_nchw_uint8",
]
