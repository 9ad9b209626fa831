"""Eq. 3 for one layer against a dense implementation written here (explicit mask and softmax)."""

import math

import pytest
import torch

import comfy.ldm.modules.attention as host_attention
from comfyui_dreamtuner.dreamtuner_core.references import Reference, token_grid
from comfyui_dreamtuner.dreamtuner_core.ssa.attention import reference_tokens, self_subject_attention
from tolerances import assert_rounding_close

BACKENDS = ["attention_basic", "attention_sub_quad", "attention_split", "attention_pytorch"]


def dense_ssa(q, k, v, k_r, v_r, m_r, omega_ref, heads):
    """softmax(q [k, k^r]^T / sqrt(d) + log m) [v, v^r] with m = [J, omega_ref * m^r], all in float64."""
    b, n, inner = q.shape
    d = inner // heads
    keys = torch.cat([k, k_r.expand(b, -1, -1)], 1).double()
    values = torch.cat([v, v_r.expand(b, -1, -1)], 1).double()
    m = torch.cat([torch.ones(n), omega_ref * m_r]).double()  # J over the image's own tokens
    heads_of = lambda t: t.reshape(b, t.shape[1], heads, d).transpose(1, 2)
    scores = heads_of(q.double()) @ heads_of(keys).transpose(-1, -2) / math.sqrt(d) + torch.log(m)
    weights = torch.softmax(scores, dim=-1)
    return (weights @ heads_of(values)).transpose(1, 2).reshape(b, n, inner)


def random_layer(seed, batch=2, tokens=16, ref_tokens=16, inner=32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(shape, generator=g)
    return r(batch, tokens, inner), r(batch, tokens, inner), r(batch, tokens, inner), r(ref_tokens, inner), r(ref_tokens, inner)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("omega_ref", [0.5, 3.0])
def test_eq3_matches_dense_with_fractional_and_zero_mask(backend, omega_ref):
    q, k, v, k_r, v_r = random_layer(1)
    m_r = torch.tensor([0.0, 1.0, 0.25, 0.0, 1.0, 0.5, 1.0, 0.0, 0.75, 1.0, 1.0, 0.0, 0.1, 1.0, 0.0, 1.0])
    k_kept, v_kept, bias = reference_tokens(k_r, v_r, m_r, omega_ref)
    assert k_kept.shape[0] == int((m_r > 0).sum())  # background tokens are dropped, not attended
    out = self_subject_attention(q, k, v, k_kept, v_kept, bias, heads=4,
                                 attention=getattr(host_attention, backend))
    # float32 attention against float64: scores are dot products of length d = 8, the output sums 32 keys.
    expected = dense_ssa(q, k, v, k_r, v_r, m_r, omega_ref, 4)
    assert_rounding_close(out.double(), expected, reduction=32, depth=2, dtype=torch.float32,
                          magnitude=max(float(v.abs().max()), float(v_r.abs().max())))  # a convex mix of values


def test_background_reference_tokens_never_change_the_output():
    q, k, v, k_r, v_r = random_layer(2)
    m_r = (torch.arange(16) % 3 == 0).float()
    out = self_subject_attention(q, k, v, *reference_tokens(k_r, v_r, m_r, 3.0), heads=4)
    k_r2, v_r2 = k_r.clone(), v_r.clone()
    k_r2[m_r == 0] = 1e3 * torch.randn_like(k_r2[m_r == 0])
    v_r2[m_r == 0] = -7.0
    out2 = self_subject_attention(q, k, v, *reference_tokens(k_r2, v_r2, m_r, 3.0), heads=4)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_omega_zero_is_plain_self_attention_exactly(backend):
    q, k, v, k_r, v_r = random_layer(3)
    attention = getattr(host_attention, backend)
    k_kept, v_kept, bias = reference_tokens(k_r, v_r, torch.ones(16), 0.0)
    assert k_kept.shape[0] == 0  # omega_ref * m^r = 0 everywhere: log 0, never attended
    out = self_subject_attention(q, k, v, k_kept, v_kept, bias, heads=4, attention=attention)
    assert torch.equal(out, attention(q, k, v, 4))


def test_all_background_reference_leaves_plain_attention():
    k_r, v_r = torch.randn(8, 4), torch.randn(8, 4)
    k_kept, _, _ = reference_tokens(k_r, v_r, torch.zeros(8), 3.0)
    assert k_kept.shape[0] == 0


@pytest.mark.parametrize("hw, tokens, grid", [((8, 8), 64, (8, 8)), ((8, 8), 16, (4, 4)), ((9, 7), 20, (5, 4)),
                                              ((9, 7), 6, (3, 2)), ((9, 7), 2, (2, 1))])
def test_token_grid_follows_stride_two_downsampling(hw, tokens, grid):
    assert token_grid(hw, tokens) == grid


def test_mask_is_area_resized_to_each_layer_grid():
    mask = torch.zeros(64, 64)
    mask[:32, :16] = 1.0  # top-left quarter-width strip
    ref = Reference(latent=torch.zeros(4, 8, 8), noise=torch.zeros(4, 8, 8), mask=mask, omega_ref=1.0)
    expected = torch.zeros(4, 4)
    expected[:2, :1] = 1.0
    assert torch.equal(ref.token_mask(16), expected.flatten())
    coarse = ref.token_mask(4).reshape(2, 2)
    assert torch.allclose(coarse, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
