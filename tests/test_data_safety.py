"""Outputs never destroy inputs: ``--out`` exactly at the path given, never onto an input, onto an
existing file only with ``--overwrite``, and with the umask's permissions.

Every case drives the real CLI in-process and checks the SHA-256 of every input file before and
after; every refusal is exit code 2 with one ``error:`` line and nothing written.
"""

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import DIGITS, fails, fit_args
from PIL import Image

from cm.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A one-step ``cm fit`` checkpoint of the tiny quickstart."""
    root = tmp_path_factory.mktemp("run")
    main(fit_args(root))
    return sorted(root.glob("**/checkpoints/*.ckpt"))[-1]


def hashes(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (files or folders)."""
    files = [f for r in roots for f in ([r] if r.is_file() else sorted(r.rglob("*")))]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


@contextmanager
def unchanged(*roots: Path) -> Iterator[None]:
    """Assert that no file under ``roots`` is added, removed or changed by the block."""
    before = hashes(*roots)
    assert before, "nothing to guard"
    yield
    assert hashes(*roots) == before


def sample(ckpt: Path, out: Path, *extra: str) -> list[str]:
    """``cm sample`` of two images of ``ckpt`` into ``out``."""
    return ["sample", "--ckpt_path", str(ckpt), "--num", "2", "--out", str(out), *extra]


def listing(path: Path) -> list[str]:
    """Every name under ``path`` (hidden temporary files included)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


INPUT = "one of this command's inputs"


# --- cm sample ------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--out", "--grid"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_sample_onto_checkpoint_is_refused(ckpt, tmp_path, capsys, option, overwrite):
    args = sample(ckpt, tmp_path / "s.npz", *overwrite, option, str(ckpt))  # a later --out wins
    with unchanged(ckpt.parents[2]):
        fails(args, INPUT, capsys)
    assert listing(tmp_path) == []


def test_sample_out_without_suffix_is_exact(ckpt, tmp_path):
    out, grid = tmp_path / "samples", tmp_path / "grid"
    with unchanged(ckpt.parents[2]):
        main(sample(ckpt, out, "--grid", str(grid)))
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 1)
    assert grid.read_bytes()[:8] == PNG and Image.open(grid).format == "PNG"
    assert listing(tmp_path) == ["grid", "samples"]  # no samples.npz, no .part file


def test_sample_onto_existing_file_needs_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "samples.npz"
    main(sample(ckpt, out))
    with unchanged(ckpt.parents[2], out):
        fails(sample(ckpt, out, "--seed", "5"), "already exists.*--overwrite", capsys)
    first = np.load(out)["arr_0"]
    with unchanged(ckpt.parents[2]):
        main(sample(ckpt, out, "--seed", "5", "--overwrite"))
    assert not np.array_equal(np.load(out)["arr_0"], first)  # replaced by seeds 5, 6
    assert listing(tmp_path) == ["samples.npz"]


def test_sample_grid_onto_out_is_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "s.npz"
    fails(sample(ckpt, out, "--grid", str(out)), "--grid .* is the --out file", capsys)
    assert listing(tmp_path) == []


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_follow_the_umask(ckpt, tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        main(sample(ckpt, tmp_path / "s.npz", "--grid", str(tmp_path / "g.png")))
        main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "export")])
    finally:
        os.umask(old)
    files = [tmp_path / "s.npz", tmp_path / "g.png", *(tmp_path / "export").iterdir()]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(mode)}


# --- cm edit --------------------------------------------------------------------------------------


def pngs(folder: Path, num: int) -> Path:
    """``num`` random 8x8 grayscale PNGs ``img<i>.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(num):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(
            folder / f"img{i}.png"
        )
    return folder


def edit(ckpt: Path, source: Path, out: Path, *extra: str) -> list[str]:
    """``cm edit`` (denoise, one step) of ``source`` into the folder ``out``."""
    return ["edit", "--ckpt_path", str(ckpt), "--task", "denoise", "--sigma", "0.5"] + [
        "--steps", "1", "--device", "cpu", "--input", str(source), "--out", str(out), *extra
    ]  # fmt: skip


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_edit_into_input_folder_is_refused(ckpt, tmp_path, capsys, overwrite):
    images = pngs(tmp_path / "in", 2)
    with unchanged(ckpt.parents[2], images):
        fails(edit(ckpt, images, images, *overwrite), "folder this command reads from", capsys)
        # one image of the folder as --input: its folder is an input folder too
        fails(edit(ckpt, images / "img0.png", images, *overwrite), "reads from", capsys)
        fails(edit(ckpt, images, images / "img0.png", *overwrite), "is a file", capsys)
    assert listing(tmp_path) == ["in", "in/img0.png", "in/img1.png"]


def test_edit_mask_in_output_folder_is_refused(ckpt, tmp_path, capsys):
    images, out = pngs(tmp_path / "in", 1), tmp_path / "out"
    mask = pngs(out, 1) / "img0.png"  # the result img0.png would replace the mask
    args = ["edit", "--ckpt_path", str(ckpt), "--task", "inpaint", "--mask", str(mask)]
    args += ["--steps", "1", "--device", "cpu", "--input", str(images), "--out", str(out)]
    with unchanged(images, out):
        fails([*args, "--overwrite"], "reads from", capsys)


