"""A MeanFlow flow map through the real CLI: ``cm fit``, ``cm sample --steps 1|2|4`` (flow-map
jumps, no re-noising), export, and ``cm edit`` inpainting with it as a denoiser."""

import csv

import numpy as np
import pytest
import torch
import yaml
from helpers import CONFIGS, DIGITS, ICT_DIGITS, fit_args, last_ckpt
from test_editing import read_png, write_digits

from cm.cli import main
from cm.commands.edit import edit_main
from cm.io import load

MEANFLOW = CONFIGS / "meanflow_digits.yaml"


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("meanflow_run")
    main(fit_args(root, steps=3, config=MEANFLOW))
    return last_ckpt(root)


def test_sample_any_number_of_steps_and_export(flow_ckpt, tmp_path):
    outs = {}
    for steps in (1, 2, 4):
        out = tmp_path / f"s{steps}.npz"
        main(["sample", "--ckpt_path", str(flow_ckpt), "--num", "5", "--steps", str(steps),
              "--out", str(out)])  # fmt: skip
        outs[steps] = np.load(out)["arr_0"]
        assert outs[steps].shape == (5, 8, 8, 1)
    assert not np.array_equal(outs[1], outs[4])  # more jumps, another path
    export_dir = tmp_path / "export"
    main(["export", "--ckpt_path", str(flow_ckpt), "--out", str(export_dir)])
    again = tmp_path / "e.npz"
    main(["sample", "--ckpt_path", str(export_dir), "--num", "5", "--steps", "2",
          "--out", str(again)])  # fmt: skip
    assert np.array_equal(np.load(again)["arr_0"], outs[2])
    flow_map = load(export_dir)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(flow_map.flow_map(x, 2.0, 2.0), x)  # the export is a flow map


def test_edit_inpaints_with_a_flow_map(flow_ckpt, tmp_path):
    from PIL import Image

    images = write_digits(tmp_path / "in", 2)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 5:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = edit_main([
        "--ckpt_path", str(flow_ckpt), "--task", "inpaint", "--input", str(tmp_path / "in"),
        "--mask", str(tmp_path / "mask.png"), "--steps", "2", "--device", "cpu",
        "--out", str(tmp_path / "o"),
    ])  # fmt: skip
    for i, image in enumerate(images):
        result = read_png(out / f"img{i}.png")
        np.testing.assert_array_equal(result[:, :5], image[:, :5])  # known pixels kept exactly


def test_generative_metrics_score_one_and_two_jumps(tmp_path):
    # GenerativeMetrics takes a flow map unchanged: FID of 1- and 2-NFE samples during fit.
    reference = tmp_path / "digits_ref.npz"
    main(["eval", "ref", "--data", ICT_DIGITS, "--feature", DIGITS, "--out", str(reference)])
    flow = {"solver": "cm.solvers.flowmap", "schedule": "flow", "sigma_max": 1.0e6}
    samplers = [
        {"class_path": "cm.solvers.Sampler", "init_args": {**flow, "num_steps": n}} for n in (1, 2)
    ]
    callback = {
        "class_path": "cm.training.GenerativeMetrics",
        "init_args": {"reference": str(reference), "metrics": ["fid"], "num": 20,
                      "batch_size": 10, "every_n_steps": 2, "feature": {"class_path": DIGITS},
                      "samplers": samplers},
    }  # fmt: skip
    extra = tmp_path / "metrics.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    root = tmp_path / "run"
    main(fit_args(root, "--config", str(extra), steps=2, config=MEANFLOW))
    rows = list(csv.DictReader(next(root.glob("**/metrics.csv")).open()))
    keys = {k for row in rows for k, v in row.items() if v and k.startswith("metrics/fid")}
    assert {"metrics/fid_flowmap_1", "metrics/fid_flowmap_2"} <= keys, keys
