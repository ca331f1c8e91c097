"""The layout of docs/architecture.md: layer contract, no cycles, short modules, the cm menu."""

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from cm.cli import BENCHMARKS, COMMANDS, main

ROOT = Path(__file__).parents[1]
MODULES = sorted((ROOT / "cm").rglob("*.py"))
EVERY = ("fit", "validate", "test", "predict", "sample", "export", "data", "eval", "edit")


def test_lint_imports_contracts_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


def test_no_function_level_imports_of_cm():
    # Only cm/cli.py imports lazily (importlib), so `cm --help` stays fast; nothing hides a cycle.
    pattern = re.compile(r"^\s+(from cm[. ]|import cm)")
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in MODULES
        if path.name != "cli.py" or path.parent.name != "cm"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.match(line)
    ]
    assert not found


def test_no_import_cycles_between_modules():
    # grimp sees every import, function-level ones included; a cycle is a strongly connected set.
    graph = grimp.build_graph("cm")
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    for start in edges:
        seen, stack = set(), [start]
        while stack:
            for nxt in edges[stack.pop()]:
                assert nxt != start, f"import cycle through {start}: " + str(
                    graph.find_shortest_chain(nxt, start)
                )
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)


def test_modules_are_short():
    long = {
        str(p.relative_to(ROOT)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 450
    }
    assert not long


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"]])
def test_menu_lists_every_subcommand(args, capsys):
    main(args)  # returns: exit status 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cm ")
    listed = re.findall(r"^  (\w+) +\S", out, re.M)
    assert listed == list(COMMANDS) and set(EVERY + ("weights", "bench")) <= set(listed)
    assert "Lightning Trainer command line tool" not in out


def test_unknown_command_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: Unknown command 'frobnicate'")
    assert all(name in err for name in COMMANDS)


@pytest.mark.parametrize("args", [["bench"], ["bench", "--help"]])
def test_bench_help_lists_benchmarks(args, capsys):
    main(args)
    out = capsys.readouterr().out
    assert (
        re.findall(r"^  (\w+) +\S", out, re.M) == ["solvers", "train", "sample"] == list(BENCHMARKS)
    )


def test_unknown_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "nope"])
    assert exit_info.value.code == 2
    assert "use cm bench solvers, train or sample" in capsys.readouterr().err


def test_help_is_fast_and_lightweight():
    code = "import sys; from cm.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("False"), out.stderr


@pytest.mark.parametrize("name", EVERY[3:] + ("weights",))
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"] if name != "data" else [name, "inspect", "--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


OLD_PATHS = [
    ("cm.io", "PretrainedDenoiser", "cm.teacher", "PretrainedDenoiser"),
    ("cm.io", "load_checkpoint", "cm.checkpoint", "load_checkpoint"),
    ("cm.io", "load_predictor", "cm.checkpoint", "load_predictor"),
    ("cm.io", "export", "cm.checkpoint", "export"),
    ("cm.io", "load", "cm.checkpoint", "load"),
    ("cm.io", "load_denoiser", "cm.checkpoint", "load_denoiser"),
    ("cm.io", "to_uint8", "cm.sample_files", "to_uint8"),
    ("cm.io", "save_npz", "cm.sample_files", "save_npz"),
    ("cm.io", "save_grid", "cm.sample_files", "save_grid"),
    ("cm.io", "image_spec", "cm.protocols", "image_spec"),
    ("cm.io", "resolve_device", "cm.device", "resolve_device"),
    ("cm.io", "atomic_path", "cm.files", "atomic_path"),
    ("cm.io", "_convert", "cm.convert", "convert_state"),
    ("cm.io", "Format", "cm.convert", "Format"),
    ("cm.cli", "CMCLI", "cm.commands.fit", "CMCLI"),
    ("cm.cli", "sample_main", "cm.commands.sample", "main"),
    ("cm.cli", "export_main", "cm.commands.export", "main"),
    ("cm.cli", "is_user_error", "cm.commands.errors", "is_user_error"),
    ("cm.sample", "_import_solver", "cm.sample", "import_solver"),
    ("cm.sample", "_sampler_from", "cm.sample", "sampler_from"),
]


@pytest.mark.parametrize(
    "old, name, new, new_name", OLD_PATHS, ids=[f"{o}.{n}" for o, n, *_ in OLD_PATHS]
)
def test_old_import_paths_are_aliases(old, name, new, new_name):
    assert getattr(importlib.import_module(old), name) is getattr(
        importlib.import_module(new), new_name
    )


def test_old_teacher_path_in_a_checkpoint_still_loads(tmp_path):
    # Checkpoints and exports written before the split name cm.io.PretrainedDenoiser: cm.trust
    # accepts it (defined in cm), and the teacher loads through it.
    import torch

    from cm.checkpoint import build, export
    from cm.trust import check_config

    net = {"class_path": "cm.networks.NCSNpp", "init_args": {
        "img_resolution": 8, "in_channels": 1, "out_channels": 1, "model_channels": 8,
        "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [],
    }}  # fmt: skip
    config = {"class_path": "cm.precond.EDMPrecond", "init_args": {"net": net}}
    export(build(config), tmp_path / "teacher", config)
    old = {
        "class_path": "cm.io.PretrainedDenoiser",
        "init_args": {"path": str(tmp_path / "teacher")},
    }
    check_config({"teacher": old}, "old.ckpt")  # no UntrustedConfigError
    teacher = build(old, tmp_path / "old.ckpt")
    assert type(teacher).__module__ == "cm.teacher"
    x = torch.randn(2, 1, 8, 8)
    assert teacher(x, torch.ones(2)).shape == x.shape
