"""Self-subject-attention, paper 3.2, Eq. 3.

The generated image's self-attention also reads the reference's tokens:

    SSA(z, z^r) = softmax(q [k, k^r]^T / sqrt(d) + log m) [v, v^r],   m = [J, omega_ref * m^r]

``k^r``/``v^r`` come from the reference features ``z^r`` entering the same
layer, projected by that layer's own ``to_k``/``to_v``. Reference tokens with
``m^r = 0`` get ``log 0 = -inf`` and are never attended; they are dropped
before the attention call, which is exact (``exp(-inf) = 0``) and saves their
memory. The bias is one value per key token, broadcast over queries and heads:
no ``[queries x keys]`` mask is ever built here.

Which tokens are kept and their bias depend only on the mask, ``omega_ref``
and the layer's token grid, so :func:`kept_reference_tokens` runs once per
reference and grid (on the CPU, where the mask lives); the reference pass
keeps its result on the device, in the attention's dtype, for the whole run.
"""

from __future__ import annotations

import torch

from .. import host


def kept_reference_tokens(m_r: torch.Tensor, omega_ref: float):
    """(index, bias) of the reference tokens Eq. 3 attends, from the mask alone.

    m_r: [N_r] in [0, 1] on the CPU. Tokens with ``omega_ref * m_r > 0`` are kept;
    ``index`` lists them (``None`` when all are kept) and ``bias`` is their
    ``log(omega_ref * m_r)`` in float32. With ``omega_ref = 0`` none are kept and
    Eq. 3 is plain self-attention; with a 0/1 mask every kept bias is ``log(omega_ref)``.
    """
    weight = m_r.float() * float(omega_ref)
    keep = weight > 0
    index = None if bool(keep.all()) else keep.nonzero().flatten()
    return index, torch.log(weight[keep])


def select_tokens(tokens: torch.Tensor, index) -> torch.Tensor:
    """``tokens[index]`` along the token axis (dim 0), or all of them for ``index=None``."""
    return tokens if index is None else tokens.index_select(0, index)


def reference_tokens(k_r: torch.Tensor, v_r: torch.Tensor, m_r: torch.Tensor, omega_ref: float):
    """Keys, values and log-mask bias of one reference in one layer (the kept tokens only)."""
    index, bias = kept_reference_tokens(m_r, omega_ref)
    index = None if index is None else index.to(k_r.device)
    return select_tokens(k_r, index), select_tokens(v_r, index), bias.to(k_r.device)


def self_subject_attention(q, k, v, k_ref, v_ref, log_m_ref, heads, attention=None, pad_keys_to=1,
                           **attention_kwargs):
    """Eq. 3 for a batch of generated items that share the same reference tokens.

    q, k, v: [B, N, inner] the layer's own projections of the generated items.
    k_ref, v_ref: [N_ref, inner] the kept reference tokens (every reference that
        feeds this layer, concatenated); log_m_ref: [N_ref], ``log(omega_ref * m^r)``.
    attention: the host's attention function (``optimized_attention`` by default),
        called with an additive per-key bias of shape [1, 1, N + N_ref (+ padding)].
    pad_keys_to: pad the key count to a multiple of this with keys whose bias is
        ``-inf`` (exactly no weight): PyTorch's fused SDPA kernels want the bias's
        key length aligned to 8 in half precision.
    """
    if attention is None:
        attention = host.attention_function()
    batch, own_tokens = k.shape[0], k.shape[1]
    if k_ref.shape[0] == 0:
        return attention(q, k, v, heads, **attention_kwargs)
    keys = [k, k_ref.to(k.dtype).unsqueeze(0).expand(batch, -1, -1)]
    values = [v, v_ref.to(v.dtype).unsqueeze(0).expand(batch, -1, -1)]
    bias = [q.new_zeros(own_tokens), log_m_ref.to(q.dtype)]
    pad = -(own_tokens + k_ref.shape[0]) % pad_keys_to
    if pad:
        keys.append(k.new_zeros(batch, pad, k.shape[2]))
        values.append(v.new_zeros(batch, pad, v.shape[2]))
        bias.append(q.new_full((pad,), float("-inf")))
    mask = torch.cat(bias).view(1, 1, -1)
    return attention(q, torch.cat(keys, dim=1), torch.cat(values, dim=1), heads, mask=mask, **attention_kwargs)
