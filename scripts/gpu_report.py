"""The helper of ``scripts/gpu_check.sh``: environment, bf16 matmul peak, the Markdown report.

Usage: ``python scripts/gpu_report.py env OUT.json`` (device, versions, git commit, LPIPS' VGG16),
``python scripts/gpu_report.py peak OUT.json`` (the measured bf16 matmul peak, the MFU denominator)
and ``python scripts/gpu_report.py report OUTDIR --form gpu`` (``OUTDIR/gpu_check.md`` from
``parts.tsv``, the JSON files, ``logs/tests.log`` and the CSV files ``cm bench`` wrote there).
The report is written whatever failed before it: it reads only files, and names what is missing.
"""

import argparse
import csv
import json
import math
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

TAIL = 15  # log lines shown for a part that failed
PYTEST_SUMMARY = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?)\b|no tests ran")
SECTIONS = {
    "env": "Environment",
    "tests": "1. GPU tests (`pytest -m gpu`)",
    "peak": "2. bf16 matmul peak",
    "train": "3. `cm bench train`",
    "sample": "4. `cm bench sample`",
}


def git(*args: str) -> str:
    """Output of ``git args`` in this checkout, or empty when git or the repository is absent."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def environment(path: Path) -> dict:
    """Write the device, library versions, git commit and VGG16 status as JSON to ``path``."""
    import torch

    from cm.weights import check_one

    cuda = torch.cuda.is_available()
    commit = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    info = {
        "cuda": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu {platform.machine()}",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else "",
        "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if cuda else "",
        "python": platform.python_version(),
        "commit": commit,
        "vgg16": check_one("vgg16").status,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    path.write_text(json.dumps(info, indent=1) + "\n")
    return info


def peak(path: Path, n: int = 8192, repeats: int = 20) -> dict:
    """Measure the bf16 ``n^3`` matmul TFLOP/s of CUDA device 0 and write it as JSON to ``path``."""
    import torch

    from cm.bench.sampling import measure_peak_tflops

    tflops = measure_peak_tflops(torch.device("cuda"), torch.bfloat16, n, repeats)
    info = {"peak_tflops": tflops, "n": n, "repeats": repeats, "dtype": "bfloat16"}
    path.write_text(json.dumps(info, indent=1) + "\n")
    print(f"{tflops:.1f}")
    return info


def read_parts(outdir: Path) -> list[dict]:
    """The rows ``gpu_check.sh`` recorded: key, title, status, seconds, limit, command."""
    names = ("key", "title", "status", "seconds", "limit", "command")
    path = outdir / "parts.tsv"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [dict(zip(names, line.split("\t"), strict=False)) for line in lines if line]


def read_json(path: Path) -> dict:
    """A JSON file's object, or an empty dict when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``cm bench`` CSV file, or none when it is absent."""
    return list(csv.DictReader(path.open())) if path.is_file() else []


def number(value: str | float | None, digits: int = 4) -> str:
    """A CSV cell as a number with ``digits`` significant digits; ``n/a`` when empty."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{x:.{digits}g}" if math.isfinite(x) else "n/a"


def percent(value: str | None) -> str:
    """A fraction as a percentage with one decimal; ``n/a`` when empty."""
    text = number(value)
    return text if text == "n/a" else f"{100 * float(value):.1f} %"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def train_table(rows: list[dict]) -> str:
    """The rows of ``cm bench train`` (eager, compiled): step time, throughput, MFU, speed-up."""
    header = ["run", "batch/device", "precision", "ms/step (mean / median)", "images/s"]
    header += ["TFLOP/step", "TFLOP/s", "MFU", "peak memory (GiB)", "speed-up vs eager"]
    body = [
        [
            r["run"],
            r["batch_per_device"],
            r["precision"],
            f"{number(r['step_ms_mean'])} / {number(r['step_ms_median'])}",
            number(r["images_per_s"]),
            number(r["tflop_per_step"]),
            number(r["tflops_per_s"]),
            percent(r.get("mfu")),
            f"{number(r['peak_mem_gib'], 3)} ({r['mem']})",
            f"**{number(r['speedup_vs_eager'], 3)}x**" if r.get("speedup_vs_eager") else "n/a",
        ]
        for r in rows
    ]
    return table(header, body)


def sample_table(rows: list[dict]) -> str:
    """The rows of ``cm bench sample`` (one step, Heun): time per call, throughput, ratio."""
    header = ["solver", "NFE", "batch", "precision", "ms/call (median)", "images/s"]
    header += ["speed-up vs Heun (medians)"]
    body = [
        [r["solver"], r["nfe"], r["batch"], r["precision"], number(r["ms_median"])]
        + [number(r["images_per_s"]), f"**{number(r['speedup_vs_heun'], 3)}x**"]
        for r in rows
    ]
    return table(header, body)


def pytest_lines(log: Path) -> tuple[str | None, list[str]]:
    """The final summary line of pytest and its ``FAILED``/``ERROR`` lines, from the part's log."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    summary = [line.strip("= ") for line in lines if PYTEST_SUMMARY.search(line)]
    failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return (summary[-1] if summary else None), failures


def tail(log: Path) -> str:
    """The last ``TAIL`` lines of a part's log as a code block."""
    lines = log.read_text(errors="replace").splitlines()[-TAIL:]
    return "```\n" + "\n".join(lines or ["(the log is empty)"]) + "\n```"


