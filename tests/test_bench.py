"""``cm bench``: solvers (honest NFE counts, converging errors, files, errors), train and sample."""

import csv

import pytest
import torch
from helpers import DIGITS, ICT_DIGITS, TINY_YAML, tiny_adm

from cm.bench import SOLVERS, bench_solvers, markdown_table
from cm.cli import main
from cm.commands.bench.train import train_main
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


def user_error(args: list[str], capsys) -> str:
    """The one-line ``error:`` message with which ``cm`` exits 2 on ``args``."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--oracle", "mixture", "--solvers", "rk4"], "Unknown solver 'rk4'"),
        (["--oracle", "mixture", "--nfe", "0"], "budgets must be integers >= 1"),
        ([], "exactly one of --ckpt_path or --oracle"),
        (["--ckpt_path", "/nonexistent/model.ckpt"], "does not exist"),
    ],
)
def test_user_errors_are_clear(tmp_path, capsys, args, match):
    assert match in user_error(["bench", "solvers", *args, "--out", str(tmp_path)], capsys)
    assert "use cm bench solvers, train or sample" in user_error(["bench", "samplers"], capsys)


def test_function_rejects_bad_budgets():
    with pytest.raises(ValueError, match=">= 1"):
        bench_solvers(tiny(), SHAPE, nfes=[3, 0])
    with pytest.raises(ValueError, match="Unknown solver"):
        bench_solvers(tiny(), SHAPE, solvers=["heun", "nope"])


def test_fid_per_cell_matches_the_suite(tmp_path, capsys):
    """``--fid_ref``: each cell's samples scored by the metrics suite, as ``cm eval`` would."""
    import numpy as np

    from cm.io import to_uint8
    from cm.metrics import MetricSuite
    from cm.metrics.digits import DigitsFeatures
    from cm.solvers import Sampler, ipndm
    from cm.solvers.sampling import SeededNoise

    ref = tmp_path / "digits_ref.npz"
    main(["eval", "ref", "--data", ICT_DIGITS, "--feature", DIGITS, "--out", str(ref)])
    out = tmp_path / "bench"
    args = ["--oracle", "mixture", "--std", "0.5", "--num", "12", "--ref_steps", "16"]
    args += ["--nfe", "3", "5", "--solvers", "euler", "ipndm", "--fid_ref", str(ref)]
    main(["bench", "solvers", *args, "--feature", DIGITS, "--out", str(out)])
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


# -- cm bench train / cm bench sample --------------------------------------------------------

TINY_FIT = ["--config", ICT_DIGITS, "--config", TINY_YAML]


def test_bench_train_cpu_reports_mfu_na_then_a_number(tmp_path, capsys):
    """The real training step of a tiny config: timings, FLOPs, MFU n/a without a known peak."""
    out = tmp_path / "train.csv"
    rows = train_main([*TINY_FIT, "--warmup", "1", "--steps", "3", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| eager | cpu" in table and table.rstrip().endswith("| n/a | n/a |")
    (row,) = list(csv.DictReader(out.open()))
    assert row["mfu"] == "" and row["peak_tflops"] == "" and row["batch_per_device"] == "16"
    assert float(row["step_ms_mean"]) > 0 and float(row["images_per_s"]) > 0
    # FLOPs of one CT step: online forward + backward (~3 forwards) plus the target forward.
    flops = float(row["tflop_per_step"]) * 1e12
    forward = count_forward_flops(16)
    assert 3.5 * forward < flops < 4.5 * forward
    assert float(row["tflops_per_s"]) == pytest.approx(
        flops / float(row["step_ms_mean"]) * 1e-9, rel=1e-3
    )
    assert rows[0]["mfu"] is None
    # With --peak_tflops, through the command line (and a dotted override of the batch).
    main(
        ["bench", "train", *TINY_FIT, "--data.init_args.batch_size=8", "--warmup=1"]
        + ["--steps", "2", "--peak_tflops", "0.5", "--out", str(out), "--overwrite"]
    )
    (row,) = list(csv.DictReader(out.open()))
    assert row["batch_per_device"] == "8" and row["peak_tflops"] == "0.5"
    assert float(row["mfu"]) == pytest.approx(float(row["tflops_per_s"]) / 0.5)
    assert "n/a |" not in capsys.readouterr().out.splitlines()[2]


def count_forward_flops(batch: int) -> float:
    """FLOPs of one forward of the tiny quickstart network, counted independently."""
    from torch.utils.flop_counter import FlopCounterMode

    net = tiny_adm()
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(batch, 1, 8, 8), torch.zeros(batch), torch.eye(10)[: batch % 10 + 1][[0]])
    return counter.get_total_flops()


def test_bench_train_compiled_and_synthetic(tmp_path, capsys):
    """Eager vs compiled rows (aot_eager backend: no C++ compiler in tests), synthetic data."""
    out = tmp_path / "train.csv"
    main(
        ["bench", "train", *TINY_FIT, "--compile", "default", "--backend", "aot_eager"]
        + ["--synthetic", "true", "--warmup", "2", "--steps", "2", "--out", str(out)]
    )
    eager, compiled = list(csv.DictReader(out.open()))
    assert eager["run"] == "eager" and compiled["run"] == "compiled (default)"
    assert eager["tflop_per_step"] == compiled["tflop_per_step"]
    assert float(compiled["speedup_vs_eager"]) > 0 and eager["speedup_vs_eager"] == "1.0"


def test_bench_sample_onestep_vs_heun(tmp_path, capsys):
    """1-step vs 2n-1-NFE Heun at the same batch, from a config and from a checkpoint."""
    out = tmp_path / "sample.csv"
    args = ["--batch_size", "4", "--heun_steps", "3", "--warmup", "1", "--repeats", "3"]
    main(["bench", "sample", *TINY_FIT, *args, "--precision", "bf16", "--out", str(out)])
    one, heun = list(csv.DictReader(out.open()))
    assert (one["solver"], one["nfe"], heun["solver"], heun["nfe"]) == ("onestep", "1", "heun", "5")
    assert one["batch"] == heun["batch"] == "4" and one["precision"] == "bf16"
    speedup = float(one["speedup_vs_heun"])
    assert speedup == pytest.approx(float(heun["ms_median"]) / float(one["ms_median"]))
    assert speedup > 1.5 and heun["speedup_vs_heun"] == "1.0"
    assert "| onestep | 1 | 4 |" in capsys.readouterr().out
    assert "either --ckpt_path or --config" in user_error(["bench", "sample"], capsys)
    assert "--steps must be >= 1" in user_error(["bench", "train", *TINY_FIT, "--steps=0"], capsys)
