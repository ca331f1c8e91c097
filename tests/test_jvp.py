"""Forward-mode derivatives (``torch.func.jvp``) of the networks, as sCT/sCD take them.

Lu & Song 2024 (sCM, Eq. 8) need the tangent ``dF/dt = grad_x F . dx_t/dt + dF/dt`` of the
network in TrigFlow's variables; ``cm.objectives`` takes it with ``torch.func.jvp`` of
``cm.precond.trigflow_flow`` in ``(x_t, t)``, with no grad and with attention on the math path.
Here: in float64, the JVP of every network (ADM with class labels, ADM with text context and
adaptive double normalization, NCSN++/DDPM++ with labels; attention at 4x4) behind every
preconditioner equals a fourth-order central difference to 1e-6 relative.

Known gap of PyTorch (2.x) on CPU: the fused attention kernel
(``_scaled_dot_product_flash_attention_for_cpu``) has no forward-mode derivative, so ``jvp``
raises ``NotImplementedError`` wherever SDPA picks it (NCSN++'s contiguous heads, ADM in
channels-last); ``sdpa_kernel(SDPBackend.MATH)`` avoids it. The other one, CPU bf16 autocast's
group norm returning a float32 tangent beside a bfloat16 value, is fixed by
``cm.networks.norms.GroupNorm``.
"""

import pytest
import torch
from torch import Tensor, nn
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from cm.networks import ADMUNet, NCSNpp
from cm.networks.embeddings import FourierEmbedding, PositionalEmbedding, timestep_embedding
from cm.networks.norms import GroupNorm
from cm.precond import ConsistencyPrecond, EDMPrecond, TrigFlowPrecond, trigflow_flow

# PyTorch scripts its forward-AD decompositions on the first jvp and warns about torch.jit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

SIGMA_DATA = 0.5
N = 3
TOL = 1e-6  # relative, ||jvp - fd|| / ||jvp||
# Step of the fourth-order stencil: truncation ~(omega h)^4 for the largest frequency omega of
# the network in t (ConsistencyPrecond's c_noise = 250 ln sigma makes it large), round-off
# ~1e-16 / h. At 3e-6 both stay below 1e-9 for every case here.
H = 3e-6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny float64 networks gain nothing from intra-op threads on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def adm(**kw) -> ADMUNet:
    """A tiny 8x8 ADM with attention at 4x4 (two levels, one block each)."""
    base = dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=16)
    base |= dict(channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4])
    return ADMUNet(**base, num_head_channels=8, **kw)


def ncsnpp(**kw) -> NCSNpp:
    """A tiny 8x8 DDPM++/NCSN++ with attention at 4x4."""
    base = dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=16)
    return NCSNpp(
        **base, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0, **kw
    )


# Fourier scale 0.02 as iCT: with NCSN++'s 16 and c_noise = 250 ln sigma the features oscillate
# with a period ~1e-4 in t, which no finite difference resolves (and which sCM avoids).
NCSNPP = dict(embedding_type="fourier", fourier_scale=0.02, channel_mult_noise=2)
NETS = {
    "adm_labels": lambda: adm(label_dim=10),
    "adm_text_double_norm": lambda: adm(context_dim=12, double_norm=True),
    "ddpmpp_labels": lambda: ncsnpp(label_dim=10, encoder_type="skip", decoder_type="skip"),
    "ncsnpp_labels": lambda: ncsnpp(
        label_dim=10, **NCSNPP, encoder_type="residual", resample_filter=[1, 3, 3, 1]
    ),
}
PRECONDS = {
    "edm": EDMPrecond,
    "consistency": ConsistencyPrecond,
    "trigflow": TrigFlowPrecond,
}


