"""The trust model: ``class_path``s read from files may only name cm's classes (and torch.optim).

A YAML config a user passes is the user's code and is trusted. A config read from a file that
cm loads as data (an export's ``config.json``, a ``.ckpt``'s hyperparameters) is not: jsonargparse
would import and instantiate whatever class it names, and a class such as torch-fidelity's
Inception unpickles a file given as an argument. ``check_config`` walks such a config before
anything in it is imported and refuses every import path outside the allowlist, unless the user
opted in with ``--trust_config`` (as Hugging Face's ``trust_remote_code``).
"""

import importlib
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any

from cm.errors import UntrustedConfigError

# Module trees whose classes and functions a file may name: cm itself and the optimizers and
# schedulers (torch.optim.lr_scheduler) that cm's modules take as configs. Lightning callbacks and
# loggers never appear in saved hyperparameters; diffusers/transformers are wrapped by cm classes.
ALLOWED_MODULES = ("cm", "torch.optim")
OPT_IN = "--trust_config"
# A dotted import path anywhere in a string (jsonargparse also parses strings as YAML, so a
# path may hide inside "{class_path: ...}"), a bare class name that jsonargparse resolves against
# already-imported subclasses, and a class_path written inside such an embedded document.
# Neighbours such as / or - make a token part of a file name, which import_object never imports.
_DOTTED = re.compile(r"(?<![\w./\\~=@-])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?![\w/\\-])")
_BARE_CLASS = re.compile(r"[A-Z]\w*[a-z]\w*")  # CapWords; not RGB, L, or YAML's True/None
_EMBEDDED_CLASS_PATH = re.compile(r"""class_path["']?\s*:\s*["']?([\w.]*)""")
_CLASS_PATH_KEYS = ("class_path", "_class_path")
# What LightningCLI saves beside a module's hyperparameters (for load_from_checkpoint).
_INSTANTIATOR = ("_instantiator", "lightning.pytorch.cli.instantiate_module")
_MAX_READ = 1 << 20  # embedded config files are small; weights are not configs
_DATA_SUFFIXES = ("ckpt", "pt", "pth", "safetensors", "bin", "npz", "npy", "zip", "json", "yaml")


def check_config(config: Any, source: str | Path, trust_config: bool = False) -> None:
    """Refuse a config read from ``source`` that names code outside ``ALLOWED_MODULES``.

    Checks every ``class_path`` (bare class names included), every string holding a dotted
    import path (Callable-typed values such as a Sampler's ``solver``), text files that a string
    names (jsonargparse reads a subclass value given as a path as a config), and a
    ``trust_config: true`` smuggled into a nested teacher. Nothing outside the allowlist is
    imported; allowed paths are resolved to check that they are defined there, not re-exported.

    Args:
        config: the parsed JSON/YAML or hyperparameters (nested dicts, lists, scalars).
        source: the file it was read from, named in the error.
        trust_config: the user's opt-in: skip every check.

    Raises:
        UntrustedConfigError: naming ``source``, the import path and ``--trust_config``.
    """
    if not trust_config:
        _walk(config, str(source), depth=0)


def check_import_path(path: str, source: str) -> None:
    """Refuse an import path (e.g. ``--solver``) that is not a function or class of cm."""
    if not _allowed(path):
        raise UntrustedConfigError(
            f"{source} {path!r} is not in cm (only cm.* import paths are allowed): use a "
            f"cm.solvers name such as heun, or pass {OPT_IN} to import other code."
        )


