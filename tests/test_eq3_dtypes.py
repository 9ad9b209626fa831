"""Eq. 3 in half precision (fp16, bf16) on every attention backend of the host, against float64.

The dense reference (test_eq3.dense_ssa) is computed in float64 from the same rounded inputs, so the
only error left is the low-precision computation itself. The output is a convex combination of the
values: rounding it, and the rounding of the attention weights (scores and softmax in the dtype),
each move it by about eps(dtype) * max|v|; the tolerance allows twice that.
"""

import pytest
import torch

import comfy.ldm.modules.attention as host_attention
from comfyui_dreamtuner.dreamtuner_core.ssa.cache import RunCache
from comfyui_dreamtuner.dreamtuner_core.references import Reference
from comfyui_dreamtuner.dreamtuner_core.ssa.attention import reference_tokens, self_subject_attention
from test_eq3 import BACKENDS, dense_ssa, random_layer

# 19 reference tokens, 13 of them kept: 16 + 13 = 29 keys, not a multiple of 8.
MASK = torch.tensor([0.0, 1.0, 0.25, 0.0, 1.0, 0.5, 1.0, 0.0, 0.75, 1.0, 1.0, 0.0, 0.1, 1.0, 0.0, 1.0, 0.3, 1.0, 0.0])


def tolerance(dtype, values):
    return 2 * torch.finfo(dtype).eps * values.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eq3_in_half_precision_matches_float64(dtype, backend):
    q, k, v, k_r, v_r = (t.to(dtype) for t in random_layer(1, tokens=16, ref_tokens=19))
    function = getattr(host_attention, backend)
    k_kept, v_kept, bias = reference_tokens(k_r, v_r, MASK, 3.0)
    out = self_subject_attention(q, k, v, k_kept, v_kept, bias, heads=4, attention=function)
    assert out.dtype == dtype
    expected = dense_ssa(q.float(), k.float(), v.float(), k_r.float(), v_r.float(), MASK, 3.0, 4)
    torch.testing.assert_close(out.double(), expected, atol=tolerance(dtype, v), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_run_cache_keeps_index_and_bias_in_the_attention_dtype(dtype):
    mask = torch.zeros(8, 8)
    mask[:4, :] = 1.0  # a 0/1 mask: every kept token has the bias log(omega_ref) exactly as the dtype holds it
    reference = Reference(latent=torch.zeros(4, 8, 8), noise=torch.zeros(4, 8, 8), mask=mask, omega_ref=3.0)
    like = torch.zeros(1, dtype=dtype)
    cache = RunCache()
    index, bias = cache.kept(reference, 64, like)
    assert bias.dtype == dtype and bias.device == like.device and index.dtype == torch.int64
    assert torch.equal(index, torch.arange(32))
    assert torch.equal(bias, torch.full((32,), torch.log(torch.tensor(3.0)).item(), dtype=dtype))
    assert cache.kept(reference, 64, like)[1] is bias  # made once for the run
    assert not cache.bias_free(reference, 64, like)  # log 3 != 0: Eq. 3 folds the bias into the keys
    one = Reference(latent=torch.zeros(4, 8, 8), noise=torch.zeros(4, 8, 8), mask=mask, omega_ref=1.0)
    assert cache.bias_free(one, 64, like) and cache.bias_free(one, 16, like)  # omega_ref 1, 0/1 on both grids
    soft = torch.zeros(8, 8)
    soft[:3, :] = 1.0
    soft_one = Reference(latent=torch.zeros(4, 8, 8), noise=torch.zeros(4, 8, 8), mask=soft, omega_ref=1.0)
    assert cache.bias_free(soft_one, 64, like) and not cache.bias_free(soft_one, 16, like)  # 4x4: rows of 0.5
    off = Reference(latent=torch.zeros(4, 8, 8), noise=torch.zeros(4, 8, 8), mask=mask, omega_ref=0.0)
    index, bias = cache.kept(off, 64, like)
    assert index.numel() == 0 and bias.numel() == 0  # omega_ref = 0 attends no reference token
