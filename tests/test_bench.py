"""``cm bench solvers``: honest NFE counts, converging errors, the CLI's files and its errors."""

import csv

import pytest
import torch

from cm.bench import SOLVERS, bench_solvers, markdown_table
from cm.cli import main
from cm.oracle import RandomGaussianMixture

SHAPE = (1, 4, 4)
NFES = (3, 5, 7, 9)


def tiny(std: float = 0.5) -> RandomGaussianMixture:
    return RandomGaussianMixture(num_components=4, resolution=4, channels=1, std=std, seed=0)


def run(denoiser, **kwargs):
    options = dict(seeds=range(64), ref_steps=128, dtype=torch.float64) | kwargs
    return bench_solvers(denoiser, SHAPE, 0, NFES, None, **options)


class Calls:
    """An independent call counter around the oracle."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        return self.denoiser(x, sigma, labels)


@pytest.fixture(scope="module")
def smooth():
    return run(tiny(0.5))


def test_nfe_counted_equals_budget():
    counted = Calls(tiny())
    records = run(counted)
    ran = [r for r in records if r["rmse"] is not None]
    # One batch: the reference (Heun, 2n - 1 NFE) plus exactly the budget of every cell.
    assert counted.calls == 2 * 128 - 1 + sum(r["nfe"] for r in ran)
    assert {r["solver"] for r in records} == set(SOLVERS)
    by = {(r["solver"], r["nfe"]): r["steps"] for r in records}
    assert by["dpmpp_2m", 5] == 5 and by["unipc+afs", 5] == 6 and by["heun", 7] == 4
    assert by["heun", 3] == 2 and by["dpm2", 9] == 5
    skipped = bench_solvers(tiny(), SHAPE, 0, [4], ["heun"], range(4), ref_steps=8)
    assert skipped == [{"solver": "heun", "nfe": 4, "steps": None, "rmse": None, "fid": None}]
    assert "| 4 | — |" in markdown_table(skipped)


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "unipc"])
def test_error_decreases_with_nfe(smooth, solver):
    rmse = {r["nfe"]: r["rmse"] for r in smooth if r["solver"] == solver}
    assert rmse[9] < rmse[3]
    assert all(v > 0 for v in rmse.values())


def test_batches_and_labels_do_not_change_results():
    one = run(tiny(), seeds=range(16), ref_steps=16)
    split = run(tiny(), seeds=range(16), ref_steps=16, batch_size=5)
    for a, b in zip(one, split, strict=True):
        assert a["steps"] == b["steps"]
        assert a["rmse"] is None or a["rmse"] == pytest.approx(b["rmse"], rel=1e-9, abs=0)
    cond = bench_solvers(tiny(), SHAPE, 4, [3], ["euler"], range(8), ref_steps=16)
    assert cond[0]["solver"] == "euler (ddim)" and cond[0]["rmse"] > 0


def test_cli_writes_table_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--oracle", "mixture", "--num_components", "4", "--resolution", "4", "--std", "0.5"]
    main(["bench", "solvers", *args, "--num", "8", "--ref_steps", "16", "--out", str(out)])
    printed = capsys.readouterr().out
    table = (out / "solvers.md").read_text()
    assert table in printed and "| NFE | euler (ddim) | heun |" in table
    assert table.count("\n") == 4 + len(NFES) and "| 4 |" not in table and "FID" not in table
    rows = list(csv.DictReader((out / "solvers.csv").open()))
    assert len(rows) == len(SOLVERS) * len(NFES)
    assert {r["steps"] for r in rows if r["solver"] == "heun" and r["nfe"] == "5"} == {"3"}
    assert (out / "solvers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_options(tmp_path, capsys):
    main(
        ["bench", "solvers", "--oracle", "mixture", "--num_components", "3", "--resolution", "2"]
        + ["--conditional", "--num", "6", "--ref_steps", "8", "--nfe", "2", "4"]
        + ["--solvers", "ddim", "heun", "--schedule", "logsnr", "--out", str(tmp_path)]
    )
    table = (tmp_path / "solvers.md").read_text()
    assert table.splitlines()[2] == "| NFE | euler (ddim) | heun |"
    assert table.splitlines()[4].endswith("| — |")


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (["--oracle", "mixture", "--solvers", "rk4"], ValueError, "Unknown solver 'rk4'"),
        (["--oracle", "mixture", "--nfe", "0"], ValueError, "budgets must be integers >= 1"),
        ([], ValueError, "exactly one of --ckpt_path or --oracle"),
        (["--ckpt_path", "/nonexistent/model.ckpt"], FileNotFoundError, "does not exist"),
    ],
)
def test_user_errors_are_clear(tmp_path, args, error, match):
    with pytest.raises(error, match=match):
        main(["bench", "solvers", *args, "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="cm bench solvers"):
        main(["bench", "samplers"])


def test_function_rejects_bad_budgets():
    with pytest.raises(ValueError, match=">= 1"):
        bench_solvers(tiny(), SHAPE, nfes=[3, 0])
    with pytest.raises(ValueError, match="Unknown solver"):
        bench_solvers(tiny(), SHAPE, solvers=["heun", "nope"])


def test_fid_per_cell_matches_the_suite(tmp_path, capsys):
    """``--fid_ref``: each cell's samples scored by the metrics suite, as ``cm eval`` would."""
    from pathlib import Path

    import numpy as np

    from cm.io import to_uint8
    from cm.metrics import MetricSuite
    from cm.metrics.digits import DigitsFeatures
    from cm.solvers import Sampler, ipndm
    from cm.solvers.sampling import SeededNoise

    ref = tmp_path / "digits_ref.npz"
    quickstart = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    feature = "cm.metrics.digits.DigitsFeatures"
    main(["eval", "ref", "--data", str(quickstart), "--feature", feature, "--out", str(ref)])
    out = tmp_path / "bench"
    args = ["--oracle", "mixture", "--std", "0.5", "--num", "12", "--ref_steps", "16"]
    args += ["--nfe", "3", "5", "--solvers", "euler", "ipndm", "--fid_ref", str(ref)]
    main(["bench", "solvers", *args, "--feature", feature, "--out", str(out)])
    rows = {(r["solver"], r["nfe"]): r for r in csv.DictReader((out / "solvers.csv").open())}
    assert "FID" in (out / "solvers.md").read_text()
    # The same 12 ipndm samples at NFE 5, scored directly.
    gm = RandomGaussianMixture(10, 8, 1, 0.5, 0)
    x_T = SeededNoise(range(12)).randn((1, 8, 8)).double() * 80.0
    x = ipndm(gm, x_T, Sampler(num_steps=5).grid(gm))
    suite = MetricSuite(("fid",), DigitsFeatures(), str(ref))
    suite.update(to_uint8(x.float().clamp(-1, 1)))
    assert float(rows["ipndm", "5"]["fid"]) == pytest.approx(suite.compute()["fid"], rel=1e-6)
    assert np.isfinite(float(rows["euler (ddim)", "3"]["fid"]))
