"""``cm data inspect PATH``: what a dataset on disk holds, and a preview grid of its images."""

from collections.abc import Sequence
from typing import Literal

from jsonargparse import ArgumentParser

from cm.commands.options import add_overwrite_argument
from cm.data.inspect import DatasetSummary, inspect_dataset


def main(args: Sequence[str]) -> DatasetSummary:
    """``cm data inspect PATH [--dataset ...]``: print what is at PATH and write a preview grid."""
    inspect = ArgumentParser(
        exit_on_error=False, description="Count and preview a dataset on disk."
    )
    inspect.add_argument("path", type=str, help="Dataset folder or .zip.")
    inspect.add_argument(
        "--dataset",
        type=Literal["auto", "cifar10", "imagenet64", "lsun", "folder"],
        default="auto",
        help="Dataset kind; auto detects it from the files at PATH.",
    )
    inspect.add_argument(
        "--resolution",
        type=int | None,
        default=None,
        help="Image size (LSUN is center-cropped to it; default: the data's own, LSUN 256).",
    )
    inspect.add_argument(
        "--out", type=str, default="preview.png", help="Preview grid PNG (outside the dataset)."
    )
    add_overwrite_argument(inspect)
    inspect.add_argument("--num", type=int, default=64, help="Images in the preview.")
    inspect.add_argument(
        "--split", type=Literal["train", "test"], default="train", help="cifar10/imagenet64 split."
    )
    inspect.add_argument(
        "--cache_dir", type=str | None, default=None, help="imagenet64 cache (default: PATH)."
    )
    parser = ArgumentParser(
        exit_on_error=False, prog="cm data", description="Tools for datasets on disk."
    )
    commands = parser.add_subcommands(dest="command")
    commands.add_subcommand("inspect", inspect, help="Count and preview a dataset on disk.")
    cfg = parser.parse_args(list(args)).inspect
    summary = inspect_dataset(
        cfg.path,
        cfg.dataset,
        cfg.resolution,
        cfg.out,
        cfg.num,
        cfg.split,
        cfg.cache_dir,
        cfg.overwrite,
    )
    print(summary)
    return summary


data_main = main  # the name cm.data.inspect had
