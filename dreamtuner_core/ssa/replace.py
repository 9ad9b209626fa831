"""The ``attn1`` replacement: records the reference rows' keys/values, applies Eq. 3 to the generated rows.

Every row runs on the attention kernel the host selected (``optimized_attention``): Eq. 3's bias is
folded into the keys (``attention.fold_bias_into_keys``), so no layer leaves the host's kernel.
"""

from __future__ import annotations

import torch

from .. import host
from ..errors import DreamTunerInputError
from ..keys import CALL_KEY, STATE_KEY, PackPatch, layer_key
from .attention import select_tokens, self_subject_attention
from .cache import RunCache


class SelfSubjectAttentionReplace(PackPatch):
    """``attn1`` replacement: records reference rows, applies Eq. 3 to generated rows.

    Stateless: everything it reads comes from ``extra_options``, so one object
    serves every patched layer and every clone of the model. ``observer``: another node's replacement on
    this layer that only reads the attention (SAG, :func:`~.coexistence.observes_attention`); it is called
    with the generated rows alone (their own keys, their own ``cond_or_uncond``) and its output dropped.
    """

    def __init__(self, observer=None):
        self.observer = observer

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        attention = host.attention_function()
        kwargs = host.attention_kwargs(attention, extra_options)
        call = extra_options.get(CALL_KEY)
        if call is None:
            if self.observer is not None:  # no reference this call: the observing node's own attention
                return self.observer(q, k, v, extra_options)
            state, sigmas = extra_options.get(STATE_KEY), extra_options.get("sigmas")
            if state is not None and sigmas is not None and any(r.is_active(float(sigmas.max()))
                                                                 for r in state.references):
                state.cache.bypassed = True  # named by the post-CFG hook, which sees the model's options
            return attention(q, k, v, heads, **kwargs)
        layer = layer_key(extra_options)
        n, groups = call.n_generated, call.groups
        if q.shape[0] != k.shape[0] and k.numel() % (q.shape[0] * k.shape[-1]) == 0:
            # HyperTile tiles only the queries; the host's attention then reads the keys/values as
            # ``q.shape[0]`` consecutive chunks (its reshape by the query batch). Do the same here.
            k, v = k.reshape(q.shape[0], -1, k.shape[-1]), v.reshape(q.shape[0], -1, v.shape[-1])
        if k.shape[0] != n + len(call.reference_rows):
            n, groups = self._regroup(k.shape[0], call, layer)
        if call.reference_rows:
            self._record(k, v, call, layer)
        # Runs of rows with the same features; rows without any (self-subject-attention off for that
        # conditioning, and the reference rows themselves) share one plain attention call.
        runs = []
        for start, end, sigma in groups + [(n, q.shape[0], None)]:
            level = call.levels[sigma] if sigma is not None else None
            features = level.get(layer) if level is not None else None
            if end == start:
                continue
            if runs and features is None and runs[-1][2] is None and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end, None, None)
            else:
                runs.append((start, end, features, features is not None and level.bias_free(layer)))
        if self.observer is not None and n and call.generated_chunks:
            self.observer(q[:n], k[:n], v[:n], dict(extra_options, cond_or_uncond=list(call.generated_chunks)))
        outputs = []
        for start, end, features, bias_free in runs:
            qs, ks, vs = q[start:end], k[start:end], v[start:end]
            if features is None:
                outputs.append(attention(qs, ks, vs, heads, **kwargs))
            else:  # Eq. 3 on the same kernel, its bias folded into the keys
                outputs.append(self_subject_attention(qs, ks, vs, *features, heads, attention, bias_free=bias_free,
                                                      **kwargs))
        return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]

    @staticmethod
    def _regroup(rows, call, layer):
        """(n, groups) for a call whose row count is not the planned one, when that is unambiguous.

        A tiling patch (HyperTile) splits each generated item into consecutive tiles: every tile reads
        its item's features. Another pack may call the attention itself on part of the rows
        (Advanced-ControlNet's Reference ControlNet runs the uncond rows again): when every generated
        row reads the same features, any rows do.
        """
        n, groups = call.n_generated, call.groups
        tiles = rows // n if n and not call.reference_rows else 0
        if tiles and tiles * n == rows:
            return rows, [(start * tiles, end * tiles, sigma) for start, end, sigma in groups]
        levels = {sigma for _, _, sigma in groups}
        if not call.reference_rows and len(levels) == 1:
            return rows, [(0, rows, levels.pop())]
        raise DreamTunerInputError(
            f"Self-Subject-Attention planned {n + len(call.reference_rows)} rows for self-attention layer "
            f"{'.'.join(map(str, layer or ()))} but another patch on this model called it with {rows}, and the rows "
            "read different reference features (interleaved guidance's Eq. 4 evaluates the prompt with and "
            "without the reference in one call). Advanced-ControlNet's Reference ControlNet does this: use the "
            "core KSampler (or p_r 0) with it, or exclude these blocks in Self-Subject-Attention's 'blocks' input.")

    @staticmethod
    def _record(k, v, call, layer):
        """Keep each reference row's kept tokens and bias for this layer (no host sync: the index and
        bias were made once for the run, on this device and in this dtype)."""
        cache = call.cache if call.cache is not None else RunCache()
        for offset, (sigma, reference) in enumerate(call.reference_rows):
            if reference.feeds(layer):
                row = call.n_generated + offset
                index, bias = cache.kept(reference, k.shape[1], k)
                call.levels[sigma].add(layer, select_tokens(k[row], index), select_tokens(v[row], index), bias,
                                       bias_free=cache.bias_free(reference, k.shape[1], k), source=id(reference))
