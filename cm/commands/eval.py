"""``cm eval``: metrics of a samples ``.npz`` against a reference, and ``cm eval ref`` to build one.

``cm eval samples.npz --ref ref.npz [--metrics fid is kid precision recall] [--json out.json]``
prints a table and writes JSON (default ``<samples>.metrics.json``).
``cm eval ref --data config.yaml --out ref.npz [--num N]`` caches the real-image statistics of
the ``data:`` section of a training YAML (see ``cm.metrics.reference`` for the file layout).
Both check their output before any work: never one of their inputs, an existing file only with
``--overwrite``.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from jsonargparse import ArgumentParser

from cm.commands.options import add_device_argument, add_overwrite_argument, resolve_device
from cm.errors import UserError
from cm.files import check_output
from cm.metrics.evaluate import FEATURE_HELP, npz_batches, read_samples, resolve_feature, write_json
from cm.metrics.features import build_extractor
from cm.metrics.reference import compute_reference
from cm.metrics.suite import METRICS, MetricSuite
from cm.training.datamodule import config_batches


def samples_parser():
    """Arguments of ``cm eval SAMPLES``."""
    p = ArgumentParser(
        exit_on_error=False,
        prog="cm eval",
        description="FID/IS/KID/precision/recall of a samples .npz (arr_0 uint8 NHWC) against "
        "reference statistics; `cm eval ref -h` builds a reference.",
    )
    p.add_argument("samples", type=str, help="Samples .npz written by cm sample (arr_0).")
    p.add_argument(
        "--ref",
        type=str | None,
        default=None,
        help="Reference .npz from `cm eval ref`, or a guided-diffusion batch (VIRTUAL_*.npz).",
    )
    p.add_argument(
        "--metrics",
        type=str,
        nargs="+",
        default=["fid", "is", "kid", "precision", "recall"],
        help=f"Metrics among {', '.join(m for m in METRICS if m != 'clip_score')}.",
    )
    p.add_argument("--feature", type=str, default="inception", help=FEATURE_HELP)
    p.add_argument("--batch_size", type=int, default=100, help="Images per forward pass.")
    p.add_argument("--kid_subset_size", type=int, default=1000, help="KID subset size.")
    p.add_argument("--pr_k", type=int, default=3, help="k of precision/recall.")
    p.add_argument("--clip_model", type=str, default="ViT-L-14", help="open_clip model.")
    p.add_argument("--clip_pretrained", type=str, default="openai", help="open_clip tag.")
    add_device_argument(p)
    p.add_argument(
        "--json",
        type=str | None,
        default=None,
        help="Output JSON (default <samples>.metrics.json).",
    )
    add_overwrite_argument(p)
    return p


def ref_parser():
    """Arguments of ``cm eval ref``."""
    p = ArgumentParser(
        exit_on_error=False,
        prog="cm eval ref",
        description="Compute and cache real-image statistics (mu, sigma, feature bank) in an .npz.",
    )
    p.add_argument(
        "--data",
        type=str,
        required=True,
        help="A training YAML whose data: section (class_path/init_args) builds the datamodule, "
        "or an .npz of uint8 images (arr_0); a guided-diffusion batch keeps its mu/sigma.",
    )
    p.add_argument("--out", type=str, required=True, help="Output .npz, written at this path.")
    p.add_argument("--num", type=int | None, default=None, help="Number of images (default all).")
    p.add_argument("--feature", type=str, default="inception", help=FEATURE_HELP)
    p.add_argument("--batch_size", type=int, default=100, help="Images per forward pass.")
    p.add_argument("--clip_model", type=str, default="ViT-L-14", help="open_clip model.")
    p.add_argument("--clip_pretrained", type=str, default="openai", help="open_clip tag.")
    add_device_argument(p)
    add_overwrite_argument(p)
    return p


def ref_main(
    args: Sequence[str], yaml_batches: Callable[[Path, int], Iterator[torch.Tensor]] | None = None
) -> Path:
    """``cm eval ref``: features of real images to a reference ``.npz``.

    ``yaml_batches(config, batch_size)`` reads the datamodule of a training YAML (the CLI passes
    ``cm.training.datamodule.config_batches``; ``cm.metrics`` does not import Lightning).
    """
    cfg = ref_parser().parse_args(list(args))
    data = Path(cfg.data)
    check_output(cfg.out, [data], cfg.overwrite)
    gaussian = None
    if data.suffix == ".npz":
        batches = npz_batches(data, cfg.batch_size)
        with np.load(data, allow_pickle=False) as arrays:
            # a guided-diffusion batch: keep its published Inception mu/sigma (all its images)
            published = {"mu", "sigma"} <= set(arrays.files) and "feature" not in arrays.files
            if published and cfg.feature == "inception" and cfg.num is None:
                gaussian = (arrays["mu"], arrays["sigma"])
    elif yaml_batches is not None:
        batches = yaml_batches(data, cfg.batch_size)
    else:
        raise UserError(f"Reading the data config '{data}' needs the cm CLI: cm eval ref --data.")
    feature = resolve_feature(cfg.feature)
    extractor = build_extractor(feature, cfg.clip_model, cfg.clip_pretrained)
    extractor = extractor.to(resolve_device(cfg.device))
    out = compute_reference(batches, extractor, cfg.out, cfg.num, gaussian)
    with np.load(out) as ref:
        print(f"Wrote {int(ref['num_images'])} {extractor.name} reference features to {out}")
    return out


def samples_main(args: Sequence[str]) -> dict[str, float]:
    """``cm eval SAMPLES``: metrics table on stdout and a JSON file."""
    cfg = samples_parser().parse_args(list(args))
    samples = Path(cfg.samples)
    images = read_samples(samples)
    if "clip_score" in cfg.metrics:
        raise UserError("clip_score needs captions, which a samples .npz has none of.")
    suite = MetricSuite(
        cfg.metrics,
        resolve_feature(cfg.feature),
        cfg.ref,
        cfg.kid_subset_size,
        cfg.pr_k,
        cfg.clip_model,
        cfg.clip_pretrained,
        device=resolve_device(cfg.device),
    )
    # Inputs are read and checked (the suite opened --ref); the output, before any features.
    out = Path(cfg.json) if cfg.json else samples.with_name(samples.stem + ".metrics.json")
    check_output(out, [samples, cfg.ref], cfg.overwrite, option="--json")
    for start in range(0, len(images), cfg.batch_size):
        suite.update(torch.from_numpy(images[start : start + cfg.batch_size]))
    values = suite.compute()
    print(f"{'metric':12s} value   ({len(images)} samples vs {cfg.ref})")
    for name, value in values.items():
        print(f"{name:12s} {value:.6g}")
    payload = {
        "samples": str(samples),
        "reference": cfg.ref,
        "num_samples": len(images),
        "feature": cfg.feature,
        "metrics": {k: v if math.isfinite(v) else None for k, v in values.items()},
    }
    print(f"Wrote {write_json(out, payload)}")
    return values


def main(
    args: Sequence[str],
    yaml_batches: Callable[[Path, int], Iterator[torch.Tensor]] | None = config_batches,
) -> dict[str, float] | Path:
    """``cm eval ref ...`` builds a reference; ``cm eval SAMPLES.npz ...`` evaluates samples."""
    args = list(args)
    if args and args[0] == "ref":
        return ref_main(args[1:], yaml_batches)
    return samples_main(args)


eval_main = main  # the name cm.metrics.evaluate had
