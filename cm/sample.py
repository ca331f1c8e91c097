"""Sampling helpers shared by ``cm sample``, ``cm edit`` and scripts (no argument parsing).

The command itself is ``cm.commands.sample``; here are the pieces a library user needs: a
``Sampler`` from a checkpoint's ``sampler`` hparam, a solver from an import path (``cm.trust``
checked), and AMED's predictor applied to a sampler.
"""

import importlib
from functools import partial

from jsonargparse import ArgumentParser

from cm.checkpoint import load_predictor
from cm.errors import UserError
from cm.solvers import amed, amed_plugin
from cm.solvers.sampling import Sampler
from cm.trust import check_import_path

AMED_SOLVERS = ("amed", "amed_plugin", "cm.solvers.amed", "cm.solvers.amed_plugin")


def import_solver(path: str, trust_config: bool = False):
    """The solver function at an import path like ``cm.solvers.heun``, or a name like ``heun``.

    Only cm's functions unless ``trust_config``: nothing else is imported (``cm.trust``).
    """
    path = path if "." in path else f"cm.solvers.{path}"
    if not trust_config:
        check_import_path(path, "--solver")
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(
            f"--solver {path!r} is not an importable function: use e.g. cm.solvers.heun or "
            "cm.solvers.consistency.multistep."
        ) from None


def sampler_from(config: dict | None):
    """A ``Sampler`` from the checkpoint's ``sampler`` hparam (None: one-step defaults)."""
    if not config:
        return Sampler()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--sampler", type=Sampler)
    cfg = parser.parse_object({"sampler": config})
    return parser.instantiate_classes(cfg).sampler


def use_predictor(sampler: Sampler, path: str, device, trust_config: bool = False) -> None:
    """Point ``sampler`` at AMED (Zhou et al. 2024) with the trained predictor at ``path``.

    The predictor samples on the grid it was trained for, with the solver it was trained with.
    """
    predictor = load_predictor(path, trust_config=trust_config).to(device)
    fn = amed if predictor.solver == "amed" else amed_plugin
    sampler.solver = partial(fn, predictor=predictor)
    sampler.sigmas = predictor.grid().tolist()
    print(f"AMED ({predictor.solver}): {predictor.nfe} NFE on {predictor.num_steps} time points")


# The private names that cm.editing.cli imported before the commands moved to cm.commands.
_import_solver, _sampler_from = import_solver, sampler_from
