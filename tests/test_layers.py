"""The layer rule of DESIGN.md: the core imports without lightning."""

import subprocess
import sys

CORE = [
    "cm.protocols",
    "cm.schedules",
    "cm.precond",
    "cm.oracle",
    "cm.ema",
    "cm.io",
    "cm.networks",
    "cm.networks.adm",
    "cm.solvers",
    "cm.solvers.rk",
    "cm.solvers.consistency",
    "cm.solvers.sampling",
    "cm.objectives",
    "cm.data",
    "cm.data.datasets",
    "cm.data.stream",
]

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning"):
            raise ImportError("lightning is blocked: " + name)
sys.meta_path.insert(0, Block())
import importlib
for m in {mods!r}:
    importlib.import_module(m)
assert not any(k.split(".")[0] in ("lightning", "pytorch_lightning") for k in sys.modules)
print("ok")
"""


def test_core_imports_without_lightning():
    out = subprocess.run(
        [sys.executable, "-c", BLOCK.format(mods=CORE)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
