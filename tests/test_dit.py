"""DiT/SiT (Peebles & Xie 2023; Ma et al. 2024): published sizes on meta, tiny configs on CPU."""

import pytest
import torch
from helpers import check_checkpointed_tangent, check_checkpointing, n_params, one_hot
from test_jvp import central_difference, rel_error
from torch import Tensor, nn
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from cm.errors import UserError
from cm.networks import DiT, SiT
from cm.networks.dit import sincos_pos_embed_2d

# PyTorch scripts its forward-AD decompositions on the first jvp and warns about torch.jit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

TINY = dict(img_resolution=8, in_channels=3, out_channels=6, label_dim=10, patch_size=2)
TINY |= dict(hidden_size=32, depth=2, num_heads=2)
N = 4


def tiny(cls: type[DiT] = DiT, **overrides) -> DiT:
    """An 8x8 three-channel, 10-class DiT: patch 2 (16 tokens), width 32, two blocks, 2 heads;
    a SiT keeps its default ``out_channels`` unless ``overrides`` set it."""
    args = {**TINY, **overrides}
    if cls is SiT and "out_channels" not in overrides:
        del args["out_channels"]
    torch.manual_seed(0)
    return cls(**args).eval()


def perturb(net: nn.Module, std: float = 0.05) -> nn.Module:
    """Add N(0, std^2) to every parameter, so the adaLN-Zero (zero) weights are random too."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return net


def inputs(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, c_noise, labels)``: 8x8 inputs, DiT-range times, classes 0, 3, 9 and the null row."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, 3, 8, 8, generator=gen, dtype=dtype)
    c_noise = torch.tensor([1.0, 250.0, 600.0, 999.0], dtype=dtype)
    labels = one_hot(torch.tensor([0, 3, 9, 0]), 10).to(dtype)
    labels[3] = 0  # "no class"
    return x, c_noise, labels


# -- published sizes ---------------------------------------------------------------------------


def reference_count(depth: int, d: int, p: int, c_out: int = 8, grid: int = 32) -> int:
    """Parameters of facebookresearch/DiT ``models.DiT`` at ImageNet 256 (4 latent channels,
    1000 classes + the CFG null row), term by term from its ``__init__`` and timm's modules,
    counting the frozen ``pos_embed`` Parameter as its ``train.py`` print does."""
    patch_embed = 4 * p * p * d + d  # x_embedder.proj: Conv2d(4, d, p, p)
    pos_embed = (grid // p) ** 2 * d  # frozen nn.Parameter [1, T, d]
    t_embedder = 256 * d + d + d * d + d  # Linear(256, d), Linear(d, d)
    y_embedder = 1001 * d  # nn.Embedding(1000 + 1, d)
    qkv, proj = 3 * d * d + 3 * d, d * d + d
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)  # fc1, fc2 (mlp_ratio 4)
    ada = d * 6 * d + 6 * d  # adaLN_modulation Linear(d, 6d)
    final = (d * 2 * d + 2 * d) + (d * p * p * c_out + p * p * c_out)
    return (
        patch_embed + pos_embed + t_embedder + y_embedder + depth * (qkv + proj + mlp + ada) + final
    )


# (name, depth, hidden, heads, patch, count). XL/2's 675,129,632 is the count the reference's
# train.py prints (README: "675M"); the others are reference_count's, confirmed by counting
# models.DiT_models[name](input_size=32, num_classes=1000) with timm's modules stubbed by
# equal-sized ones (a one-off check; timm is not a dependency).
PUBLISHED = [
    ("S/2", 12, 384, 6, 2, 32_963_360),
    ("B/2", 12, 768, 12, 2, 130_512_416),
    ("L/2", 24, 1024, 16, 2, 458_102_816),
    ("XL/2", 28, 1152, 16, 2, 675_129_632),
    ("XL/4", 28, 1152, 16, 4, 675_074_432),
    ("XL/8", 28, 1152, 16, 8, 675_683_072),
]


@pytest.mark.parametrize("name, depth, hidden, heads, patch, count", PUBLISHED)
def test_published_param_counts(name, depth, hidden, heads, patch, count):
    assert reference_count(depth, hidden, patch) == count
    with torch.device("meta"):
        net = DiT(32, 4, 8, 1000, patch, hidden_size=hidden, depth=depth, num_heads=heads)
    # pos_embed is a buffer here (fixed, not trained), a frozen Parameter in the reference.
    assert "pos_embed" not in dict(net.named_parameters()) and "pos_embed" in net.state_dict()
    assert n_params(net) + net.pos_embed.numel() == count


def test_defaults_are_dit_xl_2_and_sit_drops_learned_sigma():
    with torch.device("meta"):
        dit, sit = DiT(), SiT()
    assert n_params(dit) + dit.pos_embed.numel() == 675_129_632
    assert n_params(dit) == 674_834_720  # trainable: minus 256 tokens x 1152
    assert (sit.in_channels, sit.out_channels) == (4, 4)
    # SiT-XL/2 minus the learned-sigma half of the output Linear: 1152 x 16 weights + 16 biases.
    assert n_params(sit) == n_params(dit) - (1152 * 16 + 16)
    assert {k: v.shape for k, v in dit.state_dict().items() if "final_layer.linear" not in k} == {
        k: v.shape for k, v in sit.state_dict().items() if "final_layer.linear" not in k
    }


# -- tiny networks -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DiT, SiT])
def test_shapes_labels_and_null_class(cls):
    net = perturb(tiny(cls))
    assert (net.img_resolution, net.in_channels, net.label_dim) == (8, 3, 10)
    assert net.out_channels == (6 if cls is DiT else 3)  # SiT: no learned sigma
    x, c_noise, labels = inputs()
    out = net(x, c_noise, labels)
    assert out.shape == (N, net.out_channels, 8, 8) and out.isfinite().all()
    # None is the all-zero "no class" row; a scalar c_noise broadcasts.
    zeros = torch.zeros_like(labels)
    torch.testing.assert_close(net(x, c_noise, None), net(x, c_noise, zeros), rtol=0, atol=0)
    torch.testing.assert_close(
        net(x, c_noise[1], labels), net(x, c_noise[1].expand(N), labels), rtol=0, atol=0
    )
    # The null row uses the learned null embedding, not a class's (nor 0).
    assert not torch.allclose(out[3], net(x, c_noise, one_hot(torch.zeros(N).long(), 10))[3])
    y = net.y_embedder
    torch.testing.assert_close(y(zeros[:1]), y.null)
    torch.testing.assert_close(y(labels[1:2]), y.proj.weight[:, 3][None])
    # Soft labels are the mixture of the reference's (label_dim + 1)-row table.
    soft = 0.25 * labels[1:2]
    torch.testing.assert_close(y(soft), 0.25 * y.proj.weight[:, 3][None] + 0.75 * y.null)


def test_unconditional_network_has_no_label_embedding():
    net = perturb(tiny(label_dim=0))
    x, c_noise, labels = inputs()
    assert net.y_embedder is None
    torch.testing.assert_close(net(x, c_noise, labels), net(x, c_noise), rtol=0, atol=0)


@pytest.mark.parametrize("second_time", [False, True])
def test_output_is_zero_at_init_and_not_after_perturbing(second_time):
    net = tiny(second_time=second_time)
    x, c_noise, labels = inputs()
    c_to = c_noise / 2 if second_time else None
    assert torch.equal(net(x, c_noise, labels, c_to), torch.zeros(N, 6, 8, 8))  # adaLN-Zero
    assert perturb(net)(x, c_noise, labels, c_to).abs().mean() > 1e-3


def test_patches_round_trip_and_positions_are_the_mae_layout():
    net = tiny(out_channels=3)
    x = torch.randn(2, 3, 8, 8)
    # Tokens row-major, channel fastest within a patch: unpatchify inverts the space-to-depth.
    tokens = x.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)
    assert torch.equal(net.unpatchify(tokens), x)
    # 3x3 grid, width 8: quarter-width frequencies 1 and 10000^(-1/2); token 1 is (row 0, col 1),
    # token 3 is (row 1, col 0). The first half encodes the column, the second the row.
    pos = sincos_pos_embed_2d(8, 3)
    assert pos.shape == (9, 8) and pos.dtype == torch.float32
    at_1 = torch.tensor([1.0, 0.01])
    at_1 = torch.cat([at_1.sin(), at_1.cos()])
    col, row = pos[:, :4], pos[:, 4:]
    torch.testing.assert_close(col[1], at_1)
    torch.testing.assert_close(row[3], at_1)
    torch.testing.assert_close(row[1], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_bad_configurations_and_inputs_are_user_errors():
    with pytest.raises(UserError, match="patch_size"):
        DiT(**{**TINY, "patch_size": 3})
    with pytest.raises(UserError, match="num_heads"):
        DiT(**{**TINY, "num_heads": 3})
    net = tiny()
    x, c_noise, labels = inputs()
    with pytest.raises(UserError, match="img_resolution"):
        net(torch.randn(N, 3, 16, 16), c_noise, labels)
    with pytest.raises(UserError, match="second_time"):
        net(x, c_noise, labels, c_noise_to=c_noise)


def test_second_time_starts_as_the_network_without_it():
    # Fine-tuning a diffusion checkpoint into a flow map starts from the diffusion model.
    base = perturb(tiny())
    flow = tiny(second_time=True)
    missing, unexpected = flow.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("t_embedder_to.") for k in missing)
    x, c_noise, labels = inputs()
    ref = base(x, c_noise, labels)
    assert torch.equal(flow(x, c_noise, labels, c_noise_to=torch.rand(N) * 500), ref)
    assert torch.equal(flow(x, c_noise, labels), ref)  # c_noise_to None is 0
    # Once trained (perturbed), the second time changes the output.
    perturb(flow.t_embedder_to)
    assert not torch.allclose(flow(x, c_noise, labels, c_noise[[1, 0, 3, 2]]), ref)


def test_jvp_in_x_and_both_times_equals_central_difference():
    # MeanFlow's tangent: d/ds F(x + s dx, t + s dt, labels, h + s dh), in float64 on the math
    # attention path, against a fourth-order central difference (tests/test_jvp.py).
    net = perturb(tiny(second_time=True)).double()
    x, c_noise, labels = inputs(torch.float64)
    c_to = torch.tensor([0.5, 100.0, 30.0, 400.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    dx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    dc, dc_to = torch.rand(2, N, generator=gen, dtype=torch.float64) + 0.5

    def f(x: Tensor, c_noise: Tensor, c_noise_to: Tensor) -> Tensor:
        return net(x, c_noise, labels, c_noise_to)

    primals, tangents = (x, c_noise, c_to), (dx, dc, dc_to)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        out, d_out = jvp(f, primals, tangents)
        fd = central_difference(f, primals, tangents)
        assert torch.equal(out, f(*primals))
    assert d_out.dtype == torch.float64 and d_out.abs().mean() > 1e-3
    assert rel_error(d_out, fd) < 1e-6
    # Each input contributes (the test is not carried by x alone).
    for i in range(3):
        only = tuple(t if j == i else torch.zeros_like(t) for j, t in enumerate(tangents))
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            assert jvp(f, primals, only)[1].abs().mean() > 1e-6


@pytest.mark.parametrize("cls", [DiT, SiT])
def test_checkpointing_keeps_keys_outputs_and_gradients(cls):
    # Activation checkpointing (Chen et al. 2016) trades memory for recomputation only.
    nets = [perturb(tiny(cls, dropout=0.1, checkpointing=c)) for c in (False, True)]
    x, c_noise, labels = inputs()
    check_checkpointing(*nets, x, c_noise, labels)


def test_checkpointing_keeps_the_jvp_tangent():
    nets = [perturb(tiny(dropout=0.1, checkpointing=c)) for c in (False, True)]
    x, c_noise, labels = inputs()
    check_checkpointed_tangent(*nets, x, c_noise / 1000, labels)
