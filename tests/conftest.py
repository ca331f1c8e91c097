"""Test-wide settings and helpers.

One intra-op thread (tiny tensors on 2 shared cores thrash otherwise), ``register_weights`` (a
random weights file's SHA-256 registered as the published one, for one test), and
``tiny_open_clip``: a tiny open_clip model registered under a test name with random weights in a
``CM_WEIGHTS`` dir, so the real CLIP loading code runs offline.
"""

import json
from pathlib import Path

import lightning.pytorch  # noqa: F401 - before any capsys: its log handler binds the real stderr
import torch

torch.set_num_threads(1)


def register_weights(monkeypatch, name: str, path: Path) -> None:
    """Record ``path``'s SHA-256 as registry entry ``name``'s published digest for one test.

    Random test weights cannot have the published digest; this registers theirs the way the real
    files are registered, so the real check runs (there is no switch that skips it)."""
    import dataclasses

    from cm import weights

    spec = weights.REGISTRY[name]
    digest = weights.sha256_file(path)
    monkeypatch.setitem(weights.REGISTRY, name, dataclasses.replace(spec, sha256=digest))


def tiny_open_clip(name: str, directory: Path, monkeypatch, text_width: int = 32):
    """Register open_clip model ``name``/``random`` (1 layer each tower), save random weights in
    ``directory`` under ``cm.weights``' file name, point ``CM_WEIGHTS`` there; return the model."""
    import open_clip

    from cm.weights import clip_weights

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                       "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": 2,
                     "layers": 1},
    }  # fmt: skip
    configs = directory / "configs"
    configs.mkdir(parents=True)
    (configs / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(configs)
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED,
        name,
        {"random": open_clip.pretrained._pcfg(url="https://example.invalid/tiny.bin")},
    )
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    torch.save(model.state_dict(), directory / clip_weights(name, "random").filename)
    monkeypatch.setenv("CM_WEIGHTS", str(directory))
    return model
