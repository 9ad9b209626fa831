"""What self-subject-attention keeps for a sampling run, and frees when it is no longer needed.

The model's state (:class:`SelfSubjectAttentionState`, under ``transformer_options[STATE_KEY]``)
holds the references and the run's cache (:class:`RunCache`): the reference features of the
current evaluation (:class:`ReferenceFeatures`) and, per reference and layer grid, the kept-token
index and log-mask bias of Eq. 3. :class:`CallPlan` is what one model call holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..keys import STATE_KEY
from .attention import kept_reference_tokens


class ReferenceFeatures:
    """Kept reference keys/values (and log-mask bias) of every patched layer, at one noise level."""

    def __init__(self, text=None):
        self.text = text  # the text the references without their own caption were passed with
        self._parts = {}
        self._joined = {}
        self._bias_free = {}

    def add(self, layer, k, v, bias, bias_free=False, source=None):
        """Record one reference's kept keys/values on ``layer``. ``source`` names the reference: recording it
        again replaces its entry, so a layer recomputed in the backward pass (gradient checkpointing while
        fine-tuning) reads the same features as its forward did, not twice as many. ``bias_free``: every
        bias of this part is 0 (``omega_ref * m^r = 1``), known without reading ``bias``."""
        parts = self._parts.setdefault(layer, {})
        key = len(parts) if source is None else source
        parts[key] = (k, v, bias)
        self._bias_free.setdefault(layer, {})[key] = bool(bias_free)
        self._joined.pop(layer, None)

    def bias_free(self, layer) -> bool:
        """Whether every reference bias of ``layer`` is 0 (Eq. 3 is then attention over the joined keys as they are)."""
        free = self._bias_free.get(layer)
        return bool(free) and all(free.values())

    def get(self, layer):
        """(k_ref, v_ref, log_m_ref) of every reference feeding ``layer``, or ``None``."""
        joined = self._joined.get(layer)
        if joined is None and layer in self._parts:
            parts = list(self._parts[layer].values())
            joined = tuple(torch.cat(p, dim=0) if len(parts) > 1 else p[0] for p in zip(*parts))
            self._joined[layer] = joined
        return joined

    def layers(self):
        return list(self._parts)


class RunCache:
    """What self-subject-attention keeps during a sampling run, and frees when it is no longer needed.

    - ``levels``: reference features of the current evaluation, by LoRA hook group and reference
      sigma. Cond and uncond evaluated in separate calls share them; they are dropped at the end of
      every evaluation (the post-CFG hook), at a new step and at the end of the run.
    - ``positive_context``: the run's positive text, which the reference pass reads.
    - the kept-token index and log-mask bias of each reference on each layer grid, on the device in
      the attention's dtype: made once per run instead of once per layer and step.
    A new run is recognised by current ComfyUI's ``sample_sigmas`` tensor, or by a sigma above the
    last one; the host's end-of-run callback (current ComfyUI) or the pack's own guider clears it all.
    """

    def __init__(self):
        self.sigma, self.run, self.levels, self.positive_context = None, None, {}, None
        self.positive_extras = {}  # the positive's other per-item inputs (pooled text, Flux's guidance)
        self._kept, self._bias_free = {}, {}
        self.bypassed = False  # the attention replacement ran without this pack's model wrapper

    def for_step(self, sigma: float, run=None, hooks=None):
        """The features of this evaluation's step for the conditionings that run with ``hooks``."""
        if run is not self.run or (self.sigma is not None and sigma > self.sigma):
            self.positive_context = None
            self.positive_extras = {}
            self._kept, self._bias_free = {}, {}
        if sigma != self.sigma or run is not self.run:
            self.sigma, self.run, self.levels = sigma, run, {}
        return self.levels.setdefault(hooks, {})

    def kept(self, reference, tokens: int, like: torch.Tensor):
        """(index, bias) of ``reference``'s kept tokens on a grid of ``tokens``, on ``like``'s device and dtype."""
        key = (id(reference), tokens, like.device, like.dtype)
        kept = self._kept.get(key)
        if kept is None:
            index, bias = kept_reference_tokens(reference.token_mask(tokens), reference.omega_ref)
            kept = (None if index is None else index.to(like.device), bias.to(device=like.device, dtype=like.dtype))
            self._kept[key] = kept
            self._bias_free[key] = not bool(bias.to(like.dtype).any())
        return kept

    def bias_free(self, reference, tokens: int, like: torch.Tensor) -> bool:
        """Whether every kept token of ``reference`` on this grid has bias 0 (``omega_ref * m^r = 1``),
        read on the CPU when :meth:`kept` made the bias (no device sync)."""
        self.kept(reference, tokens, like)
        return self._bias_free[(id(reference), tokens, like.device, like.dtype)]

    def end_evaluation(self):
        """Drop the evaluation's features (their memory is the size of a UNet forward's keys/values)."""
        self.levels = {}

    def clear(self):
        self.__init__()

    def tensors(self):
        """Every tensor the cache holds (for memory checks)."""
        held = [t for kept in self._kept.values() for t in kept if t is not None]
        for by_sigma in self.levels.values():
            for features in by_sigma.values():
                held += [t for layer in features.layers() for t in features.get(layer)]
        if self.positive_context is not None:
            held.append(self.positive_context)
        return held


class SelfSubjectAttentionState:
    """All references of a model's self-subject-attention, carried in ``transformer_options``.

    ModelPatcher.clone deep-copies model options; a copy shares the immutable
    references and starts with an empty feature cache, so a clone never sees
    another's features.
    """

    def __init__(self, references=(), layers=()):
        self.references = tuple(references)
        self.layers = frozenset(layers)  # the self-attention layers this pack's replacement is set on
        self.cache = RunCache()

    def __deepcopy__(self, memo):
        return SelfSubjectAttentionState(self.references, self.layers)

    def with_references(self, references, layers=()):
        return SelfSubjectAttentionState(self.references + tuple(references), self.layers | frozenset(layers))


def end_of_run(patcher):
    """Free everything self-subject-attention kept for a run: the host's end-of-sampling callback
    (current ComfyUI) and the pack's own guider call it."""
    state = patcher.model_options.get("transformer_options", {}).get(STATE_KEY)
    if state is not None:
        state.cache.clear()


@dataclass
class CallPlan:
    """What one model call holds: generated rows first, then reference rows.

    groups: (start, end, sigma or None) runs of generated rows and the reference
        noise level they read (None: plain self-attention).
    reference_rows: (sigma, Reference) of each trailing reference row, whose
        features are recorded into ``levels[sigma]``.
    cache: the run's cache (kept-token index and bias on the device).
    """

    n_generated: int
    groups: list
    reference_rows: list
    levels: dict
    cache: Optional[RunCache] = None
    generated_chunks: Optional[list] = None  # the host's cond_or_uncond of the generated rows
