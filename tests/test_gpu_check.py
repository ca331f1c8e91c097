"""``scripts/gpu_check.sh`` without a GPU: its CPU form end to end, its errors, the GPU report.

The GPU form (one GPU, under 8 minutes) runs where there is one; here the same script runs its
CPU form (``CM_GPU_CHECK_CPU=1``: the gpu tests collected and skipped, ``cm bench`` on the
quickstart), and the report helper is given the files of a GPU run, written here, so that the
GPU form's tables (MFU, speed-ups, a timed-out part) are checked too.
"""

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

from cm.bench.report import write_rows

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
SPEC = importlib.util.spec_from_file_location("gpu_report", ROOT / "scripts" / "gpu_report.py")
gpu_report = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_report)


def run_check(*args: str) -> subprocess.CompletedProcess:
    """``bash scripts/gpu_check.sh ARGS`` in its CPU form, with this interpreter's ``python``."""
    env = {**os.environ, "CM_GPU_CHECK_CPU": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def cells(report: str, prefix: str) -> list[str]:
    """The cells of the one Markdown table row of ``report`` that starts with ``prefix``."""
    (row,) = [line for line in report.splitlines() if line.startswith(prefix)]
    return [c.strip() for c in row.strip("|").split("|")]


def test_cpu_form_runs_everything_it_can_and_names_the_skipped_cuda_parts(tmp_path):
    out = tmp_path / "check"
    done = run_check(str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = (out / "gpu_check.md").read_text()
    assert done.stdout == report  # printed at the end too
    parts = {row[0]: row for row in csv.reader((out / "parts.tsv").open(), delimiter="\t")}
    assert list(parts) == [
        "env", "peak", "tests", "sample_imagenet64", "sample_quickstart", "train_imagenet64",
        "train_quickstart",
    ]  # fmt: skip
    for key in ("peak", "sample_imagenet64", "train_imagenet64"):
        assert parts[key][2] == "SKIPPED: no CUDA"
        assert f"| {key} | {parts[key][1]} | SKIPPED: no CUDA | 0 | 0 |" in report
    for key in ("env", "tests", "sample_quickstart", "train_quickstart"):
        assert parts[key][2] == "ok" and 0 <= int(parts[key][3]) <= int(parts[key][4])
    assert "Form: **CPU** (CM_GPU_CHECK_CPU=1). SKIPPED because there is no CUDA" in report
    assert "Result: **all parts ok** (skipped: peak, sample_imagenet64, train_imagenet64)" in report
    assert "**bf16 matmul peak (the MFU denominator)**: SKIPPED: no CUDA" in report
    assert "torch.compile (inductor)**: SKIPPED: no CUDA" in report  # ImageNet-64 on CUDA
    assert "aot_eager backend (tracing only; compile on CUDA SKIPPED)**: ok" in report
    assert json.loads((out / "env.json").read_text())["cuda"] is False
    # The gpu tests were collected, and every one skipped.
    skipped = re.search(r"pytest: \*\*no GPU test ran\*\*: `(\d+) skipped in [\d.]+s`", report)
    assert skipped and int(skipped[1]) >= 20
    # cm bench train: eager and compiled rows with the CSV's figures, MFU n/a without a peak.
    rows = list(csv.DictReader((out / "train_quickstart.csv").open()))
    for row in rows:
        line = cells(report, f"| {row['run']} | 16 | 32-true |")
        assert line[3] == f"{float(row['step_ms_mean']):.4g} / {float(row['step_ms_median']):.4g}"
        assert float(line[4]) == float(f"{float(row['images_per_s']):.4g}") > 0
        assert float(line[5]) > 0 and float(line[6]) > 0 and line[7] == "n/a"
    assert float(cells(report, "| compiled (default) | 16 |")[9].strip("*x")) > 0
    # cm bench sample: one step vs 79-NFE Heun, the ratio of the medians.
    one = cells(report, "| onestep | 1 | 8 | 32 |")
    heun = cells(report, "| heun | 79 | 8 | 32 |")
    ratio = float(one[6].strip("*x"))
    assert ratio > 2 and float(heun[4]) > float(one[4]) > 0
    assert f"One step is **{one[6].strip('*')}** faster than 79-NFE Heun (medians)." in report
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        "env.log", "sample_quickstart.log", "tests.log", "train_quickstart.log",
    ]  # fmt: skip


def test_usage_and_an_occupied_outdir_are_one_line_errors(tmp_path):
    done = run_check()
    assert done.returncode == 2 and done.stderr.startswith("usage: bash scripts/gpu_check.sh")
    (tmp_path / "old.md").write_text("earlier results")
    done = run_check(str(tmp_path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"error: {tmp_path} exists and is not an empty directory: give a new or empty OUTDIR.\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["old.md"]


def test_gpu_form_report_from_the_files_of_a_gpu_run(tmp_path):
    (tmp_path / "logs").mkdir()
    env = {"cuda": True, "device": "NVIDIA H100 80GB HBM3", "capability": "9.0"}
    env |= {"memory_gib": 79.2, "torch": "2.9.0", "cuda_version": "12.8", "cudnn": "91002"}
    (tmp_path / "env.json").write_text(json.dumps(env))
    peak = {"peak_tflops": 700.0, "n": 8192, "repeats": 20}
    (tmp_path / "peak.json").write_text(json.dumps(peak))
    (tmp_path / "logs" / "tests.log").write_text("....\n30 passed, 861 deselected in 71.2s\n")
    (tmp_path / "logs" / "sample_imagenet64.log").write_text("warming up\nstill warming up\n")
    parts = [
        ("env", "environment", "ok", "4", "60"),
        ("peak", "bf16 matmul peak", "ok", "6", "60"),
        ("tests", "the gpu-marked tests in tests", "ok", "80", "150"),
        ("sample_imagenet64", "one step vs Heun", "TIMEOUT after 120 s", "130", "120"),
        ("train_imagenet64", "eager vs torch.compile", "ok", "150", "240"),
    ]
    tsv = "".join("\t".join(p) + "\tpython -m cm bench ...\n" for p in parts)
    (tmp_path / "parts.tsv").write_text(tsv)
    common = dict(device="NVIDIA H100 80GB HBM3", world_size=1, precision="bf16-mixed")
    common |= dict(channels_last=True, batch_per_device=128, mem="cuda max allocated")
    common |= dict(tflop_per_step=107.5, peak_tflops=700.0)
    eager = dict(run="eager", **common, step_ms_mean=400.0, step_ms_median=398.0)
    compiled = dict(run="compiled (default)", **common, step_ms_mean=320.0, step_ms_median=319.0)
    for row in (eager, compiled):
        row |= dict(images_per_s=128 / row["step_ms_mean"] * 1e3, peak_mem_gib=41.5)
        row["tflops_per_s"] = 107.5 / row["step_ms_mean"] * 1e3
        row |= dict(mfu=row["tflops_per_s"] / 700.0, speedup_vs_eager=400.0 / row["step_ms_mean"])
    write_rows([eager, compiled], tmp_path / "train_imagenet64.csv")
    report = gpu_report.render(tmp_path, "gpu", "", "450", "371")
    assert "Form: **GPU** (NVIDIA H100 80GB HBM3)." in report
    assert "Result: **FAILED: sample_imagenet64**" in report
    assert "| device | NVIDIA H100 80GB HBM3, sm 9.0, 79.2 GiB |" in report
    assert "pytest: **passed**: `30 passed, 861 deselected in 71.2s`" in report
    assert "**700 TFLOP/s** (8192^3 bf16 matmul, median of 20" in report
    assert cells(report, "| eager | 128 |") == [
        "eager", "128", "bf16-mixed", "400 / 398", "320", "107.5", "268.8", "38.4 %",
        "41.5 (cuda max allocated)", "**1x**",
    ]  # fmt: skip
    compiled_cells = cells(report, "| compiled (default) | 128 |")
    assert compiled_cells[7] == "48.0 %" and compiled_cells[9] == "**1.25x**"
    assert "Last lines of `logs/sample_imagenet64.log`:\n\n```\nwarming up\nstill" in report
    assert "wall time | 371 s in all (budget 450 s for the parts) |" in report
