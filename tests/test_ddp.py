"""World-size invariance: 2-process CPU DDP and gradient accumulation match one process.

The objective's noise, sigmas and label masks are a function of the global sample index
(``cm.objectives.base.SampleDraws``) and the data stream's augmentations of the stream position,
so splitting a global batch over ranks or micro-batches changes only float summation order.
"""

from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, ICT_DIGITS, fit_args

from cm.cli import main

STEPS = 3


# SGD with momentum rather than the quickstart's Adam: Adam divides each gradient coordinate by
# its own magnitude, so on coordinates whose gradient is at rounding level (zero-initialised
# layers at step 0) it turns a summation-order difference into a visible part of a step.
SGD = [
    "--model.init_args.optimizer=torch.optim.SGD",
    "--model.init_args.optimizer.init_args.lr=0.01",
]


def fit(root: Path, *extra: str, config: Path = ICT_DIGITS) -> dict:
    """``cm fit`` of a tiny config (flips on, global batch 16, SGD); the final checkpoint."""
    args = ["--trainer.accelerator=cpu", "--data.init_args.flip=true"]
    args += ["--trainer.callbacks.init_args.final_num=0", *SGD]
    args += ["--model.init_args.optimizer.init_args.momentum=0.9", *extra]
    main(fit_args(root, *args, steps=STEPS, config=config))
    (ckpt,) = root.glob("**/checkpoints/*.ckpt")
    return torch.load(ckpt, weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """One process, the whole global batch per step."""
    return fit(tmp_path_factory.mktemp("single"))


def assert_same_training_state(a: dict, b: dict) -> None:
    """Weights, EMA weights and momentum buffers agree to float32 tolerance."""
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("ema_denoiser.") for k in a["state_dict"])
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], msg=key)
    state_a, state_b = (c["optimizer_states"][0]["state"] for c in (a, b))
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        torch.testing.assert_close(state_a[key]["momentum_buffer"], state_b[key]["momentum_buffer"])


def test_two_process_ddp_matches_one_process(single, tmp_path):
    ddp = fit(tmp_path, "--trainer.devices=2", "--trainer.strategy=ddp_spawn")
    assert_same_training_state(single, ddp)


def test_gradient_accumulation_matches_whole_batch(single, tmp_path):
    # Two half micro-batches per optimizer step: one EMA update per step, with the whole batch.
    accumulated = fit(tmp_path, "--trainer.accumulate_grad_batches=2")
    assert_same_training_state(single, accumulated)


def test_sct_two_process_ddp_matches_one_process(tmp_path):
    # sCT's tangent is a no-grad JVP on the unwrapped denoiser and its gradient pass the ordinary
    # call: 2 processes must still equal one (weights, EMA, momentum, the weighting head).
    config = CONFIGS / "sct_digits.yaml"
    warmup = ["--model.init_args.objective.init_args.tangent_warmup_steps=2"]
    single = fit(tmp_path / "single", *warmup, config=config)
    ddp = fit(tmp_path / "ddp", *warmup, "--trainer.devices=2", "--trainer.strategy=ddp_spawn",
              config=config)  # fmt: skip
    assert any(k.startswith("objective.weight_head.") for k in single["state_dict"])
    assert_same_training_state(single, ddp)


def test_meanflow_two_process_ddp_matches_one_process(tmp_path):
    # MeanFlow's tangent is the same no-grad JVP (cm.objectives.jvp) on the unwrapped flow map:
    # 2 processes must equal one, with the (t, r) pairs drawn per global sample index.
    config = CONFIGS / "meanflow_digits.yaml"
    single = fit(tmp_path / "single", config=config)
    ddp = fit(tmp_path / "ddp", "--trainer.devices=2", "--trainer.strategy=ddp_spawn",
              config=config)  # fmt: skip
    assert any(".time_embed_to." in k for k in single["state_dict"])
    assert_same_training_state(single, ddp)
