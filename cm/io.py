"""Old home of cm's file I/O, kept so that existing imports and configs keep working.

``cm.io`` did eight jobs; each now lives in a module named for it (see CHANGELOG, Unreleased):
checkpoint and export loading in ``cm.checkpoint``, sample files in ``cm.sample_files``, the
frozen teacher in ``cm.teacher``, foreign layouts in ``cm.convert``, atomic writes in
``cm.files``, ``image_spec`` in ``cm.protocols`` and ``resolve_device`` in ``cm.device``. Every
name below is the same object as at its new path, so checkpoints, exports and configs that name
``cm.io.PretrainedDenoiser`` still load (``cm.trust`` checks where a class is defined: in cm).
"""

from cm.checkpoint import (
    CONFIG,
    WEIGHTS,
    build,
    export,
    load,
    load_any,
    load_checkpoint,
    load_denoiser,
    load_predictor,
    load_submodule,
    load_weights_only,
    read_config,
    read_export_config,
    read_safetensors,
    read_state_dict,
)
from cm.convert import Format, convert_state, published_url
from cm.device import resolve_device
from cm.files import atomic_open, atomic_path, check_output
from cm.protocols import image_spec
from cm.sample_files import save_grid, save_npz, to_uint8
from cm.teacher import PretrainedDenoiser

# The private names of the old module, for scripts that reached into it.
_convert, _published = convert_state, published_url

__all__ = [
    "CONFIG",
    "WEIGHTS",
    "Format",
    "PretrainedDenoiser",
    "atomic_open",
    "atomic_path",
    "build",
    "check_output",
    "export",
    "image_spec",
    "load",
    "load_any",
    "load_checkpoint",
    "load_denoiser",
    "load_predictor",
    "load_submodule",
    "load_weights_only",
    "read_config",
    "read_export_config",
    "read_safetensors",
    "read_state_dict",
    "resolve_device",
    "save_grid",
    "save_npz",
    "to_uint8",
]
