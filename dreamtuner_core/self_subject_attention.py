"""Self-subject-attention, paper 3.2, Eq. 3.

The generated image's self-attention also reads the reference's tokens:

    SSA(z, z^r) = softmax(q [k, k^r]^T / sqrt(d) + log m) [v, v^r],   m = [J, omega_ref * m^r]

``k^r``/``v^r`` come from the reference features ``z^r`` entering the same
layer, projected by that layer's own ``to_k``/``to_v``. Reference tokens with
``m^r = 0`` get ``log 0 = -inf`` and are never attended; they are dropped
before the attention call, which is exact (``exp(-inf) = 0``) and saves their
memory. The bias is one value per key token, broadcast over queries and heads:
no ``[queries x keys]`` mask is ever built here.
"""

from __future__ import annotations

import torch

from . import host


def reference_tokens(k_r: torch.Tensor, v_r: torch.Tensor, m_r: torch.Tensor, omega_ref: float):
    """Keys, values and log-mask bias of one reference in one layer.

    k_r, v_r: [N_r, inner] the reference's projected tokens; m_r: [N_r] in [0, 1].
    Returns the tokens with ``omega_ref * m_r > 0`` and their bias ``log(omega_ref * m_r)``;
    with ``omega_ref = 0`` none are left and Eq. 3 is plain self-attention.
    """
    keep = (m_r * float(omega_ref)) > 0
    if bool(keep.all()):
        k_kept, v_kept, m_kept = k_r, v_r, m_r
    else:
        index = keep.nonzero().flatten().to(k_r.device)
        k_kept, v_kept, m_kept = k_r.index_select(0, index), v_r.index_select(0, index), m_r[keep]
    bias = torch.log(m_kept.double() * float(omega_ref)).to(device=k_r.device)
    return k_kept, v_kept, bias


def self_subject_attention(q, k, v, k_ref, v_ref, log_m_ref, heads, attention=None, **attention_kwargs):
    """Eq. 3 for a batch of generated items that share the same reference tokens.

    q, k, v: [B, N, inner] the layer's own projections of the generated items.
    k_ref, v_ref: [N_ref, inner] the kept reference tokens (every reference that
        feeds this layer, concatenated); log_m_ref: [N_ref], ``log(omega_ref * m^r)``.
    attention: the host's attention function (``optimized_attention`` by default),
        called with an additive per-key bias of shape [1, 1, N + N_ref].
    """
    if attention is None:
        attention = host.attention_function()
    batch, own_tokens = k.shape[0], k.shape[1]
    if k_ref.shape[0] == 0:
        return attention(q, k, v, heads, **attention_kwargs)
    keys = torch.cat([k, k_ref.to(k.dtype).unsqueeze(0).expand(batch, -1, -1)], dim=1)
    values = torch.cat([v, v_ref.to(v.dtype).unsqueeze(0).expand(batch, -1, -1)], dim=1)
    log_m = torch.cat([torch.zeros(own_tokens, dtype=log_m_ref.dtype, device=log_m_ref.device), log_m_ref])
    return attention(q, keys, values, heads, mask=log_m.to(q.dtype).view(1, 1, -1), **attention_kwargs)