def build(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Network ``name`` in ``dtype``, eval mode, every (also zero-initialised) weight random."""
    torch.manual_seed(0)
    net = NETS[name]().to(dtype).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def labels_for(net: nn.Module, dtype: torch.dtype = torch.float64) -> Tensor:
    """One-hot class labels ``[N, 10]``, or a text context ``[N, 5, context_dim]``."""
    gen = torch.Generator().manual_seed(2)
    if getattr(net, "context_dim", 0):
        return torch.randn(N, 5, net.context_dim, generator=gen, dtype=dtype)
    return torch.eye(net.label_dim, dtype=dtype)[torch.randint(net.label_dim, (N,), generator=gen)]


def trigflow_inputs(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_t, t, dx_t, dt)``: a TrigFlow state, times inside ``(0, pi/2)``, random tangents."""
    gen = torch.Generator().manual_seed(1)
    x_t = SIGMA_DATA * torch.randn(N, 1, 8, 8, generator=gen, dtype=dtype)
    t = torch.tensor([0.2, 0.8, 1.3], dtype=dtype)
    dx_t = torch.randn(N, 1, 8, 8, generator=gen, dtype=dtype)
    dt = 0.5 + torch.rand(N, generator=gen, dtype=dtype)
    return x_t, t, dx_t, dt


def central_difference(f, primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> Tensor:
    """Fourth-order central difference of ``f`` at ``primals`` along ``tangents``."""

    def at(s: float) -> Tensor:
        return f(*(p + s * H * v for p, v in zip(primals, tangents, strict=True)))

    return (8 * (at(1) - at(-1)) - (at(2) - at(-2))) / (12 * H)


def rel_error(jvp_out: Tensor, fd: Tensor) -> float:
    """``||jvp - fd|| / ||jvp||`` over the whole batch."""
    return ((jvp_out - fd).norm() / jvp_out.norm()).item()


def flow_jvp(denoiser: nn.Module, labels: Tensor, dtype=torch.float64):
    """``(f, primals, tangents, (F, dF))``: TrigFlow's ``F`` and its JVP on the math path."""
    x_t, t, dx_t, dt = trigflow_inputs(dtype)

    def f(x_t: Tensor, t: Tensor) -> Tensor:
        return trigflow_flow(denoiser, x_t, t, labels, SIGMA_DATA)

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        out = jvp(f, (x_t, t), (dx_t, dt))
    return f, (x_t, t), (dx_t, dt), out


@pytest.mark.parametrize("precond", sorted(PRECONDS))
@pytest.mark.parametrize("name", sorted(NETS))
def test_trigflow_jvp_equals_central_difference(name, precond):
    net = build(name)
    denoiser = PRECONDS[precond](net, sigma_data=SIGMA_DATA)
    f, primals, tangents, (F_x, dF) = flow_jvp(denoiser, labels_for(net))
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        fd = central_difference(f, primals, tangents)
        assert torch.equal(F_x, f(*primals))  # the JVP's primal output is the plain forward
    assert dF.dtype == torch.float64 and dF.isfinite().all()
    assert rel_error(dF, fd) < TOL


@pytest.mark.parametrize("name", sorted(NETS))
def test_raw_network_jvp_in_x_and_c_noise(name):
    net = build(name)
    labels = labels_for(net)
    x, _, dx, dc = trigflow_inputs()
    c_noise = torch.tensor([-1.0, 0.3, 1.2], dtype=torch.float64)

    def f(x: Tensor, c_noise: Tensor) -> Tensor:
        return net(x, c_noise, labels)

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        _, dF = jvp(f, (x, c_noise), (dx, dc))
        fd = central_difference(f, (x, c_noise), (dx, dc))
    assert rel_error(dF, fd) < TOL


@pytest.mark.parametrize("name", sorted(NETS))
def test_jvp_under_no_grad_gives_the_same_tangent(name):
    net = build(name)
    denoiser = TrigFlowPrecond(net, sigma_data=SIGMA_DATA)
    labels = labels_for(net)
    f, primals, tangents, (F_x, dF) = flow_jvp(denoiser, labels)  # under no_grad
    with sdpa_kernel(SDPBackend.MATH):
        F_grad, dF_grad = jvp(f, primals, tangents)
    assert F_grad.requires_grad  # the graph was recorded, the values are the same
    torch.testing.assert_close(F_x, F_grad.detach(), rtol=0, atol=0)
    # Equal up to float64 round-off: with grad, some tangents take another kernel order.
    assert rel_error(dF_grad.detach(), dF) < 1e-12


def test_fused_cpu_attention_has_no_forward_ad_and_math_path_works():
    # NCSN++'s heads are contiguous, so CPU SDPA picks its fused (flash) kernel, which has no
    # forward-mode derivative in PyTorch 2.x (drop the raises once a release adds one); ADM's
    # strided heads take it in channels-last.
    torch.manual_seed(0)
    nets = [NETS["ncsnpp_labels"]().eval(), NETS["adm_labels"]().eval()]
    nets[1] = nets[1].to(memory_format=torch.channels_last)
    for net in nets:
        x, t, dx, dt = trigflow_inputs(torch.float32)
        x, dx = (v.contiguous(memory_format=torch.channels_last) for v in (x, dx))
        labels = labels_for(net, torch.float32)

        def f(x: Tensor, t: Tensor, net=net, labels=labels) -> Tensor:
            return net(x, t, labels)

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            net(x, t, labels)  # the fused kernel runs forward
            with pytest.raises(NotImplementedError, match="forward AD"):
                jvp(f, (x, t), (dx, dt))
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            _, dF = jvp(f, (x, t), (dx, dt))
        assert dF.isfinite().all()


@pytest.mark.parametrize("name", ["adm_labels", "ncsnpp_labels", "adm_text_double_norm"])
def test_jvp_under_cpu_bf16_autocast_runs(name):
    # float32 weights, bf16 autocast: the JVP runs, is finite and is near the float32 one.
    net = build(name, torch.float32)
    denoiser = TrigFlowPrecond(net, sigma_data=SIGMA_DATA)
    labels = labels_for(net, torch.float32)
    _, _, _, (_, dF32) = flow_jvp(denoiser, labels, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, _, (F_bf, dF_bf) = flow_jvp(denoiser, labels, torch.float32)
    assert F_bf.dtype == dF_bf.dtype == torch.float32  # trigflow_flow returns float32
    assert F_bf.isfinite().all() and dF_bf.isfinite().all()
    assert rel_error(dF32, dF_bf) < 0.1


def test_group_norm_is_nn_group_norm_outside_autocast_and_float32_inside():
    torch.manual_seed(0)
    ours, ref = GroupNorm(4, 16), nn.GroupNorm(4, 16)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(ours(x), ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, dy = jvp(ours, (x.bfloat16(),), (torch.ones_like(x).bfloat16(),))
    assert y.dtype == dy.dtype == torch.float32  # value and tangent agree (CUDA autocast's dtype)
    torch.testing.assert_close(y, ref(x.bfloat16().float()))


def test_time_embeddings_have_no_high_frequencies():
    # sCM (Lu & Song 2024, Sec. 4.1) with c_noise = t: the time embedding's derivative is bounded
    # by its largest frequency: 1 for ADM's and DDPM++'s positional embeddings, 2 pi |w| <~ 0.5
    # for NCSN++'s Fourier features with scale 0.02 (iCT), against ~300 with scale 16.
    c = torch.linspace(0, 1.6, 7, dtype=torch.float64)
    embeddings = {
        "adm": (lambda c: timestep_embedding(c, 32), 1.0),
        "positional": (PositionalEmbedding(32), 1.0),
        "fourier_0.02": (FourierEmbedding(32, scale=0.02).double(), 0.5),
    }
    for name, (embed, bound) in embeddings.items():
        emb, d_emb = jvp(embed, (c,), (torch.ones_like(c),))
        assert emb.dtype == d_emb.dtype == torch.float64, name
        assert d_emb.abs().max() <= bound + 1e-12, name
