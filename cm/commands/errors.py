"""How ``cm`` reports errors: a user's mistake is one ``error: ...`` line, a bug a traceback.

Lightning is not imported here (its ``MisconfigurationException`` is recognised by name), so
``cm --help`` and the error path of every command stay fast.
"""

import re
from argparse import ArgumentError

from cm.errors import UserError


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is the user's to fix: bad arguments/config, files, or one of cm's checks.

    That is: a ``cm.errors.UserError`` (raised where cm validates an input), a command-line or
    config parse error (argparse/jsonargparse), an ``OSError`` (missing, unreadable or unwritable
    files) or a Lightning ``MisconfigurationException``. Anything else, a ``ValueError`` from cm's
    own code included, is a bug and keeps its traceback.
    """
    if isinstance(e, UserError | ArgumentError | OSError) or _is_misconfiguration(e):
        return True
    if not isinstance(e, ValueError):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = "" if tb is None else tb.tb_frame.f_globals.get("__name__", "")
    return module.split(".")[0] == "jsonargparse"  # jsonargparse's own validation of a config


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (an ``OSError`` from the system names its file).

    A jsonargparse dump of Union alternatives is reduced to its option and innermost message
    (``parse_sentence``); Lightning's "no GPU" errors name the overrides that run on the CPU.
    """
    if isinstance(e, OSError) and e.strerror and e.filename and len(e.args) == 2:
        return f"{e.strerror}: '{e.filename}' (check the path and its permissions)."
    text = parse_sentence(str(e))
    if _is_misconfiguration(e) and re.search(_NO_GPU, text):
        return (
            f"{text.rstrip('!.')}: this config asks for a GPU; to run on the CPU add "
            "`--trainer.accelerator cpu --trainer.devices 1` (and, if they then fail, "
            "`--trainer.precision 32-true` and no Compile callback)."
        )
    if _is_wandb_usage_error(e):
        text = (
            f"W&B: {text.rstrip('.')} (`wandb login`); or set WANDB_MODE=offline, or pick another "
            "logger (e.g. --trainer.logger lightning.pytorch.loggers.CSVLogger)."
        )
    if re.search(_OLD_DATA_OPTION, text):
        text = (
            f"{text.rstrip('.')}: dataset options moved into the dataset object, e.g. "
            "`dataset: {class_path: cm.data.CIFAR10, init_args: {path: DIR}}` or "
            "--data.init_args.dataset.init_args.path DIR (CHANGELOG, README's Datasets)."
        )
    elif isinstance(e, ArgumentError):
        text = f"{text.rstrip('.')} (see --help)."
    return text


# ImageDataModule's flat options before datasets became objects (issue 15).
_OLD_DATA_OPTION = (
    r"ImageDataModule.*Option '(path|split|cache_dir|text_encoder|num_samples|num_components|"
    r"channels|mixture_std)' is not accepted"
)


_NO_GPU = r"No supported gpu backend found|can not run on your system since the accelerator"
# Lines of a jsonargparse Union dump that say nothing the user can act on: the structure, the
# None alternative of every `X | None`, the str alternative of an import path, the given value.
_DUMP_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
    "Expected a path but",
)


def parse_sentence(text: str) -> str:
    """The one meaningful sentence of a (jsonargparse) error message, on one line.

    jsonargparse reports a bad ``class_path`` or init argument, and any error raised while
    instantiating one, as a nested dump of every Union alternative it tried; the user needs the
    dotted option (``model.init_args.objective``), the class_path that failed and the innermost
    message. Other messages are returned with their whitespace collapsed.
    """
    if not text.lstrip().startswith(('Parser key "', _DUMP_NOISE[0])):
        return " ".join(text.split())
    option, class_path, leaves = "", None, []
    for raw in text.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or line.startswith(_DUMP_NOISE):
            continue
        if key := re.match(r'Parser key "([^"]+)":\s*(.*)', line):
            joint = ".init_args." if class_path else "."
            option = f"{option}{joint}{key[1]}" if option else key[1]
            class_path, line = None, key[2]
        elif path := re.fullmatch(r"Problem with given class_path '([^']+)':", line):
            class_path = path[1]
            continue
        if line and line not in leaves:
            leaves.append(line)
    if not leaves:
        return " ".join(text.split())
    message = " ".join(leaves)
    if class_path:
        message = f"class_path '{class_path}' cannot be used ({message.rstrip('.')})"
    return f"{option}: {message}" if option else message


def _is_wandb_usage_error(e: BaseException) -> bool:
    """W&B's own "no API key" and similar setup errors (wandb is imported only by its logger)."""
    kind = type(e)
    return kind.__module__.startswith("wandb") and kind.__name__ in (
        "UsageError",
        "AuthenticationError",
    )


def _is_misconfiguration(e: BaseException) -> bool:
    """Lightning's ``MisconfigurationException`` (a config the user must fix), by its class name."""
    return any(
        kind.__name__ == "MisconfigurationException" and kind.__module__.startswith("lightning")
        for kind in type(e).__mro__
    )