def _walk(value: Any, source: str, depth: int) -> None:
    """Check ``value`` and everything nested in it."""
    if depth > 64:  # a config this deep is not one cm wrote
        _refuse(source, "a config nested more than 64 levels deep", "value")
    if isinstance(value, dict):
        for key, item in value.items():
            if key in _CLASS_PATH_KEYS:
                _check_class_path(item, source)
            elif (key, item) == _INSTANTIATOR:
                continue
            elif key == "trust_config" and item not in (False, None, "false", "False"):
                raise UntrustedConfigError(
                    f"'{source}' sets trust_config: {item} for a file it loads: only the user can "
                    f"opt in, so pass {OPT_IN} only if you trust where the file came from."
                )
            else:
                _walk(item, source, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _walk(item, source, depth + 1)
    elif isinstance(value, str):
        _check_string(value, source)


def _check_class_path(value: Any, source: str) -> None:
    """A ``class_path`` must be a full dotted path into ``ALLOWED_MODULES``."""
    if not isinstance(value, str) or "." not in value or not _allowed(value):
        _refuse(source, value, "class_path")


def _check_string(text: str, source: str, follow: bool = True) -> None:
    """Refuse import paths a string value may be turned into by jsonargparse."""
    if _BARE_CLASS.fullmatch(text.strip()) and text.strip() not in ("True", "False", "None"):
        _refuse(source, text, "class name")
    for match in _EMBEDDED_CLASS_PATH.finditer(text):
        _check_class_path(match.group(1), source)
    for path in _DOTTED.findall(text):
        if path == text and _is_data_file(path):
            continue
        if not _allowed(path) and _importable_top(path):
            _refuse(source, path, "import path")
    if follow and "\n" not in text and len(text) < 4096:
        _check_named_file(text, source)


def _check_named_file(text: str, source: str) -> None:
    """A string naming a small text file: jsonargparse may read it as a sub-config."""
    try:
        path = Path(text)
        if not path.is_file() or path.stat().st_size > _MAX_READ:
            return
        content = path.read_bytes().decode("utf-8")
    except (OSError, ValueError):  # not a path, unreadable, or binary (weights): not a config
        return
    _check_string(content, f"{source} (via '{text}')", follow=False)


def _is_data_file(text: str) -> bool:
    """An existing file such as ``test.ckpt`` that looks like an import path of module ``test``."""
    return text.rpartition(".")[2] in _DATA_SUFFIXES and Path(text).exists()


def _importable_top(path: str) -> bool:
    """Whether the first component of ``path`` is an installed module (found, not imported)."""
    try:
        return importlib.util.find_spec(path.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _in_allowed(module: str) -> bool:
    """Whether the module name ``module`` lies in one of ``ALLOWED_MODULES``."""
    return any(module == m or module.startswith(f"{m}.") for m in ALLOWED_MODULES)


def _allowed(path: str) -> bool:
    """Whether ``path`` names a class or function defined in ``ALLOWED_MODULES``.

    The prefix is checked before any import. Then only allowed modules are imported, to reject
    names that an allowed module merely imported (``cm.io.torch.load``). A path that does not
    resolve is let through: jsonargparse then fails on it with its own message.
    """
    parts = path.split(".")
    if not all(p.isidentifier() for p in parts) or not _in_allowed(path):
        return False
    for cut in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:cut])
        if not _in_allowed(name):
            return True  # nothing importable inside the allowlist: unresolvable
        try:
            obj: Any = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and not name.startswith(e.name):
                return True  # an optional dependency of a cm module is missing
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return True
            obj = getattr(obj, attr)
            if inspect.ismodule(obj) and not _in_allowed(obj.__name__):
                return False
        target = getattr(obj, "func", obj)  # functools.partial solvers
        module = getattr(target, "__module__", None) if callable(target) else None
        return module is None or _in_allowed(module)
    return True


def _refuse(source: str, value: Any, what: str) -> None:
    """Raise the one-sentence refusal."""
    raise UntrustedConfigError(
        f"'{source}' names {what} {value!r}, which is not a class or function of cm or "
        f"torch.optim: loading it could run code from that file, so pass {OPT_IN} only if you "
        "trust where the file came from."
    )


TRUST_HELP = (
    "Build any class that a checkpoint's hyperparameters or an export's config.json name (and "
    "import any --solver path). Off by default: files are data and may only name cm's classes "
    "and torch.optim; set it only for files you trust, as they can run code (README, Security)."
)


def add_trust_option(parser: Any) -> None:
    """Add ``--trust_config`` (the one definition every command shares) to an argument parser."""
    parser.add_argument("--trust_config", type=bool, default=False, help=TRUST_HELP)
