"""Activation checkpointing of network blocks (Chen et al. 2016, "Sublinear Memory Cost").

A block run through ``checkpointed`` keeps only its inputs during the forward pass and recomputes
its activations in the backward pass (``torch.utils.checkpoint``, non-reentrant): activation
memory of the block falls to its inputs, for about one extra forward pass per training step. It
wraps calls, not modules, so parameter names (and converted OpenAI/EDM checkpoints) are unchanged.
"""

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointed(enabled: bool, block: nn.Module, *args: Any) -> Any:
    """``block(*args)``, recomputed in the backward pass when checkpointing (Chen et al. 2016).

    Only when it can save memory: ``enabled``, ``block`` in training mode and grad enabled. The
    tangent pass of the continuous-time objectives (``cm.objectives.jvp.tangent``, no grad) and
    evaluation call the block directly. Non-reentrant checkpointing restores the RNG state for
    the recomputation (the same dropout mask), composes with ``torch.func.jvp`` and
    ``torch.compile``, and lets gradients reach parameters whatever the inputs require.

    Args:
        enabled: the network's ``checkpointing`` option.
        block: the block to run.
        *args: its inputs (tensors, or None).
    """
    if enabled and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
