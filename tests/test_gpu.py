"""CUDA checks (issue 18): bf16 networks, torch.compile, fused Adam, flash attention, JVP tangents.

Skipped without CUDA; ``bash scripts/gpu_check.sh OUTDIR`` runs them (``pytest -m gpu``) on a GPU
machine. The networks are tiny 16x16 configs whose attention heads are flash-sized (head_dim 32:
a multiple of 8, bf16). float32 references run without TF32, so that a tolerance measures the
bf16 or compiled path alone.
"""

import copy

import pytest
import torch
from helpers import TINY_CLIP, WIDTH
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from cm.flowmap import MeanFlowPrecond
from cm.networks import (
    ADMDiscriminator,
    ADMUNet,
    AMEDPredictor,
    DiT,
    LatentVGG16BN,
    NCSNpp,
    NCSNppDiscriminator,
    SDDiscriminator,
    SiT,
    StableDiffusionDenoiser,
    TextEncoder,
)
from cm.objectives.jvp import tangent
from cm.precond import TrigFlowPrecond, trigflow_flow

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    # PyTorch scripts its forward-AD decompositions on the first jvp and warns about torch.jit.
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
]

DEVICE = torch.device("cuda")
N, L = 4, 10
ADM = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=L, model_channels=64)
ADM |= dict(channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8], num_head_channels=32)
NCSN = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=L, model_channels=32)
NCSN |= dict(channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
FOURIER = dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual")
FOURIER |= dict(decoder_type="skip", resample_filter=[1, 3, 3, 1])
DIT = dict(img_resolution=16, in_channels=4, label_dim=L, patch_size=2, hidden_size=128, depth=2)
DIT |= dict(num_heads=4)
FLASH = "aten::_scaled_dot_product_flash_attention"


@pytest.fixture(autouse=True)
def no_tf32():
    """IEEE float32 matmuls and convolutions (cuDNN uses TF32 by default on Ampere and later)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def randn(*shape: int, seed: int = 2, dtype: torch.dtype = torch.float32) -> Tensor:
    """Seeded normal noise of ``shape`` on the device."""
    gen = torch.Generator().manual_seed(seed)  # float32 draws: the same values in every dtype
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def labels() -> Tensor:
    """One-hot labels ``[N, L]`` of classes 0, 1, 2, 3."""
    return torch.eye(L, device=DEVICE)[torch.arange(N) % L]


C_NOISE = torch.tensor([-2.0, 0.5, 3.0, 250.0])  # EDM's ln(sigma)/4 up to CM's 250 ln(sigma)


def image_args(channels: int = 3, context: int = 0, second_time: bool = False) -> tuple:
    """``(x, c_noise, labels or context[, c_noise_to])`` for a 16x16 network."""
    cond = randn(N, 5, context, seed=3) if context else labels()
    args = (randn(N, channels, 16, 16), C_NOISE.to(DEVICE), cond)
    return args + (0.5 * C_NOISE.to(DEVICE),) if second_time else args


# name: (network, its inputs): every network of cm.networks but the Stable Diffusion ones and the
# text encoder, which need files (tiny random ones from conftest's fixtures, tested below).
CASES = {
    "adm": (lambda: ADMUNet(**ADM), image_args),
    "adm_text_double_norm": (
        lambda: ADMUNet(**{**ADM, "label_dim": 0}, context_dim=32, double_norm=True),
        lambda: image_args(context=32),
    ),
    "adm_second_time": (
        lambda: ADMUNet(**ADM, second_time=True),
        lambda: image_args(second_time=True),
    ),
    "ddpmpp": (lambda: NCSNpp(**NCSN), image_args),
    "ncsnpp_fourier": (lambda: NCSNpp(**NCSN, **FOURIER), image_args),
    "dit": (lambda: DiT(**DIT, out_channels=8), lambda: image_args(4)),
    "dit_second_time": (
        lambda: DiT(**DIT, out_channels=8, second_time=True),
        lambda: image_args(4, second_time=True),
    ),
    "sit": (lambda: SiT(**DIT), lambda: image_args(4)),
    "adm_discriminator": (
        lambda: ADMDiscriminator(ADMUNet(**ADM)),
        lambda: (randn(N, 3, 16, 16), randn(N, 3, 16, 16, seed=4), labels()),
    ),
    "ncsnpp_discriminator": (
        lambda: NCSNppDiscriminator(NCSNpp(**NCSN)),
        lambda: (randn(N, 3, 16, 16), randn(N, 3, 16, 16, seed=4), labels()),
    ),
    "amed_predictor": (lambda: AMEDPredictor(), lambda: (randn(N, 64), 2.0, 0.5)),
    "latent_vgg16bn": (
        lambda: LatentVGG16BN(4, (16, 16, 32, 32, 32), num_classes=5, hidden=16, pool_size=1),
        lambda: (randn(N, 4, 16, 16),),
    ),
}


def perturb(net: nn.Module, std: float = 0.05) -> nn.Module:
    """Add N(0, std^2) to every parameter, so zero-initialised output layers are random too."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p) * std)
    return net


def build(name: str, channels_last: bool = False) -> tuple[nn.Module, tuple]:
    """Network ``name`` (perturbed, eval mode: no dropout draws) and its inputs, on the device."""
    make, args = CASES[name]
    torch.manual_seed(0)
    net = perturb(make()).to(DEVICE).eval()
    args = args()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        args = tuple(a.to(memory_format=torch.channels_last) if _is_image(a) else a for a in args)
    return net, args


def _is_image(a) -> bool:
    """Whether ``a`` is an ``[N, C, H, W]`` tensor."""
    return isinstance(a, Tensor) and a.ndim == 4


def flat(out) -> Tensor:
    """Every tensor of a network's output (a tensor, list or tuple), flattened, as float32."""
    tensors = [out] if isinstance(out, Tensor) else list(out)
    return torch.cat([t.float().flatten() for t in tensors])


def rel(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bf16():
    """CUDA bf16 autocast, as ``trainer.precision: bf16-mixed``."""
    return torch.autocast(DEVICE.type, torch.bfloat16)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_forward_backward_is_finite_and_near_float32(name):
    net, args = build(name)
    ref = flat(net(*args))
    ref.square().mean().backward()
    params = [p for p in net.parameters() if p.requires_grad]
    ref_grad = torch.cat([p.grad.flatten() for p in params])
    net.zero_grad(set_to_none=True)
    with bf16():
        out = flat(net(*args))
    out.square().mean().backward()
    assert out.isfinite().all() and rel(out, ref) < 0.08
    assert all(p.grad is not None for p in params), "a trainable parameter got no gradient"
    grad = torch.cat([p.grad.flatten() for p in params])
    assert grad.isfinite().all() and rel(grad, ref_grad) < 0.15


@pytest.mark.parametrize("name", ["stable_diffusion", "sd_discriminator"])
def test_stable_diffusion_networks_bf16(name, tiny_sd):
    torch.manual_seed(0)
    if name == "stable_diffusion":
        net = StableDiffusionDenoiser(str(tiny_sd), load_vae=False, trainable=True).net
        args = (randn(2, 4, 8, 8), torch.tensor([10.0, 700.0], device=DEVICE))
    else:
        net = SDDiscriminator(str(tiny_sd), num_groups=8)
        args = (randn(2, 4, 8, 8), randn(2, 4, 8, 8, seed=4))
    net = perturb(net.to(DEVICE))
    with bf16():
        out = flat(net(*args, randn(2, 5, WIDTH, seed=3)))
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert out.isfinite().all() and all(g is not None and g.isfinite().all() for g in grads)


def test_text_encoder_on_cuda_matches_cpu(tiny_text):
    enc = TextEncoder(TINY_CLIP, "random")
    captions = ["a red square", "a blue circle", ""]
    cpu = enc.encode(captions)
    with bf16():  # the encoder turns autocast off: float32 features under bf16-mixed too
        cuda = enc.to(DEVICE).encode(captions)
    for a, b in zip(cuda, cpu, strict=True):
        assert a.device.type == DEVICE.type and a.dtype == torch.float32
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
def test_fused_adam_step_matches_foreach(optimizer):
    net, args = build("adm")
    twin = copy.deepcopy(net)
    start = [p.detach().clone() for p in net.parameters()]
    fused = optimizer(net.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    foreach = optimizer(twin.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
    for _ in range(3):  # the same bf16 gradients for both, so only the update differs
        twin.zero_grad(set_to_none=True)
        with bf16():
            flat(twin(*args)).square().mean().backward()
        for p, q in zip(net.parameters(), twin.parameters(), strict=True):
            p.grad = q.grad.clone()
        fused.step(), foreach.step()
    assert fused.param_groups[0]["fused"] and foreach.param_groups[0]["foreach"]
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused.state[p][key], foreach.state[q][key])
        assert fused.state[p]["step"].item() == 3
    moved = max((p - p0).abs().max().item() for p, p0 in zip(net.parameters(), start, strict=True))
    assert moved > 1e-3  # three steps of lr 1e-3 really changed the weights


def sdpa_ops(fn) -> set[str]:
    """Names of the ``scaled_dot_product`` aten ops that ``fn()`` ran (forward and backward)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


@pytest.mark.parametrize("name", ["adm", "adm_text_double_norm", "dit"])
def test_flash_attention_is_selected_in_training(name):
    # ADM's head_dim has unit stride only in channels-last (cm.training.speed.Compile's default).
    net, args = build(name, channels_last=name.startswith("adm"))

    def step() -> None:
        with bf16():
            flat(net(*args)).square().mean().backward()

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises "No available kernel" if flash can't
        forced = sdpa_ops(step)
    assert {FLASH, f"{FLASH}_backward"} <= forced, forced
    chosen = sdpa_ops(step)  # SDPA's own choice, all backends allowed
    assert {FLASH, f"{FLASH}_backward"} <= chosen, f"SDPA chose {chosen}, not flash attention"


def sct_case(dtype: torch.dtype) -> tuple:
    """sCT's tangent: TrigFlow's ``F(x_t, t)`` of a tiny ADM along ``(dx_t/dt, 1)``."""
    torch.manual_seed(0)
    denoiser = TrigFlowPrecond(perturb(ADMUNet(**ADM)).to(DEVICE, dtype).eval(), sigma_data=0.5)
    cond = labels().to(dtype)

    def fn(x_t: Tensor, t: Tensor) -> Tensor:
        return trigflow_flow(denoiser, x_t, t, cond, 0.5)

    t = torch.tensor([0.2, 0.6, 1.0, 1.3], dtype=dtype, device=DEVICE)
    x_t, dx_t = 0.5 * randn(N, 3, 16, 16, dtype=dtype), randn(N, 3, 16, 16, seed=5, dtype=dtype)
    return fn, (x_t, t), (dx_t, torch.ones_like(t))


def meanflow_case(dtype: torch.dtype) -> tuple:
    """MeanFlow's tangent: ``u(z_t, t, r)`` of a tiny DiT flow map along ``(v, 1, 0)``."""
    torch.manual_seed(0)
    net = perturb(DiT(**DIT, out_channels=4, second_time=True)).to(DEVICE, dtype).eval()
    flow_map = MeanFlowPrecond(net)
    cond = labels().to(dtype)

    def fn(z: Tensor, t: Tensor, r: Tensor) -> Tensor:
        return flow_map.average_velocity(z, t, r, cond)

    t = torch.tensor([0.3, 0.5, 0.8, 0.9], dtype=dtype, device=DEVICE)
    primals = (randn(N, 4, 16, 16, dtype=dtype), t, 0.5 * t)
    return fn, primals, (randn(N, 4, 16, 16, seed=5, dtype=dtype), torch.ones_like(t), 0 * t)


def central_difference(fn, primals: tuple, tangents: tuple, h: float = 3e-6) -> Tensor:
    """Fourth-order central difference of ``fn`` at ``primals`` along ``tangents``."""

    def at(s: float) -> Tensor:
        return fn(*(p + s * h * v for p, v in zip(primals, tangents, strict=True)))

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return (8 * (at(1) - at(-1)) - (at(2) - at(-2))) / (12 * h)


@pytest.mark.parametrize("case", [sct_case, meanflow_case], ids=["sct_adm", "meanflow_dit"])
def test_jvp_tangent_on_cuda(case):
    fn, primals, tangents = case(torch.float64)
    exact = tangent(fn, primals, tangents)
    assert exact.dtype == torch.float64
    assert rel(exact, central_difference(fn, primals, tangents)) < 1e-6
    fd = tangent(fn, primals, tangents, method="finite_difference", epsilon=1e-3)
    assert rel(fd, exact) < 1e-4  # the documented fallback, one CUDA dropout mask for both calls
    fn, primals, tangents = case(torch.float32)
    with bf16():  # the objectives' tangent pass inside a bf16-mixed training step
        float32 = tangent(fn, primals, tangents, precision="float32")
        autocast = tangent(fn, primals, tangents, precision="autocast")
    assert float32.dtype == torch.float32 and rel(float32, exact) < 1e-4
    assert autocast.isfinite().all() and rel(autocast, exact) < 0.1


# Last: compilation is the slowest part, so a time limit cuts it rather than the rest.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["adm", "dit"])
def test_compile_fullgraph_matches_eager(name, dtype):
    # ADM in channels-last as configs/ct_imagenet64.yaml's Compile callback runs it.
    net, args = build(name, channels_last=name == "adm")
    compiled = torch.compile(net, fullgraph=True)  # a graph break raises
    amp = torch.autocast(DEVICE.type, torch.bfloat16, enabled=dtype == "bfloat16")
    with torch.no_grad():
        reference = flat(net(*args))  # eager float32
        with amp:
            eager, fast = flat(net(*args)), flat(compiled(*args))
    assert fast.isfinite().all()
    if dtype == "float32":
        assert rel(fast, eager) < 1e-5
    else:  # both round to bf16, in other places: compiled is as near float32 as eager is
        assert rel(fast, eager) < 0.05
        assert rel(fast, reference) < 1.5 * rel(eager, reference) + 1e-3