def part_body(part: dict, outdir: Path) -> list[str]:
    """The Markdown under one part's heading: status, then its figures or its log's tail."""
    out = [f"**{part['title']}**: {part['status']}", ""]
    key, ok = part["key"], part["status"] == "ok"
    log, summary = outdir / "logs" / f"{key}.log", None
    if key == "tests" and log.is_file():
        summary, failures = pytest_lines(log)
        verdict = "passed" if ok else "FAILED"
        if ok and "passed" not in (summary or ""):
            verdict = "no GPU test ran"
        out += [f"pytest: **{verdict}**: `{summary or 'no summary line in the log'}`", ""]
        out += [f"- `{line}`" for line in failures[:20]] + ([""] if failures else [])
    if key == "peak" and ok:
        p = read_json(outdir / "peak.json")
        out += [
            f"**{number(p.get('peak_tflops'))} TFLOP/s** ({p.get('n')}^3 bf16 matmul, median of "
            f"{p.get('repeats')} after 3 warm-up calls, `cm.bench.sampling.measure_peak_tflops`)"
            "; the MFU of `cm bench train` is against this figure.",
            "",
        ]
    rows = read_rows(outdir / f"{key}.csv")
    if rows and key.startswith("train"):
        out += [train_table(rows), ""]
    if rows and key.startswith("sample"):
        one = next((r for r in rows if r["solver"] == "onestep"), None)
        heun = next((r for r in rows if r["solver"] == "heun"), None)
        out += [sample_table(rows), ""]
        if one and heun:
            ratio = number(one["speedup_vs_heun"], 3)
            out += [f"One step is **{ratio}x** faster than {heun['nfe']}-NFE Heun (medians).", ""]
    if not ok and log.is_file() and summary is None:  # pytest's own summary says enough
        out += [f"Last lines of `logs/{key}.log`:", "", tail(log), ""]
    return out


def render(outdir: Path, form: str, why: str, budget: str, elapsed: str) -> str:
    """The whole report as Markdown."""
    env, parts = read_json(outdir / "env.json"), read_parts(outdir)
    bad = [p for p in parts if p["status"] != "ok" and not p["status"].startswith("SKIPPED")]
    skipped = [p["key"] for p in parts if p["status"].startswith("SKIPPED")]
    lines = ["# cm GPU check", ""]
    if form == "gpu":
        lines += [f"Form: **GPU** ({env.get('device', 'unknown device')}).", ""]
    else:
        lines += [
            f"Form: **CPU** ({why}). SKIPPED because there is no CUDA: the bf16 matmul peak, "
            "the GPU tests (collected and skipped), torch.compile on CUDA (inductor) and the "
            "ImageNet-64 benchmarks; `cm bench` ran on configs/quickstart.yaml at tiny sizes "
            "instead.",
            "",
        ]
    verdict = "all parts ok" if not bad else "FAILED: " + ", ".join(p["key"] for p in bad)
    lines += [f"Result: **{verdict}**" + (f" (skipped: {', '.join(skipped)})" if skipped else "")]
    memory = f", {number(env.get('memory_gib'), 3)} GiB" if env.get("memory_gib") else ""
    capability = f", sm {env['capability']}" if env.get("capability") else ""
    cudnn = f", cuDNN {env['cudnn']}" if env.get("cudnn") else ""
    facts = [
        ["device", f"{env.get('device', 'unknown')}{capability}{memory}"],
        ["torch", f"{env.get('torch', '?')} (CUDA {env.get('cuda_version', '?')}{cudnn})"],
        ["python", env.get("python", "?")],
        ["git commit", env.get("commit", "unknown")],
        ["date", env.get("date", "?")],
        ["LPIPS' VGG16 weights", env.get("vgg16", "?")],
        ["wall time", f"{elapsed} s in all (budget {budget} s for the parts)"],
    ]
    lines += ["", table(["", ""], facts), "", "## Parts", ""]
    rows = [[p["key"], p["title"], p["status"], p["seconds"], p["limit"]] for p in parts]
    lines += [table(["part", "what", "status", "wall time (s)", "limit (s)"], rows), ""]
    for prefix, heading in SECTIONS.items():
        members = [p for p in parts if p["key"].startswith(prefix) and prefix != "env"]
        if members:
            lines += [f"## {heading}", ""]
            for part in members:
                lines += part_body(part, outdir)
    lines += ["## Commands", "", "Each part's log is `logs/<part>.log` next to this file.", ""]
    lines += [f"- {p['key']}: `{p['command']}`" for p in parts if p.get("command")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parse the subcommand (env, peak, report) and run it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("env", help="device and versions as JSON").add_argument("out", type=Path)
    sub.add_parser("peak", help="bf16 matmul peak as JSON").add_argument("out", type=Path)
    r = sub.add_parser("report", help="OUTDIR/gpu_check.md from OUTDIR's files")
    r.add_argument("outdir", type=Path)
    r.add_argument("--form", choices=["gpu", "cpu"], required=True, help="Which form ran.")
    r.add_argument("--why", default="", help="Why the CPU form ran.")
    r.add_argument("--budget", default="?", help="The parts' time budget in seconds.")
    r.add_argument("--elapsed", default="?", help="Wall time of the whole check in seconds.")
    args = p.parse_args(argv)
    match args.action:
        case "env":
            environment(args.out)
        case "peak":
            peak(args.out)
        case "report":
            text = render(args.outdir, args.form, args.why, args.budget, args.elapsed)
            (args.outdir / "gpu_check.md").write_text(text)
            print(f"Wrote {args.outdir / 'gpu_check.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