def test_edit_onto_existing_files_needs_overwrite(ckpt, tmp_path, capsys):
    images, out = pngs(tmp_path / "in", 2), tmp_path / "out"
    with unchanged(ckpt.parents[2], images):
        main(edit(ckpt, images, out))
    assert listing(out) == ["img0.png", "img1.png", "side_by_side_0000.png"]
    (out / "img1.png").write_bytes(b"mine")
    with unchanged(ckpt.parents[2], images, out):
        fails(edit(ckpt, images, out), r"img0\.png' already exists.*--overwrite", capsys)
    with unchanged(ckpt.parents[2], images):
        main(edit(ckpt, images, out, "--overwrite"))
    assert Image.open(out / "img1.png").size == (8, 8)  # replaced by the edit
    assert listing(out) == ["img0.png", "img1.png", "side_by_side_0000.png"]


def test_edit_same_stem_twice_is_refused(ckpt, tmp_path, capsys):
    images = pngs(tmp_path / "in", 1)
    Image.open(images / "img0.png").save(images / "img0.jpg")  # both would be out/img0.png
    with unchanged(images):
        fails(edit(ckpt, images, tmp_path / "out"), "both be written", capsys)
    assert not (tmp_path / "out").exists()


# --- cm eval --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(ckpt, tmp_path_factory) -> Path:
    """An images ``.npz`` (arr_0 uint8 NHWC) for ``cm eval ref --data``."""
    path = tmp_path_factory.mktemp("images") / "images.npz"
    main(["sample", "--ckpt_path", str(ckpt), "--num", "8", "--out", str(path)])
    return path


def ref(data: Path, out: Path, *extra: str) -> list[str]:
    """``cm eval ref`` of ``data`` into ``out`` with the shipped digits features."""
    return ["eval", "ref", "--data", str(data), "--feature", DIGITS, "--out", str(out), *extra]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_eval_ref_onto_data_is_refused(images, capsys, overwrite):
    with unchanged(images.parent):
        fails(ref(images, images, *overwrite), INPUT, capsys)


def test_eval_ref_out_without_suffix_is_exact(images, tmp_path):
    with unchanged(images.parent):
        main(ref(images, tmp_path / "myref"))
    with np.load(tmp_path / "myref") as data:
        assert int(data["num_images"]) == 8 and data["mu"].ndim == 1
    assert listing(tmp_path) == ["myref"]


def test_eval_ref_onto_existing_file_needs_overwrite(images, tmp_path, capsys):
    out = tmp_path / "ref.npz"
    out.write_bytes(b"an older reference")
    with unchanged(images.parent, out):
        fails(ref(images, out), "already exists.*--overwrite", capsys)
    main(ref(images, out, "--overwrite"))
    assert int(np.load(out)["num_images"]) == 8 and listing(tmp_path) == ["ref.npz"]


def test_eval_json_onto_samples_is_refused(images, tmp_path, capsys):
    main(ref(images, tmp_path / "ref.npz"))
    args = ["eval", str(images), "--ref", str(tmp_path / "ref.npz"), "--feature", DIGITS]
    with unchanged(images.parent, tmp_path):
        fails([*args, "--metrics", "fid", "--json", str(images), "--overwrite"], INPUT, capsys)


# --- cm export and cm data inspect ----------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_onto_checkpoint_is_refused(ckpt, capsys, overwrite):
    args = ["export", "--ckpt_path", str(ckpt), *overwrite, "--out"]
    with unchanged(ckpt.parents[2]):
        fails([*args, str(ckpt)], "is a file", capsys)
        fails([*args, str(ckpt.parent)], "folder this command reads from", capsys)


def test_export_onto_existing_export_needs_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "export"
    args = ["export", "--ckpt_path", str(ckpt), "--out", str(out)]
    main(args)
    (out / "config.json").write_text("{}")  # an older export's config
    with unchanged(ckpt.parents[2], out):
        fails(args, "already exists.*--overwrite", capsys)
    with unchanged(ckpt.parents[2]):
        main([*args, "--overwrite"])
    assert "denoiser" in (out / "config.json").read_text()
    exported = ["README.md", "config.json", "model.safetensors", "training_config.yaml"]
    assert listing(tmp_path) == ["export", *(f"export/{name}" for name in exported)]


def test_data_preview_is_exact_and_outside_the_dataset(tmp_path, capsys):
    data = pngs(tmp_path / "data", 4)
    with unchanged(data):
        fails(["data", "inspect", str(data), "--out", str(data / "p.png")], INPUT, capsys)
        main(["data", "inspect", str(data), "--out", str(tmp_path / "preview")])
    assert (tmp_path / "preview").read_bytes()[:8] == PNG
    assert listing(tmp_path) == ["data", *(f"data/img{i}.png" for i in range(4)), "preview"]
