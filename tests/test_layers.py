"""The layer rule of DESIGN.md: the core imports without lightning."""

import pkgutil
import subprocess
import sys

import cm

# Every module of the package except the Lightning shell (cm.training, cm.commands, cm.cli).
CORE = sorted(
    m.name
    for m in pkgutil.walk_packages(cm.__path__, "cm.")
    if not m.name.startswith(("cm.training", "cm.commands", "cm.cli", "cm.__main__"))
)

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


def test_core_list_is_complete():
    assert {
        "cm.schedules",
        "cm.networks.adm",
        "cm.objectives.consistency",
        "cm.data.stream",
    } <= set(CORE)
