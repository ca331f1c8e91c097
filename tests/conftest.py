"""Test-wide settings: one intra-op thread (tiny tensors on 2 shared cores thrash otherwise)."""

import torch

torch.set_num_threads(1)
