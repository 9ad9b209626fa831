"""Eq. 3 on every attention kernel the host offers, its bias folded into the keys (tier 1, both cores).

The host's kernels take no per-key bias; ``self_subject_attention`` carries ``log(omega_ref * m^r)`` in
one more head dimension of the keys (constant 1 in the queries, the 1/sqrt(d) scale compensated), so
each kernel computes Eq. 3 as plain attention over the concatenated keys. Checked here against a float64
dense computation (explicit log-mask and softmax, ``test_eq3.dense_ssa``) from the same rounded inputs.

Tolerance: the output is a convex mix of the values, so rounding moves it by about eps(dtype) * max|v|.
Measured on this machine's CPU over 20 seeds (13 own + 19 reference keys, 5 heads of 40, fractional
mask): at most 1.16 eps * max|v| in float32 (the host's own plain attention: 1.56), 0.66 in float16,
0.73 in bfloat16 (plain: 0.62 and 0.51). The tests allow 2 eps * max|v|; a wrong bias, a dropped
or extra key, or an uncompensated scale is of the order of the values themselves.
"""

import functools
import importlib.util

import pytest
import torch

import comfy.ldm.modules.attention as host_attention
from comfyui_dreamtuner.dreamtuner_core import host
from comfyui_dreamtuner.dreamtuner_core.ssa.attention import reference_tokens, self_subject_attention
from dreamtuner_devtools import tiny_models as tm
from test_eq3 import dense_ssa
from test_self_subject_attention import ssa

CPU_KERNELS = ["attention_basic", "attention_split", "attention_sub_quad", "attention_pytorch"]


def _gpu_kernel(name, flag, package):
    """A pytest param for a CUDA-only kernel of the host, skipped with the reason when it cannot run here."""
    reasons = []
    if not hasattr(host_attention, name):
        reasons.append(f"this comfy core has no {name}")
    elif flag and not getattr(host_attention, flag, False):
        reasons.append(f"{package} is not installed")
    if package and importlib.util.find_spec(package) is None:
        reasons.append(f"{package} is not installed")
    if not torch.cuda.is_available():
        reasons.append("it needs a CUDA device")
    marks = [pytest.mark.skip(reason=f"{name}: " + "; ".join(dict.fromkeys(reasons)))] if reasons else []
    return pytest.param(name, marks=marks, id=name)


KERNELS = [pytest.param(name, id=name) for name in CPU_KERNELS] + [
    _gpu_kernel("attention_xformers", None, "xformers"),
    _gpu_kernel("attention_flash", "FLASH_ATTENTION_IS_AVAILABLE", "flash_attn"),
    _gpu_kernel("attention_sage", "SAGE_ATTENTION_IS_AVAILABLE", "sageattention"),
]
GPU_ONLY = {"attention_xformers", "attention_flash", "attention_sage"}


def device_for(kernel):
    return torch.device("cuda" if kernel in GPU_ONLY else "cpu")


def layer(seed, tokens, ref_tokens, heads=5, head_dim=40, batch=2):
    g = torch.Generator().manual_seed(seed)
    inner = heads * head_dim
    r = lambda *shape: torch.randn(shape, generator=g)
    return r(batch, tokens, inner), r(batch, tokens, inner), r(batch, tokens, inner), r(ref_tokens, inner), r(ref_tokens, inner)


def references(seed, counts, masks, omegas, dtype, device, head_dim=40, heads=5):
    """Kept keys/values/bias of several references joined (as the run cache joins them), and the dense inputs."""
    g = torch.Generator().manual_seed(seed + 100)
    kept, dense = [], []
    for count, mask, omega in zip(counts, masks, omegas):
        k_r, v_r = (torch.randn(count, heads * head_dim, generator=g).to(dtype) for _ in range(2))
        kept.append(reference_tokens(k_r, v_r, mask, omega))
        dense.append((k_r, v_r, omega * mask))
    joined = [torch.cat(parts) for parts in zip(*kept)]
    k_all, v_all, w_all = (torch.cat(parts) for parts in zip(*dense))
    return [t.to(device) for t in joined], (k_all.float(), v_all.float(), w_all)


def fractional_mask(n, seed, keep=0.7):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, generator=g)
    return torch.where(m < 1 - keep, torch.zeros_like(m), m)


def few_kept(n, kept):
    m = torch.zeros(n)
    m[torch.linspace(0, n - 1, kept).long()] = 1.0
    return m


CASES = {
    # own tokens, reference token counts, masks, omegas: key counts that are not multiples of 8
    "one-fractional": (13, [19], [fractional_mask(19, 1)], [3.0]),
    "two-references": (29, [19, 11], [fractional_mask(19, 2), torch.ones(11)], [3.0, 0.5]),
    "three-references": (7, [5, 9, 13], [torch.ones(5), fractional_mask(9, 3), few_kept(13, 3)], [1.0, 2.0, 7.0]),
    "few-kept": (21, [64], [few_kept(64, 2)], [3.0]),
    "one-kept-of-two": (15, [33, 47], [few_kept(33, 1), few_kept(47, 2)], [0.3, 3.0]),
}


