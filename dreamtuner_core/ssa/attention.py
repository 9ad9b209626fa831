"""Self-subject-attention, paper 3.2, Eq. 3.

The generated image's self-attention also reads the reference's tokens:

    SSA(z, z^r) = softmax(q [k, k^r]^T / sqrt(d) + log m) [v, v^r],   m = [J, omega_ref * m^r]

``k^r``/``v^r`` come from the reference features ``z^r`` entering the same
layer, projected by that layer's own ``to_k``/``to_v``. Reference tokens with
``m^r = 0`` get ``log 0 = -inf`` and are never attended; they are dropped
before the attention call, which is exact (``exp(-inf) = 0``) and saves their
memory. The bias is one value per key token, broadcast over queries and heads:
no ``[queries x keys]`` mask is ever built here.

The host's attention kernels (sub-quadratic, split, SDPA, xformers, FlashAttention,
Sage: whatever ``--use-*-attention`` selected) take no per-key bias, so the bias is
folded into the keys (:func:`fold_bias_into_keys`): one more head dimension, 1 in
every query and ``sqrt(d') * log m`` in every key, the queries scaled by
``sqrt(d'/d)`` for the kernel's ``1/sqrt(d')``. Eq. 3 is then plain attention over
the concatenated keys, computed by the same kernel as every unpatched layer.

Which tokens are kept and their bias depend only on the mask, ``omega_ref``
and the layer's token grid, so :func:`kept_reference_tokens` runs once per
reference and grid (on the CPU, where the mask lives); the reference pass
keeps its result on the device, in the attention's dtype, for the whole run.
"""

from __future__ import annotations

import math

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


def head_alignment(attention) -> int:
    """The multiple the head dimension of a folded call is padded to (see :func:`fold_bias_into_keys`)."""
    return host.head_alignment(attention)


def fold_bias_into_keys(q, keys, values, bias, heads, align=1):
    """q, keys, values in the host's heads-first layout, with the per-key bias carried by one more dimension.

    q: [B, N, h*d]; keys, values: [B, K, h*d]; bias: [K] (0 for the image's own keys).
    Returns [B, h, N, d'], [B, h, K, d'], [B, h, K, d'] with ``d' = d + 1`` rounded up to ``align``:
    the queries get ``sqrt(d'/d) * q`` and a constant 1 in dimension ``d``, the keys get ``sqrt(d') * bias``
    there, the rest is zero. A kernel that scales by ``1/sqrt(d')`` then computes
    ``q.k / sqrt(d) + bias`` for every (query, key): Eq. 3 as plain attention. The values' extra
    dimensions are zero, so the output's first ``d`` dimensions per head are Eq. 3's.
    """
    b, n, inner = q.shape
    d = inner // heads
    padded = -(-(d + 1) // align) * align
    kq, kk = q.new_zeros(b, heads, n, padded), keys.new_zeros(b, heads, keys.shape[1], padded)
    kq[..., :d] = q.view(b, n, heads, d).transpose(1, 2) * math.sqrt(padded / d)  # differentiable (fine-tune)
    kq[..., d] = 1.0
    kk[..., :d] = keys.view(b, -1, heads, d).transpose(1, 2)
    kk[..., d] = bias.to(keys.dtype) * math.sqrt(padded)
    kv = values.new_zeros(b, heads, values.shape[1], padded)
    kv[..., :d] = values.view(b, -1, heads, d).transpose(1, 2)
    return kq, kk, kv


def self_subject_attention(q, k, v, k_ref, v_ref, log_m_ref, heads, attention=None, pad_keys_to=1,
                           bias_free=None, pad_head_to=None, **attention_kwargs):
    """Eq. 3 for a batch of generated items that share the same reference tokens, on the host's kernel.

    q, k, v: [B, N, inner] the layer's own projections of the generated items.
    k_ref, v_ref: [N_ref, inner] the kept reference tokens (every reference that
        feeds this layer, concatenated); log_m_ref: [N_ref], ``log(omega_ref * m^r)``.
    attention: the host's attention function (``optimized_attention`` by default: whatever kernel
        the host selected, which takes no bias). The bias is folded into the keys
        (:func:`fold_bias_into_keys`) and the kernel computes plain attention over the concatenated keys.
    pad_keys_to: pad the key count to a multiple of this with keys of bias ``-inf`` (exactly no weight).
    bias_free: True when every ``log_m_ref`` is 0 (``omega_ref * m^r = 1``): no fold, the kernel runs
        on the concatenated keys as they are. None: read from ``log_m_ref`` (a device sync off the CPU).
    pad_head_to: the multiple the folded head dimension is padded to (default: what the kernel needs,
        :func:`host.head_alignment`, 8 for the fused kernels).
    """
    if attention is None:
        attention = host.attention_function()
    batch, own_tokens = k.shape[0], k.shape[1]
    if k_ref.shape[0] == 0:
        return attention(q, k, v, heads, **attention_kwargs)
    keys = [k, k_ref.to(k.dtype).unsqueeze(0).expand(batch, -1, -1)]
    values = [v, v_ref.to(v.dtype).unsqueeze(0).expand(batch, -1, -1)]
    pad = -(own_tokens + k_ref.shape[0]) % pad_keys_to
    if bias_free is None:
        bias_free = not bool(torch.count_nonzero(log_m_ref))
    if bias_free and not pad:
        return attention(q, torch.cat(keys, dim=1), torch.cat(values, dim=1), heads, **attention_kwargs)
    bias = [q.new_zeros(own_tokens), log_m_ref.to(q.dtype)]
    if pad:
        keys.append(k.new_zeros(batch, pad, k.shape[2]))
        values.append(v.new_zeros(batch, pad, v.shape[2]))
        bias.append(q.new_full((pad,), float("-inf")))
    align = head_alignment(attention) if pad_head_to is None else pad_head_to
    fq, fk, fv = fold_bias_into_keys(q, torch.cat(keys, dim=1), torch.cat(values, dim=1), torch.cat(bias), heads, align)
    b, n, inner = q.shape
    if host.accepts_skip_output_reshape(attention):  # current ComfyUI: [B, h, N, d'] out, one copy less
        out = attention(fq, fk, fv, heads, skip_reshape=True, skip_output_reshape=True, **attention_kwargs)
        return out[..., :inner // heads].transpose(1, 2).reshape(b, n, inner)
    out = attention(fq, fk, fv, heads, skip_reshape=True, **attention_kwargs)
    return out.view(b, n, heads, -1)[..., :inner // heads].reshape(b, n, inner)
