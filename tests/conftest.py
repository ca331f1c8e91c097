"""Test-wide settings and fixtures (plain helper functions live in tests/helpers.py).

One intra-op thread (tiny tensors on 2 shared cores thrash otherwise); ``tiny_text``: a tiny
open_clip text tower with random weights in a ``CM_WEIGHTS`` dir; ``tiny_sd``: a tiny random
Stable Diffusion directory (skipped without diffusers); every test runs offline with an empty
Hugging Face cache (``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE`` under ``tmp_path``).
"""

from pathlib import Path

import lightning.pytorch  # noqa: F401 - before any capsys: its log handler binds the real stderr
import pytest
import torch
from helpers import TINY_CLIP, WIDTH, tiny_open_clip, write_tiny_sd

torch.set_num_threads(1)


@pytest.fixture
def tiny_text(tmp_path, monkeypatch) -> Path:
    """A tiny open_clip ``cm-test-tiny-text-clip``/``random``; returns its weights directory."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tiny_open_clip(TINY_CLIP, tmp_path / "weights", monkeypatch, text_width=WIDTH)
    return tmp_path / "weights"


@pytest.fixture
def tiny_sd(tmp_path) -> Path:
    """A diffusers directory with a tiny random UNet2DConditionModel and AutoencoderKL."""
    return write_tiny_sd(tmp_path)


@pytest.fixture(autouse=True)
def no_hugging_face_hub(tmp_path, monkeypatch) -> None:
    """No test reads the user's Hugging Face cache or reaches the Hub (``cm.hub`` reads both
    variables when called): an empty cache under ``tmp_path``, and offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