def check(kernel, dtype, case, seed=0):
    own, counts, masks, omegas = CASES[case]
    device = device_for(kernel)
    q, k, v, _, _ = (t.to(dtype) for t in layer(seed, own, 1))
    (k_kept, v_kept, bias), (k_r, v_r, weight) = references(seed, counts, masks, omegas, dtype, device)
    assert k_kept.shape[0] == int((weight > 0).sum())  # tokens of weight 0 are dropped, not attended
    out = self_subject_attention(q.to(device), k.to(device), v.to(device), k_kept, v_kept, bias, heads=5,
                                 attention=getattr(host_attention, kernel))
    assert out.dtype == dtype and out.shape == q.shape
    expected = dense_ssa(q.float(), k.float(), v.float(), k_r, v_r, weight, 1.0, 5)
    magnitude = max(float(v.abs().max()), float(v_r.abs().max()))
    torch.testing.assert_close(out.cpu().double(), expected, atol=2 * torch.finfo(dtype).eps * magnitude, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernel", KERNELS)
def test_eq3_in_float32_on_every_host_kernel_matches_float64_dense(kernel, case):
    if kernel in ("attention_flash", "attention_sage"):
        pytest.skip(f"{kernel} computes in float16/bfloat16 only")
    check(kernel, torch.float32, case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["two-references", "few-kept"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_eq3_in_half_precision_on_every_host_kernel_matches_float64_dense(kernel, case, dtype):
    check(kernel, dtype, case)


@pytest.mark.parametrize("kernel", KERNELS)
def test_omega_zero_is_the_hosts_own_call_bitwise(kernel):
    device = device_for(kernel)
    q, k, v, k_r, v_r = (t.to(device) for t in layer(4, 13, 19))
    function = getattr(host_attention, kernel)
    kept = reference_tokens(k_r, v_r, fractional_mask(19, 4).to(device), 0.0)
    assert kept[0].shape[0] == 0
    assert torch.equal(self_subject_attention(q, k, v, *kept, heads=5, attention=function), function(q, k, v, 5))


@pytest.mark.parametrize("kernel", KERNELS)
def test_omega_one_with_a_binary_mask_is_plain_attention_over_the_joined_keys(kernel):
    """omega_ref * m^r = 1 on every kept token: no bias, so no folding; the host's own call on [k, k^r]."""
    device = device_for(kernel)
    q, k, v, k_r, v_r = layer(5, 13, 19)
    mask = (torch.arange(19) % 3 != 0).float()
    k_kept, v_kept, bias = reference_tokens(k_r, v_r, mask, 1.0)
    assert torch.equal(bias, torch.zeros(12))  # 12 of 19 kept, each of weight 1
    function = getattr(host_attention, kernel)
    q, k, v, k_kept, v_kept, bias = (t.to(device) for t in (q, k, v, k_kept, v_kept, bias))
    out = self_subject_attention(q, k, v, k_kept, v_kept, bias, heads=5, attention=function)
    joined = function(q, torch.cat([k, k_kept.expand(2, -1, -1)], 1), torch.cat([v, v_kept.expand(2, -1, -1)], 1), 5)
    assert torch.equal(out, joined)
    assert torch.equal(self_subject_attention(q, k, v, k_kept, v_kept, bias, heads=5, attention=function,
                                              bias_free=True), joined)
    expected = dense_ssa(q.cpu(), k.cpu(), v.cpu(), k_r, v_r, mask, 1.0, 5)
    torch.testing.assert_close(out.cpu().double(), expected, atol=2 * torch.finfo(torch.float32).eps * 5, rtol=0)


@pytest.mark.parametrize("pad_head_to", [1, 8, 64])
def test_any_head_padding_gives_the_same_eq3(pad_head_to):
    q, k, v, k_r, v_r = layer(6, 13, 19)
    mask = fractional_mask(19, 6)
    out = self_subject_attention(q, k, v, *reference_tokens(k_r, v_r, mask, 3.0), heads=5,
                                 attention=host_attention.attention_basic, pad_head_to=pad_head_to)
    expected = dense_ssa(q, k, v, k_r, v_r, mask, 3.0, 5)
    torch.testing.assert_close(out.double(), expected, atol=2 * torch.finfo(torch.float32).eps * 5, rtol=0)


def test_fused_kernels_get_head_dimensions_aligned_to_eight():
    seen = []

    def sdpa(q, k, v, heads, mask=None, **kwargs):
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1], mask))
        return host_attention.attention_pytorch(q, k, v, heads, mask=mask, **kwargs)

    sdpa.__name__ = "attention_pytorch"  # the host's kernel, observed
    q, k, v, k_r, v_r = layer(7, 13, 19)
    self_subject_attention(q, k, v, *reference_tokens(k_r, v_r, fractional_mask(19, 7), 3.0), heads=5, attention=sdpa)
    assert seen == [(48, 48, 48, None)]  # 40 + 1 for the bias, padded to 48; no mask reaches the kernel


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_sampling_runs_every_self_attention_on_the_hosts_kernel(kernel, monkeypatch):
    """Patched and unpatched layers alike call the kernel the host selected, never with a mask."""
    model = tm.build("sd15")
    pos, neg, latent, reference = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3, 8, 8), tm.latent(4, 8, 8)
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:40, 16:56] = 0.6
    calls, other = [], []
    chosen = getattr(host_attention, kernel)

    @functools.wraps(chosen)  # the kernel's own signature (the late-2024 ones take no transformer_options)
    def spy(q, k, v, heads, mask=None, **kwargs):
        calls.append(mask)
        return chosen(q, k, v, heads, mask=mask, **kwargs)

    for name in CPU_KERNELS:
        if name != kernel:
            original = getattr(host_attention, name)
            monkeypatch.setattr(host_attention, name,
                                lambda *a, _n=name, _f=original, **kw: other.append(_n) or _f(*a, **kw))
    monkeypatch.setattr(host_attention, "optimized_attention", spy)
    patched = ssa(model, reference, 3.0, reference_mask=mask)
    out = tm.sample(patched, pos, neg, latent, steps=2)
    plain = tm.sample(model, pos, neg, latent, steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert calls and all(m is None for m in calls) and other == []
